// The sparse decode kernel's epilogue: O / l, the attention sink, the bfloat16 store of out and the
// natural-log lse. A row with no read entry (l = 0) gets out 0 and lse +inf, whatever the sink; NaN
// in l (NaN in q, or in a token the row reads) gives NaN in both.
#pragma once

#include <cuda_bf16.h>

#include <cmath>

#include "common/sparse_params.h"
#include "cuda/sparse_decode/softmax.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {

// `out_row0` points at out[req, token, head0, 0], `lse_row0` at lse[req, head0, token] (heads are
// seqlen_q apart). `channel0` is the warp's first output channel; `rows` the tile's live heads.
template <class AccO, class CoordO>
__device__ __forceinline__ void store_tile(const AccO& acc_o, const CoordO& cO, RowState& st, const float* sink,
                                           int head0, int rows, int channel0, int seqlen_q, uint16_t* out_row0,
                                           float* lse_row0, bool write_lse) {
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(st.l[i]);
    const int r = get<0>(cO(0)) + 8 * i;
    float lse = INFINITY;
    inv[i] = 0.f;
    if (!(l == 0.f)) {  // l > 0, or NaN
      lse = (st.m[i] + log2f(l)) * 0.6931471805599453f;
      inv[i] = 1.f / l;
      // exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)); sink +inf gives 0, -inf 1.
      if (sink != nullptr && r < rows) inv[i] *= 1.f / (1.f + expf(sink[head0 + r] - lse));
    }
    if (write_lse && r < rows && (threadIdx.x & 3) == 0) lse_row0[static_cast<int64_t>(r) * seqlen_q] = lse;
  }
  // C fragment values 2k and 2k + 1 are adjacent columns of one row: one 4-byte store each.
#pragma unroll
  for (int e = 0; e < size(acc_o); e += 2) {
    const int r = get<0>(cO(e)), c = get<1>(cO(e));
    if (r >= rows) continue;
    const float f = inv[row_slot(cO, e)];
    const __nv_bfloat162 v = __floats2bfloat162_rn(acc_o(e) * f, acc_o(e + 1) * f);
    *reinterpret_cast<__nv_bfloat162*>(out_row0 + static_cast<int64_t>(r) * kHeadDimV + channel0 + c) = v;
  }
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
