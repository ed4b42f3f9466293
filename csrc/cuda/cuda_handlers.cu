// XLA FFI handlers of the "CUDA" platform. They read shapes (never data) on the host, build the TMA
// descriptor of k_cache, and enqueue the kernels on XLA's stream: no allocation, no synchronization,
// so XLA may capture them in command buffers (CUDA graphs).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "common/ffi_params.h"
#include "common/indexer_ffi_params.h"
#include "common/sparse_ffi_params.h"
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace {

ffi::Error cuda_error(const char* what, cudaError_t err) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("jax_flashmla: ") + what + ": " + cudaGetErrorString(err));
}

// cuTensorMapEncodeTiled from the driver, found at run time so the module links no libcuda.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// k_cache [num_blocks, 64, h_kv, 576] as a 3-D tensor (channel, kv head, token row) whose boxes are
// 64 channels x 1 head x 64 tokens with 128-byte swizzle: one swizzled 64x64 tile per TMA copy.
// L2 promotion is 128 bytes, one box row: 256 bytes was up to 9% slower on the memory-bound cases
// (H200, L2 flushed by a read).
ffi::Error make_kcache_tensor_map(const DecodeParams& p, CUtensorMap& map) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return ffi::Error(ffi::ErrorCode::kInternal, "jax_flashmla: cuTensorMapEncodeTiled unavailable");
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(p.num_heads_k),
                              static_cast<cuuint64_t>(p.num_blocks) * kPageSize};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(kHeadDim) * 2,
                                 static_cast<cuuint64_t>(kHeadDim) * 2 * p.num_heads_k};
  const cuuint32_t box[3] = {64, 1, kPageSize};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      p.dtype == ElementType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  CUresult res = encode(&map, type, 3, const_cast<void*>(p.k_cache), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_flashmla: cuTensorMapEncodeTiled failed with CUresult " + std::to_string(res));
  }
  return ffi::Error::Success();
}

ffi::Error metadata_cuda(cudaStream_t stream, ffi::Buffer<ffi::S32> seqlens, ffi::ResultBuffer<ffi::S32> tile_md,
                         ffi::ResultBuffer<ffi::S32> num_splits, int32_t num_sm_parts) {
  if (auto err = check_metadata_shapes(seqlens, tile_md, num_splits, num_sm_parts); err.failure()) return err;
  cudaError_t err = launch_metadata(seqlens.typed_data(), static_cast<int>(seqlens.dimensions()[0]), num_sm_parts,
                                    tile_md->typed_data(), num_splits->typed_data(), stream);
  if (err != cudaSuccess) return cuda_error("metadata kernel launch", err);
  return ffi::Error::Success();
}

ffi::Error decode_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32> block_table,
                       ffi::Buffer<ffi::S32> seqlens, ffi::Buffer<ffi::S32> tile_md, ffi::Buffer<ffi::S32> num_splits,
                       ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> lse,
                       ffi::ResultBuffer<ffi::F32> o_accum, ffi::ResultBuffer<ffi::F32> lse_accum,
                       float softmax_scale, bool causal) {
  DecodeParams p;
  if (auto err = read_decode_params(q, k_cache, block_table, seqlens, tile_md, num_splits, out, lse, o_accum,
                                    lse_accum, softmax_scale, causal, p);
      err.failure()) {
    return err;
  }
  if (p.batch == 0) return ffi::Error::Success();
  CUtensorMap k_map;
  if (auto err = make_kcache_tensor_map(p, k_map); err.failure()) return err;
  if (cudaError_t err = launch_decode(p, k_map, stream); err != cudaSuccess) return cuda_error("decode kernel launch", err);
  return ffi::Error::Success();
}

// SMs of the current device, read once per device.
cudaError_t current_sm_count(int& count) {
  static std::atomic<int> counts[64] = {};
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const bool tracked = device >= 0 && device < 64;
  count = tracked ? counts[device].load(std::memory_order_relaxed) : 0;
  if (count > 0) return cudaSuccess;
  if (cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device); err != cudaSuccess) {
    return err;
  }
  if (tracked) counts[device].store(count, std::memory_order_relaxed);
  return cudaSuccess;
}

// Splits of each query token's entries. The kernel runs one CTA an SM (255 registers, 148.5 KB of
// shared memory), so a grid of `ctas` < SMs leaves SMs idle: split until the grid fills one wave,
// no further (a second wave costs as much as it saves). `workspace_splits` (the op's bound, from the
// static shapes: it also keeps each split at several blocks) caps it; 0 means no workspace.
int choose_sparse_splits(int64_t ctas, int sm_count, int64_t workspace_splits) {
  if (workspace_splits < 2 || ctas < 1) return 1;
  const int64_t fill = sm_count / ctas;
  return static_cast<int>(std::max<int64_t>(1, std::min(fill, workspace_splits)));
}

// Same operands, attribute and checks as the CPU handler (read_sparse_decode_params), plus the
// split workspace and num_splits (0: chosen here from the grid and the SM count; N > 0: exactly N,
// the workspace holding at least N when N > 1). Index values stay on the device: the kernel masks
// ids outside their pool instead of rejecting them.
ffi::Error sparse_decode_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                              ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> topk_length,
                              ffi::Buffer<ffi::F32> attn_sink, ffi::AnyBuffer extra_k_cache,
                              ffi::Buffer<ffi::S32> extra_indices, ffi::Buffer<ffi::S32> extra_topk_length,
                              ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> lse,
                              ffi::ResultBuffer<ffi::F32> o_accum, ffi::ResultBuffer<ffi::F32> lse_accum,
                              float softmax_scale, int32_t num_splits) {
  SparseDecodeParams p;
  if (auto err = read_sparse_decode_params(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                                           extra_topk_length, out, lse, softmax_scale, p);
      err.failure()) {
    return err;
  }
  int64_t workspace_splits = 0;
  if (auto err = read_sparse_decode_workspace(o_accum, lse_accum, p, workspace_splits); err.failure()) return err;
  if (num_splits < 0) return invalid("num_splits must be >= 0");
  if (num_splits > 0) {
    if (num_splits > 1 && workspace_splits < num_splits) {
      return invalid("the split workspace holds fewer splits than num_splits");
    }
    p.num_splits = num_splits;
  } else {
    int sm_count = 0;
    if (cudaError_t err = current_sm_count(sm_count); err != cudaSuccess) return cuda_error("SM count", err);
    const int64_t ctas = static_cast<int64_t>(p.batch) * p.seqlen_q * ceil_div(p.num_heads_q, kSparseDecodeHeadsPerCta);
    p.num_splits = choose_sparse_splits(ctas, sm_count, workspace_splits);
  }
  if (cudaError_t err = launch_sparse_decode(p, stream); err != cudaSuccess) {
    return cuda_error("sparse decode kernel launch", err);
  }
  return ffi::Error::Success();
}

// Same operands, attributes and checks as the CPU handler (read_sparse_prefill_params). Index values
// stay on the device: the kernel masks ids outside [0, s_kv) instead of rejecting them.
ffi::Error sparse_prefill_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> indices,
                               ffi::Buffer<ffi::S32> topk_length, ffi::Buffer<ffi::F32> attn_sink,
                               ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> max_logits,
                               ffi::ResultBuffer<ffi::F32> lse, float softmax_scale) {
  SparsePrefillParams p;
  if (auto err = read_sparse_prefill_params(q, kv, indices, topk_length, attn_sink, out, max_logits, lse,
                                            softmax_scale, p);
      err.failure()) {
    return err;
  }
  if (cudaError_t err = launch_sparse_prefill(p, stream); err != cudaSuccess) {
    return cuda_error("sparse prefill kernel launch", err);
  }
  return ffi::Error::Success();
}

// The sparse prefill's backward (read_sparse_prefill_bwd_params): dq, and dkv zeroed then summed into
// in float32. Index values stay on the device, masked as the forward masks them.
ffi::Error sparse_prefill_bwd_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                                   ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> topk_length,
                                   ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer d_out, ffi::Buffer<ffi::F32> sig,
                                   ffi::Buffer<ffi::F32> delta, ffi::Result<ffi::AnyBuffer> dq,
                                   ffi::ResultBuffer<ffi::F32> dkv, float softmax_scale) {
  SparsePrefillBwdParams p;
  if (auto err = read_sparse_prefill_bwd_params(q, kv, indices, topk_length, lse, d_out, sig, delta, dq, dkv,
                                                softmax_scale, p);
      err.failure()) {
    return err;
  }
  if (cudaError_t err = launch_sparse_prefill_bwd(p, stream); err != cudaSuccess) {
    return cuda_error("sparse prefill backward kernel launch", err);
  }
  return ffi::Error::Success();
}

// DeepGEMM's fp8_paged_mqa_logits (read_indexer_logits_params); limits and page ids stay on the
// device, where the kernel clamps them.
ffi::Error indexer_logits_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv_cache,
                               ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> limits,
                               ffi::Buffer<ffi::S32> block_table, ffi::ResultBuffer<ffi::F32> logits) {
  IndexerLogitsParams p;
  if (auto err = read_indexer_logits_params(q, kv_cache, weights, limits, block_table, logits, p); err.failure()) {
    return err;
  }
  int sm_count = 0;
  if (cudaError_t err = current_sm_count(sm_count); err != cudaSuccess) return cuda_error("SM count", err);
  if (cudaError_t err = launch_indexer_logits(p, sm_count, stream); err != cudaSuccess) {
    return cuda_error("indexer logits kernel launch", err);
  }
  return ffi::Error::Success();
}

// The indexer's top-k (read_indexer_topk_params), opt-in from Python; the counts stay on the device.
ffi::Error indexer_topk_cuda(cudaStream_t stream, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> visible,
                             ffi::ResultBuffer<ffi::S32> positions) {
  IndexerTopkParams p;
  if (auto err = read_indexer_topk_params(logits, visible, positions, p); err.failure()) return err;
  if (cudaError_t err = launch_indexer_topk(p, stream); err != cudaSuccess) {
    return cuda_error("indexer top-k kernel launch", err);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmMetadataCuda, jax_flashmla::metadata_cuda,
                              JFM_BIND_METADATA_ARGS(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmDecodeCuda, jax_flashmla::decode_cuda,
                              JFM_BIND_DECODE_ARGS(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmSparseDecodeCuda, jax_flashmla::sparse_decode_cuda,
                              JFM_BIND_SPARSE_DECODE_CUDA_ARGS(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmSparsePrefillCuda, jax_flashmla::sparse_prefill_cuda,
                              JFM_BIND_SPARSE_PREFILL_ARGS(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmSparsePrefillBwdCuda, jax_flashmla::sparse_prefill_bwd_cuda,
                              JFM_BIND_SPARSE_PREFILL_BWD_ARGS(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmIndexerLogitsCuda, jax_flashmla::indexer_logits_cuda,
                              JFM_BIND_INDEXER_LOGITS_ARGS(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmIndexerTopkCuda, jax_flashmla::indexer_topk_cuda,
                              JFM_BIND_INDEXER_TOPK_ARGS(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
