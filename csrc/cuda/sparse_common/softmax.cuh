// The online softmax of a sparse tile (tile.h) over one block's score fragment. A thread holds two
// rows of its warp's 16 (the rows differ by 8) and, in each, a quarter of the block's 64 columns; the
// four threads of a quad hold the rest of those rows. Scores are kept in log2 units (raw score times
// softmax_scale * log2(e)); m is the running max, l this thread's partial sum of 2^(s - m).
#pragma once

#include <cmath>

#include "cuda/sparse_common/tile.h"

namespace jax_flashmla {
namespace sparse_sm90 {

struct RowState {
  float m[2];  // running max (log2 units), -inf until the row has seen a key
  float l[2];  // this thread's partial row sum
};

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Which of the thread's two rows accumulator value e lies in: 0 for the first, 1 for the one 8 below.
template <class CoordTensor>
__device__ __forceinline__ int row_slot(const CoordTensor& coords, int e) {
  return (get<0>(coords(e)) - get<0>(coords(0))) >> 3;
}

// Scales the raw scores in `acc_s` to log2 units, masks the columns whose entry is not read (bit col
// of `valid` clear) to -inf, moves each row's max and rescales its O accumulators and sum, then
// replaces the scores by P = 2^(s - m). fmaxf skips NaN scores; they reach l and O through P.
// A row that has seen no key keeps m = -inf; its exponent base is 0 so that P is 0, not NaN.
template <class AccS, class AccO, class CoordS, class CoordO>
__device__ __forceinline__ void online_softmax(AccS& acc_s, AccO& acc_o, const CoordS& cS, const CoordO& cO,
                                               uint64_t valid, float scale_log2, RowState& st) {
  float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int e = 0; e < size(acc_s); ++e) {
    const int col = get<1>(cS(e));
    const float s = ((valid >> col) & 1u) ? acc_s(e) * scale_log2 : -INFINITY;
    acc_s(e) = s;
    block_max[row_slot(cS, e)] = fmaxf(block_max[row_slot(cS, e)], s);
  }
  float base[2], alpha[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float m_new = fmaxf(st.m[i], quad_max(block_max[i]));
    base[i] = m_new == -INFINITY ? 0.f : m_new;
    alpha[i] = exp2f(st.m[i] - base[i]);  // 0 while the row had no key (m = -inf)
    st.m[i] = m_new;
    st.l[i] *= alpha[i];
  }
#pragma unroll
  for (int e = 0; e < size(acc_o); ++e) acc_o(e) *= alpha[row_slot(cO, e)];
#pragma unroll
  for (int e = 0; e < size(acc_s); ++e) {
    const float pe = exp2f(acc_s(e) - base[row_slot(cS, e)]);
    acc_s(e) = pe;
    st.l[row_slot(cS, e)] += pe;
  }
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
