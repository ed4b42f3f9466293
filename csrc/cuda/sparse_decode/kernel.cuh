// The sparse FP8 decode kernel (config.h describes the work unit, sparse_common/tile.h the warp roles).
#pragma once

#include <type_traits>

#include "common/sparse_params.h"
#include "cuda/ptx/sm90_ptx.cuh"
#include "cuda/sparse_common/tile_math.cuh"
#include "cuda/sparse_decode/loads.cuh"
#include "cuda/sparse_decode/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {

// Grid: one CTA per (request, query token, split, head tile), head tiles innermost, then splits,
// then query tokens, so the CTAs that read the same tokens run side by side and share them through
// L2. Split s of num_splits walks entry blocks [s nb / num_splits, (s + 1) nb / num_splits) of its
// token's nb = ceil((n_main + n_extra) / 64) blocks (main then extra entries as one sequence), so a
// split may hold no block at all (nb < num_splits) and a block may straddle the two pools.
template <KvFormat kFormat>
__global__ void __launch_bounds__(kThreads, 1) sparse_decode_kernel(const __grid_constant__ SparseDecodeParams p) {
  using Tr = Traits<kFormat>;
  using Storage = std::conditional_t<kPipeline, StagedStorage<kFormat>, SharedStorage<Tr::kDqk>>;
  extern __shared__ uint8_t smem_raw[];
  auto& smem = *reinterpret_cast<Storage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 127) & ~static_cast<uintptr_t>(127));

  // With splits, the combine grid may launch now: it waits for this grid's completion itself.
  sm90::allow_dependent_launch();
  const DecodeCta cta = decode_cta(p);
  const int req = cta.req, token = cta.token, split = cta.split, head0 = cta.head0, rows = cta.rows;
  const int64_t qo_row0 = cta.qo_row0;

  const int tid = threadIdx.x;
  const int half = tid / 128;  // output channels 256 half ..
  const int ltid = tid % 128;  // thread within the four warps of a half
  // This warp's 16 rows hold at least one live head: only then does it run the math.
  const bool live = (ltid / 32) * 16 < rows;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem.q)), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem.k)), typename Tr::SmemLayoutK{});

  TileAccumulator<Tr> acc;
  if constexpr (kPipeline) {
    // Pipelined: block b + 1's ids were copied one block earlier, so its entries are resolved and its
    // records copied (cp.async, into the stage) right after block b is dequantised, and land while
    // block b computes. Per block: wait + barrier (the stage holds block b), dequantise it from the
    // stage, barrier (sK holds block b; the stage and the mask slot are free), stage block b + 1 and
    // the ids of block b + 2, then block b's math.
    const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
    const SplitRange r = split_range(p, req, split);
    const int n_main = r.n_main, n_extra = r.n_extra, e_begin = r.e_begin, e_end = r.e_end;
    // Block k's ids live in ids[k % 2], k counted from e_begin.
    if (e_begin < e_end) stage_ids(p, req, token, e_begin, n_main, n_extra, smem.ids[0]);
    load_q_tile<Tr>(sQ, p.q + qo_row0 * Tr::kDqk, rows);
    acc.init();
    if (e_begin < e_end) {
      sm90::cp_async_wait_all();
      __syncthreads();  // block 0's ids are visible
      if (e_begin + kBlockN < e_end) stage_ids(p, req, token, e_begin + kBlockN, n_main, n_extra, smem.ids[1]);
      stage_block<kFormat>(p, e_begin, n_main, n_extra, smem.ids[0], smem.stage, smem.stage_scales, smem.valid);
    }
    for (int e0 = e_begin, k = 0; e0 < e_end; e0 += kBlockN, ++k) {
      sm90::cp_async_wait_all();  // this thread's copies of block k (and of block k + 1's ids)
      // Block k's records, mask and block k + 1's ids are visible; the previous block's P V is done
      // with sK.
      __syncthreads();
      // Read before the next barrier: past it, block k + 1's mask replaces it.
      const uint64_t valid = smem.valid[0] | (static_cast<uint64_t>(smem.valid[1]) << 32);
      if (valid != 0) dequant_staged<Tr>(sK, smem.stage, smem.stage_scales, valid);
      __syncthreads();  // sK holds block k; every thread is done with the stage and block k's ids
      const int e1 = e0 + kBlockN;
      if (e1 < e_end) {
        if (e1 + kBlockN < e_end) stage_ids(p, req, token, e1 + kBlockN, n_main, n_extra, smem.ids[k % 2]);
        stage_block<kFormat>(p, e1, n_main, n_extra, smem.ids[(k + 1) % 2], smem.stage, smem.stage_scales,
                             smem.valid);
      }
      if (!live || valid == 0) continue;
      attend_block(sQ, sK, ltid, half, valid, scale_log2, acc);
    }
  } else {
    load_q_tile<Tr>(sQ, p.q + qo_row0 * Tr::kDqk, rows);

    acc.init();
    const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
    const SplitRange r = split_range(p, req, split);
    const int n_main = r.n_main, n_extra = r.n_extra, e_begin = r.e_begin, e_end = r.e_end;

    for (int e0 = e_begin; e0 < e_end; e0 += kBlockN) {
      // 1. Resolve the block's entries (threads 0..63, one each).
      if (tid < kBlockN) {
        const uint8_t* record;
        const uint8_t* scales;
        resolve_entry<kFormat>(p, req, token, e0 + tid, n_main, n_extra, record, scales);
        smem.record[tid] = record;
        smem.scales[tid] = scales;
        const uint32_t bits = __ballot_sync(0xffffffffu, record != nullptr);
        if (tid % 32 == 0) smem.valid[tid / 32] = bits;
      }
      // The previous block's P V is done with sK, and the entries are visible.
      __syncthreads();
      // Read before the next barrier: past it, a warp that skips the math may overwrite the entries.
      const uint64_t valid = smem.valid[0] | (static_cast<uint64_t>(smem.valid[1]) << 32);
      // 2. Dequantise the named tokens (masked ones as zero rows).
      dequant_block<Tr>(sK, smem.record, smem.scales);
      __syncthreads();
      if (!live || valid == 0) continue;

      // 3. S = Q K^T, the online softmax, O += P V.
      attend_block(sQ, sK, ltid, half, valid, scale_log2, acc);
    }
  }

  if (!live) return;
  if (p.num_splits > 1) {
    const int64_t rows_total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads_q;
    const int64_t row0 = split * rows_total + qo_row0;
    PartialOutput po;
    po.rows = rows;
    po.channel0 = half * kHalfV;
    po.o_row0 = p.o_accum + row0 * kHeadDimV;
    po.lse_row0 = p.lse_accum + row0;
    po.write_stats = half == 0;
    finish_partial(acc, ltid, po);
    return;
  }
  TileOutput to;
  to.sink = p.attn_sink;
  to.head0 = head0;
  to.rows = rows;
  to.channel0 = half * kHalfV;
  to.out_row0 = p.out + qo_row0 * kHeadDimV;
  to.lse_row0 = p.lse + (static_cast<int64_t>(req) * p.num_heads_q + head0) * p.seqlen_q + token;  // [b, h_q, s_q]
  to.stat_stride = p.seqlen_q;
  to.write_stats = half == 0;
  finish_tile(acc, ltid, to);
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
