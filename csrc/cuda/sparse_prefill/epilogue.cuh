// The end of the sparse prefill tile: the two warpgroups' row sums and exact row maxima are joined,
// and each warpgroup stores its 256 channels of out (bfloat16), warpgroup 0 the natural-log lse and
// max_logits. A row that read no entry gets out 0, lse +inf and max_logits -inf, whatever the sink;
// NaN in the scores (NaN in q or in a row the token reads) gives NaN in all three, and so does a row
// whose read scores are all -inf or whose max is +inf (a non-finite q, or a scale that overflows), as
// in the reference.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "common/sparse_params.h"
#include "cuda/decode/softmax.cuh"
#include "cuda/sparse_prefill/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

// Where the tile's rows go: row r is head head0 + r of the token, at row qo_row0 + r of out, lse and
// max_logits; rows past `rows` are never written.
struct TileRows {
  int64_t qo_row0;
  int head0;
  int rows;
};

// Sums this thread's row sums over its quad (the row's columns of this warpgroup) and stores them in
// s.row_sum[warpgroup] for the join of the two warpgroups; the caller then synchronises.
template <int kDqk>
__device__ __forceinline__ void publish_row_sums(SharedStorage<kDqk>& s, const sm90::ThreadCoord& t,
                                                 sm90::RowState& st) {
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    st.l_lo += __shfl_xor_sync(0xffffffffu, st.l_lo, d);
    st.l_hi += __shfl_xor_sync(0xffffffffu, st.l_hi, d);
  }
  if (t.lane % 4 == 0) {
    s.row_sum[t.wg][t.r_lo] = st.l_lo;
    s.row_sum[t.wg][t.r_lo + 8] = st.l_hi;
  }
}

// `st` holds this thread's partial row sums over its own columns and blocks, `row_max` its
// warpgroup's exact row maxima (log2 units); `any_read`: the token reads at least one entry. The two
// consumer warpgroups (kThreads threads) call it.
template <bool kProducerFed = false, int kDqk>
__device__ __forceinline__ void finish_tile(const SparsePrefillParams& p, SharedStorage<kDqk>& s, const float* o,
                                            const sm90::ThreadCoord& t, sm90::RowState st, sm90::RowPair row_max,
                                            bool any_read, const TileRows& tr) {
  publish_row_sums(s, t, st);
  if (t.lane % 4 == 0) {
    s.row_max[t.wg][t.r_lo] = row_max.lo;
    s.row_max[t.wg][t.r_lo + 8] = row_max.hi;
  }
  // Over the two consumer warpgroups (kProducerFed: the producer warpgroup has left).
  const bool token_reads = kProducerFed ? sm90::bar_sync_or(kBarConsumers, kThreads, any_read)
                                        : __syncthreads_or(any_read);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = t.r_lo + 8 * half;
    if (r >= tr.rows) continue;
    float l = s.row_sum[0][r] + s.row_sum[1][r];
    const float mx = fmaxf(s.row_max[0][r], s.row_max[1][r]);
    const float base = half ? st.m_hi : st.m_lo;
    if (token_reads && l == 0.f) l = NAN;
    const bool empty = l == 0.f;
    float inv = empty ? 0.f : 1.f / l;
    const float lse = empty ? INFINITY : (base + log2f(l)) * 0.6931471805599453f;
    // exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)); sink +inf gives 0, -inf 1.
    if (!empty && p.attn_sink != nullptr) inv *= 1.f / (1.f + expf(p.attn_sink[tr.head0 + r] - lse));
    const int64_t row = tr.qo_row0 + r;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + t.wg * 256 + t.col_q;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int i = j * 4 + half * 2;
      *reinterpret_cast<__nv_bfloat162*>(out + j * 8) = __floats2bfloat162_rn(o[i] * inv, o[i + 1] * inv);
    }
    if (t.wg == 0 && t.lane % 4 == 0) {
      p.lse[row] = lse;
      if (p.max_logits != nullptr) p.max_logits[row] = isnan(l) ? l : mx * 0.6931471805599453f;
    }
  }
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
