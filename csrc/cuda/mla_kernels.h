// Launchers of the SM90 kernels, called by the CUDA FFI handlers (cuda_handlers.cu). Each enqueues
// its kernels on `stream` and returns the launch error, if any; none allocates or synchronizes.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/indexer_params.h"
#include "common/mla_params.h"
#include "common/sparse_params.h"

namespace jax_flashmla {

// Tile-scheduler metadata on the device: the same plan as schedule_tiles() in mla_contract.h.
cudaError_t launch_metadata(const int32_t* seqlens, int batch, int num_sm_parts, int32_t* tile_md,
                            int32_t* num_splits, cudaStream_t stream);

// Split-KV decode of every (part, kv head, 64-row tile) (decode/), then the combine of
// split requests. `k_map` is the TMA descriptor of k_cache made by make_kcache_tensor_map().
cudaError_t launch_decode(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream);

// The combine kernel alone (combine/combine.cu); launch_decode runs it after the decode kernel.
cudaError_t launch_combine(const DecodeParams& p, cudaStream_t stream);

// Sparse decode over FP8 pools (sparse_decode/): one CTA per (request, query token, split, 64-head
// tile), then, when p.num_splits > 1, the combine of the splits' partials (into out and lse, with
// the sink). Index values are read on the device: -1, ids outside their pool and entries past
// topk_length are masked and never dereferenced.
cudaError_t launch_sparse_decode(const SparseDecodeParams& p, cudaStream_t stream);

// The sparse decode's combine alone (sparse_decode/combine.cu); launch_sparse_decode runs it.
cudaError_t launch_sparse_combine(const SparseDecodeParams& p, cudaStream_t stream);

// Sparse prefill over a bfloat16 kv (sparse_prefill/): one CTA per (query token, 64-head tile), no
// split over the entries. Index values are read on the device: -1, other negative ids, ids >= s_kv
// and entries past topk_length are masked and never dereferenced.
cudaError_t launch_sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream);

// The sparse prefill's backward (sparse_prefill_bwd/): zeroes the float32 dkv accumulator on the
// stream, then one CTA per (query token, 32-head tile) writes dq and adds its dK into dkv with
// red.global.add. Index values are read on the device and masked as the forward masks them.
cudaError_t launch_sparse_prefill_bwd(const SparsePrefillBwdParams& p, cudaStream_t stream);

// The indexer logits (indexer_logits/): one CTA per (request, one or two query tokens, run of page
// columns), FP8 tensor-core scores, -inf past each query's limit; `sm_count` sizes the runs. Page ids
// outside the pool are clamped into it, limits past the block table cut to it.
cudaError_t launch_indexer_logits(const IndexerLogitsParams& p, int sm_count, cudaStream_t stream);

// The top-k of the indexer's logits (indexer_topk/, opt-in): one CTA per row, radix select, then a
// block sort of the picked (key, position) pairs.
cudaError_t launch_indexer_topk(const IndexerTopkParams& p, cudaStream_t stream);

}  // namespace jax_flashmla
