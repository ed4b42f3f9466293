// The sparse prefill kernel (config.h describes the work unit and the pipeline, sparse_common/tile.h
// the warp roles).
#pragma once

#include "common/sparse_params.h"
#include "cuda/sparse_common/tile_math.cuh"
#include "cuda/sparse_prefill/loads.cuh"
#include "cuda/sparse_prefill/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

// Grid: one CTA per (query token, head tile), head tiles innermost, so the tiles of one token run side
// by side and the second reads the token's rows from L2.
template <int kDqk>
__global__ void __launch_bounds__(kThreads, 1) sparse_prefill_kernel(const __grid_constant__ SparsePrefillParams p) {
  using Tr = Traits<kDqk>;
  extern __shared__ uint8_t smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<kDqk>*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 127) & ~static_cast<uintptr_t>(127));

  const int head_tiles = ceil_div(p.num_heads_q, kRows);
  const int head0 = (blockIdx.x % head_tiles) * kRows;
  const int64_t token = blockIdx.x / head_tiles;
  const int rows = min(kRows, p.num_heads_q - head0);
  const int64_t qo_row0 = token * p.num_heads_q + head0;  // row of (token, head0) in q, out, lse

  const int tid = threadIdx.x;
  const int half = tid / 128;  // output channels 256 half ..
  const int ltid = tid % 128;  // thread within the four warps of a half
  // This warp's 16 rows hold at least one live head: only then does it run the math.
  const bool live = (ltid / 32) * 16 < rows;

  auto tokens = [&](int stage) {
    return make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem.k[stage])), typename Tr::SmemLayoutK{});
  };
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem.q)), typename Tr::SmemLayoutQ{});

  TileAccumulator<Tr> acc;
  acc.init();
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const int n = entries_of(p, token);
  const int blocks = ceil_div(n, kBlockN);
  auto any_read = [&](int slot) { return (smem.valid[slot][0] | smem.valid[slot][1]) != 0u; };
  // Issues the copies of block b (its entries resolved in slot b % kEntrySlots) into its buffer.
  auto copy_block = [&](int b) {
    const int32_t* row = smem.row[b % kEntrySlots];
    Tensor sK = tokens(b % kStages);
    copy_rows_async<kBlockN, Tr::kChunksPerRow, Tr>(sK, p.kv, [&](int j) -> const uint16_t* {
      const int32_t id = row[j];
      return id < 0 ? nullptr : p.kv + static_cast<int64_t>(id) * kDqk;
    });
  };

  if (blocks > 0) {
    const uint16_t* q_row0 = p.q + qo_row0 * kDqk;
    copy_rows_async<kRows, Tr::kChunksPerRow, Tr>(sQ, q_row0, [&](int r) -> const uint16_t* {
      return r < rows ? q_row0 + static_cast<int64_t>(r) * kDqk : nullptr;
    });
    if (tid < kBlockN) resolve_block(p, token, n, 0, smem.row[0], smem.valid[0]);
    __syncthreads();  // block 0's entries are visible
    if (any_read(0)) copy_block(0);
    cp_async_fence();
  }

  for (int b = 0; b < blocks; ++b) {
    const int slot = b % kEntrySlots;
    // Block b + 1's entries, into the slot block b - 2 used: every thread is past block b - 2 (it has
    // passed the barrier of block b - 1).
    if (b + 1 < blocks && tid < kBlockN) {
      const int next = (b + 1) % kEntrySlots;
      resolve_block(p, token, n, (b + 1) * kBlockN, smem.row[next], smem.valid[next]);
    }
    cp_async_wait<0>();  // this thread's copies of Q and of block b have landed
    // Block b (and Q) visible to all; block b + 1's entries visible; every warp is done with block
    // b - 1's buffer, which block b + 1 now takes.
    __syncthreads();
    const uint64_t valid = smem.valid[slot][0] | (static_cast<uint64_t>(smem.valid[slot][1]) << 32);
    if (b + 1 < blocks && any_read((b + 1) % kEntrySlots)) copy_block(b + 1);
    cp_async_fence();
    if (live && valid != 0) attend_block(sQ, tokens(b % kStages), ltid, half, valid, scale_log2, acc);
  }

  if (!live) return;
  TileOutput to;
  to.sink = p.attn_sink;
  to.head0 = head0;
  to.rows = rows;
  to.channel0 = half * kHalfV;
  to.out_row0 = p.out + qo_row0 * kHeadDimV;
  to.lse_row0 = p.lse + qo_row0;  // [s_q, h_q]
  to.max_logits_row0 = p.max_logits + qo_row0;
  to.stat_stride = 1;
  to.write_stats = half == 0;
  finish_tile(acc, ltid, to);
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
