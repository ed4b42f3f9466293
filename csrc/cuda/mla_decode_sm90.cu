// The SM90 split-KV decode kernel (FlashMLA's "seesaw" schedule) and its launcher, which also runs
// the combine kernel (mla_combine.cu) for requests that were split.
//
// Work unit: one CTA per (64-row tile, kv head, sm part) runs the pieces of its part (tile_md row)
// one after the other; a piece is a page range of one request. Q (64 rows x 576 channels) and two
// pages of K (64 tokens x 576; V is channels 0..511) sit in shared memory as 9 swizzled 64x64 tiles
// each, K arriving by TMA (one box per tile, 128-byte swizzle). Pieces that are a whole request
// write out/lse; split requests write fp32 partials to the accumulator workspace.
//
// The pages of a piece go in pairs: page A (even) into stage 0, page B (odd) into stage 1. Warpgroup 0 owns output channels
// 0..255 (O_L) and scores page A; warpgroup 1 owns channels 256..511 (O_R) and scores page B, each
// with wgmma m64n64k16 over all 64 tokens. Per pair:
//   WG0: S_A; m_a = max(m, rowmax S_A); P_A; O_L = O_L * 2^(m - m_a) + P_A V_A[:, L]  (P_A in registers)
//        publishes m_a and P_A (in page A's RoPE tile, which nothing reads after S_A)  -> barrier A
//   WG1: S_B; waits for m_a, P_A; O_R = O_R * 2^(m - m_a) + P_A V_A[:, R]  (P_A from shared memory)
//        m_b = max(m_a, rowmax S_B); P_B; publishes m_b and P_B (page B's RoPE tile) -> barrier B
//        O_R = O_R * 2^(m_a - m_b) + P_B V_B[:, R]  (P_B in registers)
//   WG0: waits for m_b, P_B; O_L = O_L * 2^(m_a - m_b) + P_B V_B[:, L]  (P_B from shared memory)
// so one warpgroup's softmax overlaps the other's matrix work, Q is read once per 64 scores instead
// of per 32, and no shared memory is added. Each warpgroup sums the P it computed; the two sums are
// added at the end of the piece.
//
// A stage is reloaded in two parts, each by the warpgroup that reads it last, as soon as that
// warpgroup's wgmma on it are done (no cross-warpgroup release): part w holds V channels
// [256 w, 256 w + 256) (tiles 4w..4w+3), and the RoPE tile, which holds the page's P, belongs to the
// part of the warpgroup that reads that P (warpgroup 1 for page A, warpgroup 0 for page B). So page
// A's next load starts in the middle of a pair instead of at its end. Each part completes on its
// own mbarrier; a warpgroup waits only on parts whose reload needs its own progress first, so a
// part's phase can never run two loads ahead of a waiter.
#include "cuda/decode_common.cuh"
#include "cuda/mla_kernels.h"
#include "cuda/wgmma_ops.cuh"

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
constexpr int kBarPageA = 1, kBarPageB = 2, kBarWarpgroup = 3;  // named barriers (kBarWarpgroup + wg)
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
// register order of wgmma's A operand (token step kk is p[4 kk .. 4 kk + 3]), also written to `tile`
// for the other warpgroup; adds the row sums to l. One FFMA and one MUFU.EX2 per score.
template <typename Elem>
__device__ __forceinline__ void make_p(const float* sc, float scale_log2, float base_lo, float base_hi,
                                       uint32_t* packed, uint8_t* tile, int r_lo, int col_q, float& l_lo, float& l_hi) {
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const bool hi = (i >> 1) & 1;
    const float base = hi ? base_hi : base_lo;
    const float p0 = exp2_approx(fmaf(sc[i], scale_log2, -base));
    const float p1 = exp2_approx(fmaf(sc[i + 1], scale_log2, -base));
    if (hi) l_hi += p0 + p1; else l_lo += p0 + p1;
    packed[i / 2] = pack2<Elem>(p0, p1);
    const int row = r_lo + (hi ? 8 : 0);
    const int col = (i / 4) * 8 + col_q;
    *reinterpret_cast<uint32_t*>(tile + swizzled_offset(row, col / 8) + (col % 8) * 2) = packed[i / 2];
  }
}

// The softmax step of one page: the running max (m, log2 units) moves to max(m, the page's raw row
// maxima mx times scale_log2); returns it in new_*, with the factor 2^(m - new max) that O and the
// row sums l must be rescaled by (applied to l here, to O by the caller), then makes P against it
// (make_p, adding its row sums to l).
template <typename Elem>
__device__ __forceinline__ void softmax_page(const float* sc, float scale_log2, float mx_lo, float mx_hi, float m_lo,
                                             float m_hi, uint32_t* packed, uint8_t* tile, int r_lo, int col_q,
                                             float& l_lo, float& l_hi, float& new_lo, float& new_hi, float& f_lo,
                                             float& f_hi) {
  new_lo = fmaxf(m_lo, mx_lo * scale_log2);
  new_hi = fmaxf(m_hi, mx_hi * scale_log2);
  f_lo = rescale_factor(m_lo, new_lo);
  f_hi = rescale_factor(m_hi, new_hi);
  l_lo *= f_lo;
  l_hi *= f_hi;
  make_p<Elem>(sc, scale_log2, exp_base(new_lo), exp_base(new_hi), packed, tile, r_lo, col_q, l_lo, l_hi);
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

// This warpgroup's scores S = Q K^T over all 64 tokens of the page in stage `stage` (each warpgroup
// scores its own stage: stage == wg), keys from key0, raw (unscaled) and masked, with their row
// maxima. Waits for both parts of the page first; on a tail page it then zeroes the rows past
// the length (those slots may hold NaN, and a masked P = 0 times V = NaN would still poison O).
template <typename Elem>
__device__ __forceinline__ void score_stage(SharedStorage& s, int stage, uint32_t parity, int len, int key0, int wtid,
                                            int col_q, int limit_lo, int limit_hi, float* sc, float& mx_lo,
                                            float& mx_hi) {
  mbar_wait(&s.k_full[stage][0], parity);
  mbar_wait(&s.k_full[stage][1], parity);
  if (len - key0 < kPageSize) {
    zero_tail_rows(s.k[stage], len - key0, wtid, 128);
    fence_proxy_async();
    bar_sync(kBarWarpgroup + stage, 128);
  }
  score_page<Ops<Elem>, 32>(smem_desc_sw128(s.q, 16, 1024), smem_desc_sw128(s.k[stage], 16, 1024), sc);
  mask_row_max<32>(sc, key0, col_q, limit_lo, limit_hi, mx_lo, mx_hi);
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

// Hands this thread's new running maxima of rows (r_lo, r_lo + 8) to the other warpgroup, with the P
// tile this warpgroup stored for it: the fence makes P visible to the async proxy (wgmma), then arrive.
__device__ __forceinline__ void publish_max(float* published, int r_lo, int lane, float m_lo, float m_hi,
                                            int barrier) {
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

template <typename Elem>
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

    for (int a = 0; a < n_pages; a += 2) {
      const bool has_b = a + 1 < n_pages;
      const int key_a = (page_begin + a) * kPageSize, key_b = key_a + kPageSize;
      // This warpgroup's first thread reloads its parts of both stages with the next pair; the
      // block-table reads start now so they are not on the reload's path.
      int next_a = 0, next_b = 0;
      if (wtid == 0) {
        if (a + 2 < n_pages) next_a = page_row_coord(p, req, page_begin + a + 2);
        if (a + 3 < n_pages) next_b = page_row_coord(p, req, page_begin + a + 3);
      }
      float sc[32];
      uint32_t packed[16];
      if (wg == 0) {
        // ---- warpgroup 0: scores and softmax of page A, then O_L += P_A V_A and P_B V_B ----
        float mx_lo, mx_hi;
        score_stage<Elem>(s, 0, uses[0] & 1, len, key_a, wtid, col_q, limit_lo, limit_hi, sc, mx_lo, mx_hi);
        float ma_lo, ma_hi, alpha_lo, alpha_hi;
        softmax_page<Elem>(sc, scale_log2, mx_lo, mx_hi, m_lo, m_hi, packed, s.k[0] + kPTile * kTileBytes, r_lo, col_q, l_lo, l_hi,
                           ma_lo, ma_hi, alpha_lo, alpha_hi);
        rescale_rows(o, alpha_lo, alpha_hi);
        publish_max(s.max_a, r_lo, lane, ma_lo, ma_hi, kBarPageA);
        m_lo = ma_lo;
        m_hi = ma_hi;

        pin_registers<128>(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) Ops<Elem>::values_rs(o, packed + 4 * kk, v_desc(s.k[0], 0, kk));
        wgmma_commit();
        // Stage 0's part 0 is done with once P_A V_A[:, L] is: reload it while warpgroup 1 works.
        finish_wgmma(o);
        pin_words<16>(packed);  // the RS wgmma read them until now
        if (wtid == 0 && a + 2 < n_pages) issue_part(s, 0, 0, &k_map, next_a, kv_head, policy);
        if (has_b) {
          bar_sync(kBarPageB, 2 * 128);
          // Page B's bytes reach this warpgroup through warpgroup 1's wait and the barrier; waiting on
          // the (already completed) phase of the part it reads makes the TMA writes visible to it
          // directly. Safe: only this warpgroup reloads that part, below.
          mbar_wait(&s.k_full[1][0], uses[1] & 1);
          adopt_max(s.max_b, r_lo, o, m_lo, m_hi, l_lo, l_hi);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) Ops<Elem>::values_ss(o, p_desc(s.k[1], kk), v_desc(s.k[1], 0, kk));
          wgmma_commit();
          finish_wgmma(o);
          if (wtid == 0 && a + 3 < n_pages) issue_part(s, 1, 0, &k_map, next_b, kv_head, policy);
        }
      } else {
        // ---- warpgroup 1: scores of page B, O_R += P_A V_A, softmax of page B, O_R += P_B V_B ----
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        if (has_b) {
          score_stage<Elem>(s, 1, uses[1] & 1, len, key_b, wtid, col_q, limit_lo, limit_hi, sc, mx_lo, mx_hi);
        }
        bar_sync(kBarPageA, 2 * 128);
        mbar_wait(&s.k_full[0][1], uses[0] & 1);  // as warpgroup 0 does for page B: completed already
        adopt_max(s.max_a, r_lo, o, m_lo, m_hi, l_lo, l_hi);
        pin_registers<128>(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) Ops<Elem>::values_ss(o, p_desc(s.k[0], kk), v_desc(s.k[0], 1, kk));
        wgmma_commit();
        if (has_b) {
          float mb_lo, mb_hi, beta_lo, beta_hi;
          softmax_page<Elem>(sc, scale_log2, mx_lo, mx_hi, m_lo, m_hi, packed, s.k[1] + kPTile * kTileBytes, r_lo, col_q, l_lo,
                             l_hi, mb_lo, mb_hi, beta_lo, beta_hi);
          publish_max(s.max_b, r_lo, lane, mb_lo, mb_hi, kBarPageB);
          // Stage 0's part 1 (V_A[:, R] and P_A) is done with once P_A V_A[:, R] is.
          finish_wgmma(o);
          if (wtid == 0 && a + 2 < n_pages) issue_part(s, 0, 1, &k_map, next_a, kv_head, policy);
          rescale_rows(o, beta_lo, beta_hi);
          m_lo = mb_lo;
          m_hi = mb_hi;
          pin_registers<128>(o);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) Ops<Elem>::values_rs(o, packed + 4 * kk, v_desc(s.k[1], 1, kk));
          wgmma_commit();
          finish_wgmma(o);
          pin_words<16>(packed);  // the RS wgmma read them until now
          if (wtid == 0 && a + 3 < n_pages) issue_part(s, 1, 1, &k_map, next_b, kv_head, policy);
        } else {
          finish_wgmma(o);
        }
      }
      ++uses[0];
      if (has_b) ++uses[1];
    }

    finish_piece<Elem>(p, o, s.row_sum, req, piece.split, kv_head, row0, r_lo, wg, lane, l_lo, l_hi, m_lo, m_hi,
                       [&] {
                         if (req < last_req) start_piece(req + 1);
                       });
  }
}

template <typename Elem>
cudaError_t launch_typed(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  if (cudaError_t err = allow_dynamic_smem<decode_kernel<Elem>>(kSmemBytes); err != cudaSuccess) return err;
  // Row tiles innermost: the CTAs that read the same pages (one per row tile) get adjacent ids.
  // 2.6-3.4% faster on the multi-tile cases than parts innermost (H200, docs/performance.md).
  const dim3 grid(ceil_div(p.rows_per_head_k, kRowsPerTile), p.num_heads_k, p.num_sm_parts);
  decode_kernel<Elem><<<grid, kThreads, kSmemBytes, stream>>>(k_map, p);
  return cudaGetLastError();
}

}  // namespace sm90

cudaError_t launch_decode(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  const cudaError_t err = p.dtype == ElementType::kBF16 ? sm90::launch_typed<__nv_bfloat16>(p, k_map, stream)
                                                        : sm90::launch_typed<__half>(p, k_map, stream);
  if (err != cudaSuccess) return err;
  return launch_combine(p, stream);
}

}  // namespace jax_flashmla
