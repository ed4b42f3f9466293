// The SM90 split-KV decode kernel (FlashMLA's "seesaw" schedule) and its launcher, which also runs
// the combine kernel (mla_combine.cu) for requests that were split.
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
#include "cuda/decode_common.cuh"
#include "cuda/mla_kernels.h"
#include "cuda/wgmma_ops.cuh"

#include <type_traits>

namespace jax_flashmla {
namespace sm90 {

struct SharedStorage {
  alignas(1024) uint8_t q[kBlockBytes];     // Q tile, 9 swizzled tiles of 64 rows x 64 channels
  alignas(1024) uint8_t k[2][kBlockBytes];  // stage 0: even pages (A), stage 1: odd pages (B)
  float max_a[kRowsPerTile];                // running max after page A (published by warpgroup 0)
  float max_b[kRowsPerTile];                // running max after page B (published by warpgroup 1)
  float row_sum[2][kRowsPerTile];           // per-warpgroup row sums, at the end of a piece
  uint64_t k_full[2][2];                    // TMA completion of [stage][part] (see the header)
};

constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;  // + room to align the dynamic base
// Named barriers of the pair hand-offs (see the header), and kBarWarpgroup + wg for one warpgroup.
constexpr int kBarMaxA = 1, kBarMaxB = 2, kBarWarpgroup = 3;
constexpr int kPTile = kChannelTiles - 1;  // the RoPE tile of a page, reused for that page's P

template <typename Elem>
struct Ops;
template <>
struct Ops<__nv_bfloat16> {
  __device__ static void scores(float* d, uint64_t a, uint64_t b, int acc) { wgmma_m64n64k16_ss_Bf16<0>(d, a, b, acc); }
  __device__ static void values_rs(float* d, const uint32_t* a, uint64_t b) { wgmma_m64n256k16_rs_Bf16<1>(d, a, b, 1); }
  __device__ static void values_ss(float* d, uint64_t a, uint64_t b) { wgmma_m64n256k16_ss_Bf16<1>(d, a, b, 1); }
};
template <>
struct Ops<__half> {
  __device__ static void scores(float* d, uint64_t a, uint64_t b, int acc) { wgmma_m64n64k16_ss_F16<0>(d, a, b, acc); }
  __device__ static void values_rs(float* d, const uint32_t* a, uint64_t b) { wgmma_m64n256k16_rs_F16<1>(d, a, b, 1); }
  __device__ static void values_ss(float* d, uint64_t a, uint64_t b) { wgmma_m64n256k16_ss_F16<1>(d, a, b, 1); }
};

template <int kCount>
__device__ __forceinline__ void pin_words(uint32_t* r) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// P = 2^(S scale_log2 - base) (S the raw scores, base in log2 units) packed to 16 bits, in the
// register order of wgmma's A operand (token step kk is p[4 kk .. 4 kk + 3]); adds the row sums to
// l. One FFMA and one MUFU.EX2 per score.
template <typename Elem>
__device__ __forceinline__ void make_p(const float* sc, float scale_log2, float base_lo, float base_hi,
                                       uint32_t* packed, float& l_lo, float& l_hi) {
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const bool hi = (i >> 1) & 1;
    const float base = hi ? base_hi : base_lo;
    const float p0 = exp2_approx(fmaf(sc[i], scale_log2, -base));
    const float p1 = exp2_approx(fmaf(sc[i + 1], scale_log2, -base));
    if (hi) l_hi += p0 + p1; else l_lo += p0 + p1;
    packed[i / 2] = pack2<Elem>(p0, p1);
  }
}

// How far (log2 units) a page's row max may exceed the exponent base before the base moves: P is
// then at most 2^8, which bf16, fp16 and the fp32 sums hold with the same relative precision, and
// O is rescaled only when a row's max jumps by more than that (once per row in most sequences).
constexpr float kMaxSlack = 8.f;

// The exponent base after a page with scaled row max `page_max`: unchanged unless the page exceeds
// it by more than kMaxSlack (a base of -inf, a row with no key yet, moves to any finite max).
__device__ __forceinline__ float next_base(float base, float page_max) {
  return page_max > base + kMaxSlack ? page_max : base;
}

// The softmax step of this warpgroup's page: the exponent base (m, log2 units) moves by next_base
// with the page's raw row maxima mx times scale_log2, returned in new_*, with the factor
// 2^(m - new base) that O must be rescaled by (l is rescaled here); then P against it (make_p,
// adding to l).
template <typename Elem>
__device__ __forceinline__ void softmax_page(const float* sc, float scale_log2, float mx_lo, float mx_hi, float m_lo,
                                             float m_hi, uint32_t* packed, float& l_lo, float& l_hi, float& new_lo,
                                             float& new_hi, float& f_lo, float& f_hi) {
  new_lo = next_base(m_lo, mx_lo * scale_log2);
  new_hi = next_base(m_hi, mx_hi * scale_log2);
  f_lo = rescale_factor(m_lo, new_lo);
  f_hi = rescale_factor(m_hi, new_hi);
  l_lo *= f_lo;
  l_hi *= f_hi;
  make_p<Elem>(sc, scale_log2, exp_base(new_lo), exp_base(new_hi), packed, l_lo, l_hi);
}

// Stores a packed P fragment (make_p's order) into a page's P tile for the other warpgroup.
__device__ __forceinline__ void store_p(const uint32_t* packed, uint8_t* stage, int r_lo, int col_q) {
  uint8_t* tile = stage + kPTile * kTileBytes;
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int row = r_lo + (((i >> 1) & 1) ? 8 : 0);
    const int col = (i / 4) * 8 + col_q;
    *reinterpret_cast<uint32_t*>(tile + swizzled_offset(row, col / 8) + (col % 8) * 2) = packed[i / 2];
  }
}

// P in a stage's RoPE tile, token step kk: the K-major A operand of PV.
__device__ __forceinline__ uint64_t p_desc(const uint8_t* stage, int kk) {
  return desc_advance(smem_desc_sw128(stage + kPTile * kTileBytes, 16, 1024), kk * 32);
}

// Loads part `w` of page `row_coord` into `stage` (see the header): V tiles 4w..4w+3, plus the RoPE
// tile when w is the warpgroup that reads this stage's P (1 for stage 0, 0 for stage 1).
__device__ __forceinline__ void issue_part(SharedStorage& s, int stage, int w, const CUtensorMap* map,
                                           int row_coord, int kv_head, uint64_t policy) {
  const bool rope = w == 1 - stage;
  uint64_t* full = &s.k_full[stage][w];
  mbar_arrive_expect_tx(full, (4 + rope) * kTileBytes);
#pragma unroll
  for (int t = 4 * w; t < 4 * w + 4; ++t) {
    tma_load_3d(s.k[stage] + t * kTileBytes, map, full, t * kChannelTile, kv_head, row_coord, policy);
  }
  if (rope) tma_load_3d(s.k[stage] + kPTile * kTileBytes, map, full, kPTile * kChannelTile, kv_head, row_coord, policy);
}

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

// On a request's last page, zeroes this warpgroup's V tiles (4 wg .. 4 wg + 3) in the key rows past
// the length before its P V reads them: those slots may hold NaN, and P = 0 times NaN is NaN. (Q K^T
// needs no zeroing: the scores of those keys are masked to -inf.)
__device__ __forceinline__ void zero_tail_values(uint8_t* stage, int valid, int wg, int wtid) {
  if (valid >= kPageSize) return;
  for (int i = wtid; i < (kPageSize - valid) * 4 * 8; i += 128) {
    const int r = valid + i / 32, chunk = i % 32;
    *reinterpret_cast<uint4*>(stage + (4 * wg + chunk / 8) * kTileBytes + swizzled_offset(r, chunk % 8)) =
        make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async();
  bar_sync(kBarWarpgroup + wg, 128);
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

// Moves this thread's rows (r_lo, r_lo + 8) to the running maxima the other warpgroup published
// for them in `published`: O and the row sums are rescaled by 2^(m - new max).
__device__ __forceinline__ void adopt_max(const float* published, int r_lo, float* o, float& m_lo, float& m_hi,
                                          float& l_lo, float& l_hi) {
  const float new_lo = published[r_lo], new_hi = published[r_lo + 8];
  const float f_lo = rescale_factor(m_lo, new_lo), f_hi = rescale_factor(m_hi, new_hi);
  rescale_rows(o, f_lo, f_hi);
  l_lo *= f_lo;
  l_hi *= f_hi;
  m_lo = new_lo;
  m_hi = new_hi;
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
  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128, lane = tid % 32;
  const int r_lo = wtid / 32 * 16 + lane / 4;  // this thread's two accumulator rows: r_lo, r_lo + 8
  const int col_q = 2 * (lane % 4);            // first of its two columns in each 8-column chunk
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  if (tid == 0) {
    prefetch_tensor_map(&k_map);  // the first piece's loads would otherwise wait for it
    for (int i = 0; i < 2; ++i) {
      for (int w = 0; w < 2; ++w) mbar_init(&s.k_full[i][w], 1);
    }
    fence_mbar_init();
  }
  __syncthreads();
  allow_dependent_launch();  // the combine kernel waits for this grid's completion itself
  const uint64_t policy = evict_first_policy();

  const int32_t* md = p.tile_md + static_cast<int64_t>(part) * kTileMetadataSize;
  uint32_t uses[2] = {0, 0};  // pages each stage has held so far: the parity of its mbarrier phases

  const int first_req = max(md[kMdBeginReq], 0), last_req = min(md[kMdEndReq], p.batch - 1);
  // Issues piece `r`'s first loads: its first two pages (thread 0) and its Q tile (all threads).
  // The first piece's start here; each later one's from the end of the piece before it, so that
  // its loads overlap that piece's output store.
  auto start_piece = [&](int r) {
    if (tid == 0) {
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

    const int limit_lo = key_limit(p, len, row0 + r_lo), limit_hi = key_limit(p, len, row0 + r_lo + 8);
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    // One pair of pages, pages a and a + 1 (see the header). kNext: a later pair follows (so this
    // one has page B and no partial page); kHasB: page a + 1 is in the piece.
    auto wg0_pair = [&](auto next_tag, auto has_b_tag, int a) {
      constexpr bool kNext = decltype(next_tag)::value, kHasB = decltype(has_b_tag)::value;
      const int key_a = (page_begin + a) * kPageSize;
      const uint32_t phase_a = uses[0] & 1;
      int next_a = 0, next_b = 0;  // the next pair's pages, read before they are needed
      if (kNext && wtid == 0) {
        next_a = page_row_coord(p, req, page_begin + a + 2);
        if (a + 3 < n_pages) next_b = page_row_coord(p, req, page_begin + a + 3);
      }
      float sc[32];
      scores_of_stage<Elem, kByPart>(s, 0, phase_a, sc);
      float mx_lo, mx_hi;
      mask_row_max<32>(sc, key_a, col_q, limit_lo, limit_hi, mx_lo, mx_hi);
      uint32_t packed[16];
      float ma_lo, ma_hi, alpha_lo, alpha_hi;
      softmax_page<Elem>(sc, scale_log2, mx_lo, mx_hi, m_lo, m_hi, packed, l_lo, l_hi, ma_lo, ma_hi, alpha_lo, alpha_hi);
      hand_off(packed, s.k[0], s.max_a, r_lo, col_q, lane, ma_lo, ma_hi, kBarMaxA);
      rescale_rows(o, alpha_lo, alpha_hi);
      m_lo = ma_lo;
      m_hi = ma_hi;
      if constexpr (!kHasB) zero_tail_values(s.k[0], len - key_a, 0, wtid);
      values_from_registers<Elem>(o, packed, s.k[0], 0);
      // Stage 0's part 0 is done with once P_A V_A[:, L] is.
      if (kNext && wtid == 0) issue_part(s, 0, 0, &k_map, next_a, kv_head, policy);
      if constexpr (kHasB) {
        bar_sync(kBarMaxB, 2 * 128);
        adopt_max(s.max_b, r_lo, o, m_lo, m_hi, l_lo, l_hi);
        if constexpr (!kNext) zero_tail_values(s.k[1], len - key_a - kPageSize, 0, wtid);
        issue_values_from_shared<Elem>(o, s.k[1], 0);
        finish_wgmma(o);
        if (kNext && wtid == 0 && a + 3 < n_pages) issue_part(s, 1, 0, &k_map, next_b, kv_head, policy);
      }
    };

    auto wg1_pair = [&](auto next_tag, auto has_b_tag, int a) {
      constexpr bool kNext = decltype(next_tag)::value, kHasB = decltype(has_b_tag)::value;
      const int key_a = (page_begin + a) * kPageSize, key_b = key_a + kPageSize;
      const uint32_t phase_b = uses[1] & 1;
      int next_a = 0, next_b = 0;
      if (kNext && wtid == 0) {
        next_a = page_row_coord(p, req, page_begin + a + 2);
        if (a + 3 < n_pages) next_b = page_row_coord(p, req, page_begin + a + 3);
      }
      float sc[32], mx_lo = -INFINITY, mx_hi = -INFINITY;
      if constexpr (kHasB) {
        scores_of_stage<Elem, kByPart>(s, 1, phase_b, sc);
        mask_row_max<32>(sc, key_b, col_q, limit_lo, limit_hi, mx_lo, mx_hi);
      }
      bar_sync(kBarMaxA, 2 * 128);
      adopt_max(s.max_a, r_lo, o, m_lo, m_hi, l_lo, l_hi);
      if constexpr (!kHasB) zero_tail_values(s.k[0], len - key_a, 1, wtid);
      issue_values_from_shared<Elem>(o, s.k[0], 1);
      if constexpr (kHasB) {
        uint32_t packed[16];
        float mb_lo, mb_hi, beta_lo, beta_hi;
        softmax_page<Elem>(sc, scale_log2, mx_lo, mx_hi, m_lo, m_hi, packed, l_lo, l_hi, mb_lo, mb_hi, beta_lo, beta_hi);
        hand_off(packed, s.k[1], s.max_b, r_lo, col_q, lane, mb_lo, mb_hi, kBarMaxB);
        // Stage 0's part 1 (V_A[:, R] and P_A) is done with once P_A V_A[:, R] is.
        finish_wgmma(o);
        if (kNext && wtid == 0) issue_part(s, 0, 1, &k_map, next_a, kv_head, policy);
        rescale_rows(o, beta_lo, beta_hi);
        m_lo = mb_lo;
        m_hi = mb_hi;
        if constexpr (!kNext) zero_tail_values(s.k[1], len - key_b, 1, wtid);
        values_from_registers<Elem>(o, packed, s.k[1], 1);
        if (kNext && wtid == 0 && a + 3 < n_pages) issue_part(s, 1, 1, &k_map, next_b, kv_head, policy);
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
    if (wg == 0) walk_pairs(wg0_pair);
    else walk_pairs(wg1_pair);
    if (a < n_pages) ++uses[0];
    if (a + 1 < n_pages) ++uses[1];

    finish_piece<Elem>(p, o, s.row_sum, req, piece.split, kv_head, row0, r_lo, wg, lane, l_lo, l_hi, m_lo, m_hi,
                       [&] {
                         if (req < last_req) start_piece(req + 1);
                       });
  }
}

template <typename Elem, bool kByPart>
cudaError_t launch_kernel(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  if (cudaError_t err = allow_dynamic_smem<decode_kernel<Elem, kByPart>>(kSmemBytes); err != cudaSuccess) return err;
  // Row tiles innermost: the CTAs that read the same pages (one per row tile) get adjacent ids.
  // 2.6-3.4% faster on the multi-tile cases than parts innermost (H200, docs/performance.md).
  const dim3 grid(ceil_div(p.rows_per_head_k, kRowsPerTile), p.num_heads_k, p.num_sm_parts);
  decode_kernel<Elem, kByPart><<<grid, kThreads, kSmemBytes, stream>>>(k_map, p);
  return cudaGetLastError();
}

// Scores part by part when at most kMaxTilesByPart row tiles share each page: then the K loads
// are the wait. With more, the tiles' CTAs find the pages in L2 and the tensor pipe is the limit.
// (H200 A/Bs, docs/performance.md, thirteenth session: part by part 0 to +1.4% at one tile; at two
// -0.1 to +3.4% for s_k <= 8192, -1.5 to +1.5% at 16384; at four 0.2-5.5% slower, more at longer s_k.)
constexpr int kMaxTilesByPart = 2;

template <typename Elem>
cudaError_t launch_typed(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  return ceil_div(p.rows_per_head_k, kRowsPerTile) <= kMaxTilesByPart ? launch_kernel<Elem, true>(p, k_map, stream)
                                                                        : launch_kernel<Elem, false>(p, k_map, stream);
}

}  // namespace sm90

cudaError_t launch_decode(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  const cudaError_t err = p.dtype == ElementType::kBF16 ? sm90::launch_typed<__nv_bfloat16>(p, k_map, stream)
                                                        : sm90::launch_typed<__half>(p, k_map, stream);
  if (err != cudaSuccess) return err;
  return launch_combine(p, stream);
}

}  // namespace jax_flashmla
