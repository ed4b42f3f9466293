// The online softmax of the decode kernel: masking, row maxima, the exponent base, P = 2^(S - base)
// and the rescaling of O and the row sums when the base moves. Maxima and bases are in log2 units
// (the raw scores times softmax_scale * log2(e)).
#pragma once

#include <cmath>

#include "common/mla_params.h"
#include "cuda/decode/traits.h"

namespace jax_flashmla {
namespace sm90 {

// The online-softmax state of a thread's two rows (r_lo, r_lo + 8): the exponent base m (the
// running max, log2 units; -inf before the row has seen a key) and this thread's partial row sum l
// of 2^(score - m) over the columns it holds.
struct RowState {
  float m_lo, m_hi;
  float l_lo, l_hi;
};

// Exclusive ends of the keys a thread's two rows see.
struct RowLimits {
  int lo, hi;
};

// Exclusive end of the keys that query row `row` (of this kv head) sees.
__device__ __forceinline__ int key_limit(const DecodeParams& p, int len, int row) {
  if (!p.causal) return len;
  const int token = query_token(p, row);
  return min(max(len - p.seqlen_q + token + 1, 0), len);
}

// 2^x by the SFU's approximate instruction (relative error about 2^-22, far below what the 16-bit P
// keeps); -inf gives +0. exp2f adds a range reduction that the softmax does not need.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Masks keys at or past each row's limit in a raw score fragment (to -inf) and returns the row
// maxima of the raw scores over the warpgroup's columns. The fragment holds kValues accumulators of
// a 64 x (2 kValues) wgmma tile (rows r_lo, r_lo + 8); `key0` is the key of its first column. The
// per-key compares run only in warps that hold a limit inside the fragment (the last pages).
// The softmax scale is applied later, folded into the exponent (it is positive, so maxima agree).
// fmaxf skips NaN scores; they reach the row sums through make_p instead.
template <int kValues>
__device__ __forceinline__ RowPair mask_row_max(float* sc, int key0, int col_q, RowLimits limit) {
  if (__any_sync(0xffffffffu, key0 + 2 * kValues > min(limit.lo, limit.hi))) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) {
      const int key = key0 + (i / 4) * 8 + col_q + (i & 1);
      if (key >= (((i >> 1) & 1) ? limit.hi : limit.lo)) sc[i] = -INFINITY;
    }
  }
  RowPair mx{-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    if ((i >> 1) & 1) mx.hi = fmaxf(mx.hi, sc[i]); else mx.lo = fmaxf(mx.lo, sc[i]);
  }
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    mx.lo = fmaxf(mx.lo, __shfl_xor_sync(0xffffffff, mx.lo, d));
    mx.hi = fmaxf(mx.hi, __shfl_xor_sync(0xffffffff, mx.hi, d));
  }
  return mx;
}

// A row that has seen no key keeps max -inf; exponents are taken against 0 then, giving 0, not NaN.
__device__ __forceinline__ float exp_base(float m) { return m == -INFINITY ? 0.f : m; }

// The factor 2^(m_old - m_new) that moves sums taken against the running max m_old to m_new
// (log2 units); exactly 1 when the max did not move, so rescale_rows can skip the work.
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return m_old == m_new ? 1.f : exp2_approx(m_old - exp_base(m_new));
}

// Rescales the rows of a 64x256 output fragment (rows r_lo and r_lo + 8 of this thread) by a.lo and
// a.hi. The whole warp skips it when no factor of its 16 rows differs from 1 (x * 1 == x): once the
// row maxima settle most pages change none of them. Call with the warp converged.
__device__ __forceinline__ void rescale_rows(float* o, RowPair a) {
  if (!__any_sync(0xffffffffu, a.lo != 1.f || a.hi != 1.f)) return;
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] *= ((i >> 1) & 1) ? a.hi : a.lo;
}

// P = 2^(S scale_log2 - base) (S the raw scores, base in log2 units) packed to 16 bits, in the
// register order of wgmma's A operand (token step kk is p[4 kk .. 4 kk + 3]); adds the row sums to
// the state's l. One FFMA and one MUFU.EX2 per score.
template <typename Elem>
__device__ __forceinline__ void make_p(const float* sc, float scale_log2, RowPair base, uint32_t* packed,
                                       RowState& st) {
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const bool hi = (i >> 1) & 1;
    const float b = hi ? base.hi : base.lo;
    const float p0 = exp2_approx(fmaf(sc[i], scale_log2, -b));
    const float p1 = exp2_approx(fmaf(sc[i + 1], scale_log2, -b));
    if (hi) st.l_hi += p0 + p1; else st.l_lo += p0 + p1;
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

// The softmax step of this warpgroup's page: the exponent base moves by next_base with the page's
// raw row maxima `mx` times scale_log2, l is rescaled to the new base, and P is taken against it
// (make_p, adding to l). Returns the factor 2^(old base - new base) that O must be rescaled by.
template <typename Elem>
__device__ __forceinline__ RowPair softmax_page(const float* sc, float scale_log2, RowPair mx, RowState& st,
                                                uint32_t* packed) {
  const float new_lo = next_base(st.m_lo, mx.lo * scale_log2);
  const float new_hi = next_base(st.m_hi, mx.hi * scale_log2);
  const RowPair f{rescale_factor(st.m_lo, new_lo), rescale_factor(st.m_hi, new_hi)};
  st.l_lo *= f.lo;
  st.l_hi *= f.hi;
  st.m_lo = new_lo;
  st.m_hi = new_hi;
  make_p<Elem>(sc, scale_log2, RowPair{exp_base(new_lo), exp_base(new_hi)}, packed, st);
  return f;
}

// Moves this thread's rows to the running maxima the other warpgroup published for them in
// `published`: O and the row sums are rescaled by 2^(m - new max).
__device__ __forceinline__ void adopt_max(const float* published, int r_lo, float* o, RowState& st) {
  const float new_lo = published[r_lo], new_hi = published[r_lo + 8];
  const RowPair f{rescale_factor(st.m_lo, new_lo), rescale_factor(st.m_hi, new_hi)};
  rescale_rows(o, f);
  st.l_lo *= f.lo;
  st.l_hi *= f.hi;
  st.m_lo = new_lo;
  st.m_hi = new_hi;
}

}  // namespace sm90
}  // namespace jax_flashmla
