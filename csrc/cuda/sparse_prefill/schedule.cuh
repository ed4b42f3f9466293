// The two-warpgroup schedule of the sparse kernels over the blocks of one tile (kernel.cuh explains
// it), apart from where the blocks come from: a Source gives that.
//
//   Source::Rows rows(int block) const: this thread's share of block `block`'s entries, read early
//       (at the start of the pair before the block's), so that index loads hide under the math.
//   void fill(SharedStorage<kDqk>& s, int stage, int part, int block, const Rows& rows) const: called
//       by all 128 threads of warpgroup `part`; loads part `part` of the block into stage `stage`
//       (V tiles 4 part .. 4 part + 3, and with d_qk 576 the RoPE tile when part == 1 - stage: the
//       part of the warpgroup that reads the block's P from that tile), rows of unread entries as
//       zeros; k_full[stage][part] completes after Source::kArrivals arrivals once the part is in
//       shared memory and visible to wgmma. When part == stage it also publishes the block's mask
//       of read entries in mask[block % kMaskSlots], visible to the warpgroup on return.
//   void prefetch(int part, int block, const Rows& rows) const: a hint, by warpgroup `part`, that it
//       will fill that part of the block later in the pair (its rows read by then); may do nothing.
//   kArrivals: the arrivals that complete a part's k_full phase.
//   kProducerFed: a third warpgroup of the CTA loads the blocks (fill then only says the part is free
//       again: ReleaseSource, below, with producer_loop); the kernel initialises the mbarriers itself
//       (init_producer_barriers), and the walk's CTA-wide barriers become the named barrier
//       kBarConsumers over the two consumer warpgroups.
//
// prefill/loads.cuh's GatherSource copies bfloat16 rows by cp.async; the sparse FP8 decode's source
// (sparse_decode_seesaw/loads.cuh) dequantises token records.
#pragma once

#include <cuda_bf16.h>

#include <type_traits>

#include "cuda/decode/softmax.cuh"
#include "cuda/sparse_prefill/loads.cuh"
#include "cuda/sparse_prefill/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

using sm90::RowPair;
using sm90::RowState;
using sm90::ThreadCoord;

static_assert(kBarConsumers == sm90::kBarWarpgroup + 2, "named barriers 1..4 are the hand-offs' and the warpgroups'");

// A barrier over the threads that walk the blocks: the whole CTA, or its two consumer warpgroups.
template <bool kProducerFed>
__device__ __forceinline__ void consumers_sync() {
  if constexpr (kProducerFed) sm90::bar_sync(kBarConsumers, 2 * kWarpgroupThreads);
  else __syncthreads();
}

// S = Q K^T of the block in `stage` (raw scores), once both its parts have landed; returns with the
// wgmma done.
template <int kDqk>
__device__ __forceinline__ void block_scores(SharedStorage<kDqk>& s, int stage, uint32_t parity, float* sc) {
  sm90::mbar_wait(&s.k_full[stage][0], parity);
  sm90::mbar_wait(&s.k_full[stage][1], parity);
  sm90::wgmma_fence();  // after the wait loops: without it ptxas serializes every wgmma (C7520)
  const uint64_t q = kmajor_desc(s.q), k = kmajor_desc(s.k[stage]);
#pragma unroll
  for (int t = 0; t < SharedStorage<kDqk>::kTiles; ++t) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t offset = t * kTileBytes + kk * 32;
      scores_step(sc, desc_advance(q, offset), desc_advance(k, offset), (t | kk) != 0);
    }
  }
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  sm90::pin_registers<32>(sc);
}

// Masks the scores of unread entries (bit e of `mask` clear) to -inf and returns the raw row maxima
// of rows r_lo and r_lo + 8 over the block. fmaxf skips NaN scores; they reach the row sums through P.
__device__ __forceinline__ RowPair mask_row_max(float* sc, uint64_t mask, int col_q) {
  if (mask != ~0ull) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int col = (i / 4) * 8 + col_q + (i & 1);
      if (!((mask >> col) & 1u)) sc[i] = -INFINITY;
    }
  }
  RowPair mx{-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    if ((i >> 1) & 1) mx.hi = fmaxf(mx.hi, sc[i]); else mx.lo = fmaxf(mx.lo, sc[i]);
  }
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    mx.lo = fmaxf(mx.lo, __shfl_xor_sync(0xffffffffu, mx.lo, d));
    mx.hi = fmaxf(mx.hi, __shfl_xor_sync(0xffffffffu, mx.hi, d));
  }
  return mx;
}

// Hands the other warpgroup this thread's P fragment (into `p_tile`) and the running maxima of its
// rows, then arrives on `barrier`; the fence makes P visible to wgmma.
__device__ __forceinline__ void hand_off(const uint32_t* packed, uint8_t* p_tile, float* published,
                                         const ThreadCoord& t, const RowState& st, int barrier) {
  store_p(packed, p_tile, t.r_lo, t.col_q);
  if (t.lane % 4 == 0) {
    published[t.r_lo] = st.m_lo;
    published[t.r_lo + 8] = st.m_hi;
  }
  sm90::fence_proxy_async();
  sm90::bar_arrive(barrier, 2 * kWarpgroupThreads);
}

// Waits for this warpgroup's matrix work, keeping the accumulators live until it is done.
__device__ __forceinline__ void finish_wgmma(float* o) {
  sm90::wgmma_wait<0>();
  sm90::pin_registers<128>(o);
}

// Issues O += P V[:, this warpgroup's channels] with P from `p_tile` (the other warpgroup's block);
// the caller waits (finish_wgmma).
__device__ __forceinline__ void issue_values_from_shared(float* o, const uint8_t* p_tile, const uint8_t* block,
                                                         int wg) {
  sm90::pin_registers<128>(o);
  sm90::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) values_step_ss(o, p_desc(p_tile, kk), v_desc(block, wg, kk));
  sm90::wgmma_commit();
}

// O += P V[:, this warpgroup's channels] with P from registers (this warpgroup's own block), waited for.
__device__ __forceinline__ void values_from_registers(float* o, uint32_t* packed, const uint8_t* block, int wg) {
  sm90::pin_registers<128>(o);
  sm90::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) values_step_rs(o, packed + 4 * kk, v_desc(block, wg, kk));
  sm90::wgmma_commit();
  finish_wgmma(o);
  sm90::pin_words<16>(packed);  // the RS wgmma read them until now
}

// Walks `blocks` blocks (of up to 64 entries) of one tile: the Q tile (rows q_rows of q_row0, the rest
// zero) and the blocks by `src`; on return o, st, row_max (exact row maxima, log2 units) and any_read
// (a block read some entry) hold this thread's part of the tile for the epilogue. All kThreads
// threads call it; with blocks == 0 it does nothing.
template <int kDqk, class Source>
__device__ __forceinline__ void walk_blocks(SharedStorage<kDqk>& s, const Source& src, int blocks,
                                            const uint16_t* q_row0, int q_rows, const ThreadCoord& t,
                                            float scale_log2, float* o, RowState& st, RowPair& row_max,
                                            bool& any_read) {
  using Storage = SharedStorage<kDqk>;
  using Rows = typename Source::Rows;
  auto p_tile = [&](int stage) -> uint8_t* {
    if constexpr (Storage::kSeparateP) return s.p[stage];
    else return s.k[stage] + 8 * kTileBytes;  // the block's RoPE tile
  };

  if (blocks > 0) {
    if (!Source::kProducerFed && t.tid == 0) {
      for (int i = 0; i < 2; ++i) {
        for (int w = 0; w < 2; ++w) sm90::mbar_init(&s.k_full[i][w], Source::kArrivals);
      }
      sm90::fence_mbar_init();
    }
    issue_q_tile(s, q_row0, q_rows);
    sm90::cp_async_commit();
    consumers_sync<Source::kProducerFed>();  // the mbarriers are initialised
    src.fill(s, 0, t.wg, 0, src.rows(0));
    if (blocks > 1) src.fill(s, 1, t.wg, 1, src.rows(1));
    sm90::cp_async_wait_group<0>();  // this thread's part of the Q tile (the block copies are not committed)
    sm90::fence_proxy_async();
    consumers_sync<Source::kProducerFed>();

    uint32_t uses[2] = {0, 0};  // blocks each stage has held so far: the parity of its mbarrier phases
    // Folds a block's raw row maxima into the exact ones.
    auto note_max = [&](RowPair mx) {
      row_max.lo = fmaxf(row_max.lo, mx.lo * scale_log2);
      row_max.hi = fmaxf(row_max.hi, mx.hi * scale_log2);
    };
    auto block_mask = [&](int b) { return *reinterpret_cast<const uint64_t*>(s.mask[b % kMaskSlots]); };

    // One pair, blocks a and a + 1. kNext: a later pair follows (so this one has block B); kHasB:
    // block a + 1 exists.
    auto wg0_pair = [&](auto next_tag, auto has_b_tag, int a) {
      constexpr bool kNext = decltype(next_tag)::value, kHasB = decltype(has_b_tag)::value;
      Rows next_a{}, next_b{};
      if constexpr (kNext) {
        next_a = src.rows(a + 2);
        if (a + 3 < blocks) next_b = src.rows(a + 3);
      }
      float sc[32];
      block_scores(s, 0, uses[0] & 1, sc);
      const uint64_t mask = block_mask(a);
      any_read |= mask != 0;
      const RowPair mx = mask_row_max(sc, mask, t.col_q);
      note_max(mx);
      uint32_t packed[16];
      const RowPair alpha = sm90::softmax_page<__nv_bfloat16>(sc, scale_log2, mx, st, packed);
      hand_off(packed, p_tile(0), s.max_a, t, st, sm90::kBarMaxA);
      if constexpr (kNext) {
        src.prefetch(0, a + 2, next_a);
        if (a + 3 < blocks) src.prefetch(0, a + 3, next_b);
      }
      sm90::rescale_rows(o, alpha);
      values_from_registers(o, packed, s.k[0], 0);
      // Stage 0's part 0 is done with once P_A V_A[:, L] is.
      if constexpr (kNext) src.fill(s, 0, 0, a + 2, next_a);
      if constexpr (kHasB) {
        sm90::bar_sync(sm90::kBarMaxB, 2 * kWarpgroupThreads);
        sm90::adopt_max(s.max_b, t.r_lo, o, st);
        // Producer-fed: this warpgroup's part of stage 1 was filled by the producer, and only the
        // other warpgroup waited for it; wait here too (the phase is complete: no stall).
        if constexpr (Source::kProducerFed) sm90::mbar_wait(&s.k_full[1][0], uses[1] & 1);
        issue_values_from_shared(o, p_tile(1), s.k[1], 0);
        finish_wgmma(o);
        if (kNext && a + 3 < blocks) src.fill(s, 1, 0, a + 3, next_b);
      }
    };

    auto wg1_pair = [&](auto next_tag, auto has_b_tag, int a) {
      constexpr bool kNext = decltype(next_tag)::value, kHasB = decltype(has_b_tag)::value;
      Rows next_a{}, next_b{};
      if constexpr (kNext) {
        next_a = src.rows(a + 2);
        if (a + 3 < blocks) next_b = src.rows(a + 3);
      }
      float sc[32];
      RowPair mx{-INFINITY, -INFINITY};
      if constexpr (kHasB) {
        block_scores(s, 1, uses[1] & 1, sc);
        const uint64_t mask = block_mask(a + 1);
        any_read |= mask != 0;
        mx = mask_row_max(sc, mask, t.col_q);
        note_max(mx);
      }
      sm90::bar_sync(sm90::kBarMaxA, 2 * kWarpgroupThreads);
      sm90::adopt_max(s.max_a, t.r_lo, o, st);
      if constexpr (Source::kProducerFed) sm90::mbar_wait(&s.k_full[0][1], uses[0] & 1);  // as above
      issue_values_from_shared(o, p_tile(0), s.k[0], 1);
      if constexpr (kNext) {
        src.prefetch(1, a + 2, next_a);
        if (a + 3 < blocks) src.prefetch(1, a + 3, next_b);
      }
      if constexpr (kHasB) {
        uint32_t packed[16];
        const RowPair beta = sm90::softmax_page<__nv_bfloat16>(sc, scale_log2, mx, st, packed);
        hand_off(packed, p_tile(1), s.max_b, t, st, sm90::kBarMaxB);
        // Stage 0's part 1 (V_A[:, R], and P_A in its RoPE tile) is done with once P_A V_A[:, R] is.
        finish_wgmma(o);
        if constexpr (kNext) src.fill(s, 0, 1, a + 2, next_a);
        sm90::rescale_rows(o, beta);
        values_from_registers(o, packed, s.k[1], 1);
        if (kNext && a + 3 < blocks) src.fill(s, 1, 1, a + 3, next_b);
      } else {
        finish_wgmma(o);
      }
    };

    using Yes = std::true_type;
    using No = std::false_type;
    // The blocks in pairs: full pairs with a successor, then a last pair with or without block B.
    auto walk_pairs = [&](auto pair) {
      int a = 0;
      for (; a + 2 < blocks; a += 2) {
        pair(Yes{}, Yes{}, a);
        ++uses[0];
        ++uses[1];
      }
      if (a + 1 < blocks) pair(No{}, Yes{}, a);
      else pair(No{}, No{}, a);
    };
    if (t.wg == 0) walk_pairs(wg0_pair);
    else walk_pairs(wg1_pair);
  }

}

// The consumers' source when a producer warpgroup loads the blocks: filling a part means handing it
// back, an arrival on its k_free mbarrier (the walk's prologue hands both stages over for the first
// two blocks). kFillArrivals: the arrivals of the producer's fills that complete a part's k_full phase.
template <int kFillArrivals>
struct ReleaseSource {
  struct Rows {};
  static constexpr int kArrivals = kFillArrivals;
  static constexpr bool kProducerFed = true;
  uint64_t (*k_free)[2];

  __device__ __forceinline__ Rows rows(int) const { return {}; }
  __device__ __forceinline__ void prefetch(int, int, const Rows&) const {}
  template <int kDqk>
  __device__ __forceinline__ void fill(SharedStorage<kDqk>&, int stage, int part, int, const Rows&) const {
    sm90::mbar_arrive(&k_free[stage][part]);
  }
};

// The mbarriers of a producer-fed tile (k_full completed by the producer's Source fills, k_free by one
// consumer warpgroup's hand-back), initialised and visible to all three warpgroups. All threads call it.
template <class Source, int kDqk>
__device__ __forceinline__ void init_producer_barriers(ProducerStorage<kDqk>& s) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      for (int w = 0; w < 2; ++w) {
        sm90::mbar_init(&s.k_full[i][w], Source::kArrivals);
        sm90::mbar_init(&s.k_free[i][w], kWarpgroupThreads);
      }
    }
    sm90::fence_mbar_init();
  }
  __syncthreads();
}

// The producer warpgroup: every block, both parts, in order, through `src`; a part's stage is refilled
// once the consumer warpgroup that reads it last has handed it back (k_free, one phase per use of the
// stage). The next block's rows are read, and the source told to prefetch them, before the current
// block's parts are waited for.
template <int kDqk, class Source>
__device__ __forceinline__ void producer_loop(ProducerStorage<kDqk>& s, const Source& src, int blocks) {
  using Rows = typename Source::Rows;
  Rows next = blocks > 0 ? src.rows(0) : Rows{};
  for (int b = 0; b < blocks; ++b) {
    const Rows cur = next;
    if (b + 1 < blocks) {
      next = src.rows(b + 1);
      src.prefetch(0, b + 1, next);
      src.prefetch(1, b + 1, next);
    }
    const int stage = b & 1;
    const uint32_t parity = (b >> 1) & 1;
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      sm90::mbar_wait(&s.k_free[stage][part], parity);
      src.fill(s, stage, part, b, cur);
    }
  }
  sm90::cp_async_wait_all();  // its last copies land before the warpgroup leaves
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
