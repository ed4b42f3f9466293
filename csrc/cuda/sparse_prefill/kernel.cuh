// The SM90 sparse prefill kernel: the dense decode kernel's schedule of two warpgroups over pairs of
// 64-token units (decode/schedule.cuh explains it), its units here blocks of 64 gathered kv rows
// instead of pages. config.h gives the work unit and shared memory, traits.h the layouts and GMMA
// atoms, schedule.cuh the walk over the blocks, loads.cuh the gathers (GatherSource), epilogue.cuh
// the store; launch.cuh launches it. The sparse FP8 decode's seesaw kernel runs the same schedule.
//
// Per pair of blocks A (even, stage 0) and B (odd, stage 1): warpgroup 0 owns output channels 0..255
// and computes S_A = Q K_A^T (64 heads x 64 entries) and its softmax; warpgroup 1 owns channels
// 256..511 and does the same for B. Each hands the other its P (through a P tile) and running max,
// and each adds both blocks' P V into its channels, so one warpgroup's softmax overlaps the other's
// matrix work. Scores of unread entries are masked to -inf (their rows are zero-filled, so no
// unread slot, NaN or not, is ever read).
//
// Loads: a stage is refilled in two parts (V channels [256 w, 256 w + 256), the RoPE tile with the
// part of the warpgroup that reads the block's P there), each gathered by cp.async from warpgroup w's
// 128 threads as soon as that warpgroup's wgmma on the part are done, and each completing on its own
// mbarrier (cp.async's arrive, 128 arrivals). The indices of a pair's successors are read at the
// start of the pair, so their latency hides under its math.
#pragma once

#include <type_traits>

#include "common/sparse_params.h"
#include "cuda/sparse_prefill/epilogue.cuh"
#include "cuda/sparse_prefill/loads.cuh"
#include "cuda/sparse_prefill/schedule.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

// Grid: one CTA per (query token, head tile), head tiles innermost, so the tiles of one token run side
// by side and the second reads the token's rows from L2. kProducer: a third warpgroup gathers the
// blocks (config.h's producer plan; schedule.cuh's producer_loop and ReleaseSource).
template <int kDqk, bool kProducer>
__global__ void __launch_bounds__(cta_threads<kProducer>(), 1)
    sparse_prefill_kernel(const __grid_constant__ SparsePrefillParams p) {
  using Storage = std::conditional_t<kProducer, ProducerStorage<kDqk>, SharedStorage<kDqk>>;
  extern __shared__ uint8_t smem_raw[];
  // Aligned by an offset from smem_raw, so the compiler still knows these are shared-memory addresses.
  Storage& s = *reinterpret_cast<Storage*>(smem_raw + (1024 - sm90::smem_addr(smem_raw) % 1024) % 1024);

  const int head_tiles = ceil_div(p.num_heads_q, kRows);
  const int head0 = (blockIdx.x % head_tiles) * kRows;
  const int64_t token = blockIdx.x / head_tiles;
  const TileRows tr{token * p.num_heads_q + head0, head0, min(kRows, p.num_heads_q - head0)};
  const ThreadCoord t = sm90::thread_coord();
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const int n = entries_of(p, token);
  const int blocks = ceil_div(n, kBlockN);

  if constexpr (kProducer) {
    init_producer_barriers<GatherSource<true>>(s);
    if (t.wg == 2) {
      sm90::warpgroup_reg_dealloc<kProducerRegs>();
      producer_loop(s, GatherSource<true>{p, token, n}, blocks);
      return;
    }
    sm90::warpgroup_reg_alloc<kConsumerRegs>();
  }

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  RowState st{-INFINITY, -INFINITY, 0.f, 0.f};
  RowPair row_max{-INFINITY, -INFINITY};  // exact (log2 units), for max_logits: the base may lag it
  bool any_read = false;

  if constexpr (kProducer) {
    walk_blocks(s, ReleaseSource<GatherSource<true>::kArrivals>{s.k_free}, blocks, p.q + tr.qo_row0 * kDqk, tr.rows,
                t, scale_log2, o, st, row_max, any_read);
  } else {
    walk_blocks(s, GatherSource<>{p, token, n}, blocks, p.q + tr.qo_row0 * kDqk, tr.rows, t, scale_log2, o, st,
                row_max, any_read);
  }

  finish_tile<kProducer>(p, s, o, t, st, row_max, any_read, tr);
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
