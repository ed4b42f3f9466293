// The end of the seesaw sparse decode tile: the two warpgroups' row sums are joined, then each
// warpgroup stores its 256 channels of either the request's out (bfloat16, the sink applied) and,
// from warpgroup 0, its natural-log lse ([b, h_q, s_q]); or, for one split of the entries, the fp32
// partial O and its lse for the combine (no sink: the combine applies it once). The rules are the
// mma.sync kernel's (sparse_common/epilogue.cuh): a row that read nothing (l = 0) gets out 0 and
// lse +inf, or in a partial O 0 and lse -inf (a weight of 0 in the combine); NaN in l (NaN in q, or in
// a token the row reads) gives NaN in out and lse.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "common/sparse_params.h"
#include "cuda/decode/softmax.cuh"
#include "cuda/sparse_decode/loads.cuh"
#include "cuda/sparse_decode_seesaw/config.h"
#include "cuda/sparse_prefill/epilogue.cuh"
#include "cuda/sparse_prefill/schedule.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

// `st` holds this thread's partial row sums over its own columns and blocks. The two consumer
// warpgroups (kThreads threads) call it; kProducerFed: a producer warpgroup, which does not, exists.
template <bool kProducerFed, int kDqk>
__device__ __forceinline__ void finish_tile(const SparseDecodeParams& p, prefill::SharedStorage<kDqk>& s,
                                            const float* o, const sm90::ThreadCoord& t, sm90::RowState st,
                                            const DecodeCta& tp) {
  prefill::publish_row_sums(s, t, st);
  prefill::consumers_sync<kProducerFed>();
  const bool partial = p.num_splits > 1;
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads_q;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = t.r_lo + 8 * half;
    if (r >= tp.rows) continue;
    const float l = s.row_sum[0][r] + s.row_sum[1][r];
    const float base = half ? st.m_hi : st.m_lo;  // log2 units; both warpgroups share it at the end
    const bool empty = l == 0.f;
    float inv = empty ? 0.f : 1.f / l;
    const float lse_log2 = base + log2f(l);
    if (partial) {
      const int64_t row = tp.split * rows_total + tp.qo_row0 + r;
      float* acc = p.o_accum + row * kHeadDimV + t.wg * 256 + t.col_q;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int i = j * 4 + half * 2;
        *reinterpret_cast<float2*>(acc + j * 8) = make_float2(o[i] * inv, o[i + 1] * inv);
      }
      if (t.wg == 0 && t.lane % 4 == 0) p.lse_accum[row] = empty ? -INFINITY : lse_log2 * 0.6931471805599453f;
      continue;
    }
    const float lse = empty ? INFINITY : lse_log2 * 0.6931471805599453f;
    // exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)); sink +inf gives 0, -inf 1.
    if (!empty && p.attn_sink != nullptr) inv *= 1.f / (1.f + expf(p.attn_sink[tp.head0 + r] - lse));
    __nv_bfloat16* out =
        reinterpret_cast<__nv_bfloat16*>(p.out) + (tp.qo_row0 + r) * kHeadDimV + t.wg * 256 + t.col_q;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int i = j * 4 + half * 2;
      *reinterpret_cast<__nv_bfloat162*>(out + j * 8) = __floats2bfloat162_rn(o[i] * inv, o[i + 1] * inv);
    }
    if (t.wg == 0 && t.lane % 4 == 0) {
      p.lse[(static_cast<int64_t>(tp.req) * p.num_heads_q + tp.head0 + r) * p.seqlen_q + tp.token] = lse;
    }
  }
}

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
