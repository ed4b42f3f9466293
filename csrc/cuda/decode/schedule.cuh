// The SM90 split-KV decode kernel: FlashMLA's "seesaw" schedule of two warpgroups over pairs of
// pages. Its parts: config.h (tile sizes, shared memory), traits.h (layouts, wgmma ops), loads.cuh,
// softmax.cuh, epilogue.cuh; launch.cuh launches it, decode_bf16.cu / decode_fp16.cu instantiate it.
//
// Work unit: one CTA per (64-row tile, kv head, sm part) runs the pieces of its part (tile_md row)
// one after the other; a piece is a page range of one request. Q (64 rows x 576 channels) and two
// pages of K (64 tokens x 576; V is channels 0..511) sit in shared memory as 9 swizzled 64x64 tiles
// each, K arriving by TMA (one box per tile, 128-byte swizzle). Pieces that are a whole request
// write out/lse; split requests write fp32 partials to the accumulator workspace.
//
// The pages of a piece go in pairs: page A (even) into stage 0, page B (odd) into stage 1. Warpgroup
// 0 owns output channels 0..255 (O_L) and scores page A; warpgroup 1 owns channels 256..511 (O_R)
// and scores page B, each with wgmma m64n64k16 over all 64 tokens. Per pair:
//   WG0: m_a = next_base(m, rowmax S_A); P_A; publishes m_a and P_A (in page A's RoPE tile, which
//        nothing reads after S_A)                                                 -> barrier MaxA
//        O_L = O_L * 2^(m - m_a) + P_A V_A[:, L]  (P_A in registers)
//   WG1: waits for m_a, P_A; O_R = O_R * 2^(m - m_a) + P_A V_A[:, R]  (P_A from shared memory)
//        m_b = next_base(m_a, rowmax S_B); P_B; publishes m_b and P_B (page B's RoPE tile)
//                                                                                  -> barrier MaxB
//        O_R = O_R * 2^(m_a - m_b) + P_B V_B[:, R]  (P_B in registers)
//   WG0: waits for m_b, P_B; O_L = O_L * 2^(m_a - m_b) + P_B V_B[:, L]  (P_B from shared memory)
// (next_base: the running max, moved only when a page exceeds it by more than kMaxSlack) so one
// warpgroup's softmax overlaps the other's matrix work, Q is read once per 64 scores instead
// of per 32, and no shared memory is added. Each warpgroup sums the P it computed; the two sums are
// added at the end of the piece. Each warpgroup's S = Q K^T is issued and waited for at the start of
// its pair (by the stage's two load parts when few row tiles share a page: kMaxTilesByPart). The pair
// bodies are compile-time (a later pair? page B?), so no branch separates a wgmma from its wait, and
// the tail work (zeroing past the length) is only in the last pair's body.
//
// A stage is reloaded in two parts, each by the warpgroup that reads it last, as soon as that
// warpgroup's wgmma on it are done (no cross-warpgroup release): part w holds V channels
// [256 w, 256 w + 256) (tiles 4w..4w+3), and the RoPE tile, which holds the page's P, belongs to the
// part of the warpgroup that reads that P (warpgroup 1 for page A, warpgroup 0 for page B). So page
// A's next load starts in the middle of a pair instead of at its end. Each part completes on its
// own mbarrier; a warpgroup waits only on parts whose reload needs its own progress first, so a
// part's phase can never run two loads ahead of a waiter. A warpgroup that reads a part it did not
// wait for (the other's V half and P) sees its bytes through the other warpgroup's wait and the named
// barrier between them, as FlashMLA relies on; waiting on the completed phase as well cost 1-2%.
#pragma once

#include <type_traits>

#include "common/mla_contract.h"
#include "common/mla_params.h"
#include "cuda/decode/config.h"
#include "cuda/decode/epilogue.cuh"
#include "cuda/decode/loads.cuh"
#include "cuda/decode/softmax.cuh"
#include "cuda/decode/traits.h"

namespace jax_flashmla {
namespace sm90 {

// S = Q K^T of the page in `stage`, raw (unscaled); returns with the wgmma done. kByPart: part 0's
// tiles are issued as soon as part 0 has landed, while part 1 may still be loading (helps when the
// loads are the wait); otherwise one wait for both parts and one unbroken wgmma chain (helps when
// the tensor pipe is: the fence between the parts costs more than the early start gains).
template <typename Elem, bool kByPart>
__device__ __forceinline__ void scores_of_stage(SharedStorage& s, int stage, uint32_t parity, float* sc) {
  const uint64_t q_desc = smem_desc_sw128(s.q, 16, 1024), k_desc = smem_desc_sw128(s.k[stage], 16, 1024);
  if constexpr (kByPart) {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      mbar_wait(&s.k_full[stage][w], parity);
      wgmma_fence();  // after the wait loop: without it ptxas serializes every wgmma (C7520)
      const bool rope = w == 1 - stage;  // the part the RoPE tile comes with (issue_part)
#pragma unroll
      for (int j = 0; j < 5; ++j) {
        if (j == 4 && !rope) continue;
        const int t = j < 4 ? 4 * w + j : kPTile;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint32_t offset = t * kTileBytes + kk * 32;
          Ops<Elem>::scores(sc, desc_advance(q_desc, offset), desc_advance(k_desc, offset), (w | j | kk) != 0);
        }
      }
    }
  } else {
    mbar_wait(&s.k_full[stage][0], parity);
    mbar_wait(&s.k_full[stage][1], parity);
    wgmma_fence();  // after the wait loops: without it ptxas serializes every wgmma (C7520)
#pragma unroll
    for (int t = 0; t < kChannelTiles; ++t) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t offset = t * kTileBytes + kk * 32;
        Ops<Elem>::scores(sc, desc_advance(q_desc, offset), desc_advance(k_desc, offset), (t | kk) != 0);
      }
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  pin_registers<32>(sc);
}

// Hands the other warpgroup this thread's P fragment (into the page's P tile) and the new running
// maxima of rows (r_lo, r_lo + 8), then arrives on `barrier`; the fence makes P visible to wgmma.
__device__ __forceinline__ void hand_off(const uint32_t* packed, uint8_t* stage, float* published, int r_lo,
                                         int col_q, int lane, float m_lo, float m_hi, int barrier) {
  store_p(packed, stage, r_lo, col_q);
  if (lane % 4 == 0) {
    published[r_lo] = m_lo;
    published[r_lo + 8] = m_hi;
  }
  fence_proxy_async();
  bar_arrive(barrier, 2 * 128);
}

// Waits for this warpgroup's matrix work, keeping the accumulators live until it is done.
__device__ __forceinline__ void finish_wgmma(float* o) {
  wgmma_wait<0>();
  pin_registers<128>(o);
}

// Issues O += P V[:, this warpgroup's half] with P from the page's P tile (the other warpgroup's
// page) and commits it; the caller waits (finish_wgmma) when it needs O.
template <typename Elem>
__device__ __forceinline__ void issue_values_from_shared(float* o, const uint8_t* stage, int wg) {
  pin_registers<128>(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) Ops<Elem>::values_ss(o, p_desc(stage, kk), v_desc(stage, wg, kk));
  wgmma_commit();
}

// O += P V[:, this warpgroup's half] with P from registers (this warpgroup's own page), waited for.
template <typename Elem>
__device__ __forceinline__ void values_from_registers(float* o, uint32_t* packed, const uint8_t* stage, int wg) {
  pin_registers<128>(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) Ops<Elem>::values_rs(o, packed + 4 * kk, v_desc(stage, wg, kk));
  wgmma_commit();
  finish_wgmma(o);
  pin_words<16>(packed);  // the RS wgmma read them until now
}

template <typename Elem, bool kByPart>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ CUtensorMap k_map, const __grid_constant__ DecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  // Aligned by an offset from smem_raw (not by rounding a generic address), so the compiler still
  // knows these are shared-memory addresses and emits STS/LDS rather than generic stores.
  SharedStorage& s = *reinterpret_cast<SharedStorage*>(smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024);

  const int row0 = blockIdx.x * kRowsPerTile, kv_head = blockIdx.y, part = blockIdx.z;
  const ThreadCoord t = thread_coord();
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  if (t.tid == 0) {
    prefetch_tensor_map(&k_map);  // the first piece's loads would otherwise wait for it
    for (int i = 0; i < 2; ++i) {
      for (int w = 0; w < 2; ++w) mbar_init(&s.k_full[i][w], 1);
    }
    fence_mbar_init();
  }
  __syncthreads();
  // When launched as a dependent of the kernel before it in the stream (kDependentLaunch), the
  // prologue above overlaps that kernel's tail, and nothing it wrote (the plan, q, the cache) is read
  // before this wait returns: once that grid has completed and its writes are visible.
  if constexpr (kDependentLaunch) grid_dependency_wait();
  allow_dependent_launch();  // the combine kernel waits for this grid's completion itself
  const uint64_t policy = evict_first_policy();

  const int32_t* md = p.tile_md + static_cast<int64_t>(part) * kTileMetadataSize;
  uint32_t uses[2] = {0, 0};  // pages each stage has held so far: the parity of its mbarrier phases

  const int first_req = max(md[kMdBeginReq], 0), last_req = min(md[kMdEndReq], p.batch - 1);
  // Issues piece `r`'s first loads: its first two pages (thread 0) and its Q tile (all threads).
  // The first piece's start here; each later one's from the end of the piece before it, so that
  // its loads overlap that piece's output store.
  auto start_piece = [&](int r) {
    if (t.tid == 0) {
      const PieceRange next = piece_range(md, p, r);
      for (int i = 0; i < min(2, next.n_pages); ++i) {
        const int row_coord = page_row_coord(p, r, next.page_begin + i);
        for (int w = 0; w < 2; ++w) issue_part(s, i, w, &k_map, row_coord, kv_head, policy);
      }
    }
    start_q_tile(s.q, p, r, kv_head, row0);
  };
  if (first_req <= last_req) start_piece(first_req);

  for (int req = first_req; req <= last_req; ++req) {
    const PieceRange piece = piece_range(md, p, req);
    const int len = piece.len, page_begin = piece.page_begin, n_pages = piece.n_pages;

    cp_async_wait_all();  // this thread's part of the Q tile
    fence_proxy_async();
    __syncthreads();

    const RowLimits limit{key_limit(p, len, row0 + t.r_lo), key_limit(p, len, row0 + t.r_lo + 8)};
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    RowState st{-INFINITY, -INFINITY, 0.f, 0.f};

    // One pair of pages, pages a and a + 1 (see the header). kNext: a later pair follows (so this
    // one has page B and no partial page); kHasB: page a + 1 is in the piece.
    auto wg0_pair = [&](auto next_tag, auto has_b_tag, int a) {
      constexpr bool kNext = decltype(next_tag)::value, kHasB = decltype(has_b_tag)::value;
      const int key_a = (page_begin + a) * kPageSize;
      const uint32_t phase_a = uses[0] & 1;
      int next_a = 0, next_b = 0;  // the next pair's pages, read before they are needed
      if (kNext && t.wtid == 0) {
        next_a = page_row_coord(p, req, page_begin + a + 2);
        if (a + 3 < n_pages) next_b = page_row_coord(p, req, page_begin + a + 3);
      }
      float sc[32];
      scores_of_stage<Elem, kByPart>(s, 0, phase_a, sc);
      const RowPair mx = mask_row_max<32>(sc, key_a, t.col_q, limit);
      uint32_t packed[16];
      const RowPair alpha = softmax_page<Elem>(sc, scale_log2, mx, st, packed);
      hand_off(packed, s.k[0], s.max_a, t.r_lo, t.col_q, t.lane, st.m_lo, st.m_hi, kBarMaxA);
      rescale_rows(o, alpha);
      if constexpr (!kHasB) zero_tail_values(s.k[0], len - key_a, 0, t.wtid);
      values_from_registers<Elem>(o, packed, s.k[0], 0);
      // Stage 0's part 0 is done with once P_A V_A[:, L] is.
      if (kNext && t.wtid == 0) issue_part(s, 0, 0, &k_map, next_a, kv_head, policy);
      if constexpr (kHasB) {
        bar_sync(kBarMaxB, 2 * 128);
        adopt_max(s.max_b, t.r_lo, o, st);
        if constexpr (!kNext) zero_tail_values(s.k[1], len - key_a - kPageSize, 0, t.wtid);
        issue_values_from_shared<Elem>(o, s.k[1], 0);
        finish_wgmma(o);
        if (kNext && t.wtid == 0 && a + 3 < n_pages) issue_part(s, 1, 0, &k_map, next_b, kv_head, policy);
      }
    };

    auto wg1_pair = [&](auto next_tag, auto has_b_tag, int a) {
      constexpr bool kNext = decltype(next_tag)::value, kHasB = decltype(has_b_tag)::value;
      const int key_a = (page_begin + a) * kPageSize, key_b = key_a + kPageSize;
      const uint32_t phase_b = uses[1] & 1;
      int next_a = 0, next_b = 0;
      if (kNext && t.wtid == 0) {
        next_a = page_row_coord(p, req, page_begin + a + 2);
        if (a + 3 < n_pages) next_b = page_row_coord(p, req, page_begin + a + 3);
      }
      float sc[32];
      RowPair mx{-INFINITY, -INFINITY};
      if constexpr (kHasB) {
        scores_of_stage<Elem, kByPart>(s, 1, phase_b, sc);
        mx = mask_row_max<32>(sc, key_b, t.col_q, limit);
      }
      bar_sync(kBarMaxA, 2 * 128);
      adopt_max(s.max_a, t.r_lo, o, st);
      if constexpr (!kHasB) zero_tail_values(s.k[0], len - key_a, 1, t.wtid);
      issue_values_from_shared<Elem>(o, s.k[0], 1);
      if constexpr (kHasB) {
        uint32_t packed[16];
        const RowPair beta = softmax_page<Elem>(sc, scale_log2, mx, st, packed);
        hand_off(packed, s.k[1], s.max_b, t.r_lo, t.col_q, t.lane, st.m_lo, st.m_hi, kBarMaxB);
        // Stage 0's part 1 (V_A[:, R] and P_A) is done with once P_A V_A[:, R] is.
        finish_wgmma(o);
        if (kNext && t.wtid == 0) issue_part(s, 0, 1, &k_map, next_a, kv_head, policy);
        rescale_rows(o, beta);
        if constexpr (!kNext) zero_tail_values(s.k[1], len - key_b, 1, t.wtid);
        values_from_registers<Elem>(o, packed, s.k[1], 1);
        if (kNext && t.wtid == 0 && a + 3 < n_pages) issue_part(s, 1, 1, &k_map, next_b, kv_head, policy);
      } else {
        finish_wgmma(o);
      }
    };

    using Yes = std::true_type;
    using No = std::false_type;
    int a = 0;
    // The piece's pages in pairs: full pairs with a successor, then a last pair with or without page B.
    auto walk_pairs = [&](auto pair) {
      for (; a + 2 < n_pages; a += 2) {
        pair(Yes{}, Yes{}, a);
        ++uses[0];
        ++uses[1];
      }
      if (a + 1 < n_pages) pair(No{}, Yes{}, a);
      else if (a < n_pages) pair(No{}, No{}, a);
    };
    if (t.wg == 0) walk_pairs(wg0_pair);
    else walk_pairs(wg1_pair);
    if (a < n_pages) ++uses[0];
    if (a + 1 < n_pages) ++uses[1];

    const PieceCoord pc{req, piece.split, kv_head, row0, page_begin * kPageSize, n_pages};
    finish_piece<Elem>(p, o, s.row_sum, pc, t, st, limit, [&] {
      if (req < last_req) start_piece(req + 1);
    });
  }
}

}  // namespace sm90
}  // namespace jax_flashmla
