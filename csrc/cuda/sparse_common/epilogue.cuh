// The epilogue of a sparse tile (tile.h): O / l, the attention sink, the bfloat16 store of out, the
// natural-log lse and, where asked, max_logits (the row max of the scaled scores); or, for a tile
// that walked one split of its entries, the fp32 partial O and lse (store_partial). A row with no read
// token (l = 0) gets out 0, lse +inf and max_logits -inf, whatever the sink; NaN in l (NaN in q, or in
// a token the row reads) gives NaN in out, lse and max_logits.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/sparse_common/softmax.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {

// Where a tile's results go. Row r of the tile is head head0 + r; rows past `rows` are never written.
struct TileOutput {
  const float* sink = nullptr;         // attn_sink [h_q] or null
  int head0 = 0;                       // the tile's first head
  int rows = 0;                        // live rows of the tile
  int channel0 = 0;                    // the warp's first output channel
  uint16_t* out_row0 = nullptr;        // out at (row 0, channel 0); rows kHeadDimV apart
  float* lse_row0 = nullptr;           // lse of row 0; rows stat_stride apart
  float* max_logits_row0 = nullptr;    // max_logits of row 0 (same layout as lse), or null
  int64_t stat_stride = 1;
  bool write_stats = false;            // whether this thread's warp writes lse and max_logits
};

template <class AccO, class CoordO>
__device__ __forceinline__ void store_tile(const AccO& acc_o, const CoordO& cO, RowState& st, const TileOutput& to) {
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
      if (to.sink != nullptr && r < to.rows) inv[i] *= 1.f / (1.f + expf(to.sink[to.head0 + r] - lse));
    }
    if (to.write_stats && r < to.rows && (threadIdx.x & 3) == 0) {
      const int64_t at = static_cast<int64_t>(r) * to.stat_stride;
      to.lse_row0[at] = lse;
      // m is in log2 units; -inf for a row that read nothing. NaN scores never raise m (fmaxf), so a
      // NaN row is told by its sum.
      if (to.max_logits_row0 != nullptr) to.max_logits_row0[at] = isnan(l) ? l : st.m[i] * 0.6931471805599453f;
    }
  }
  // C fragment values 2k and 2k + 1 are adjacent columns of one row: one 4-byte store each.
#pragma unroll
  for (int e = 0; e < size(acc_o); e += 2) {
    const int r = get<0>(cO(e)), c = get<1>(cO(e));
    if (r >= to.rows) continue;
    const float f = inv[row_slot(cO, e)];
    const __nv_bfloat162 v = __floats2bfloat162_rn(acc_o(e) * f, acc_o(e + 1) * f);
    *reinterpret_cast<__nv_bfloat162*>(to.out_row0 + static_cast<int64_t>(r) * kHeadDimV + to.channel0 + c) = v;
  }
}

// Where one split's partial results go (a tile that walked only part of its entries): row r of the
// tile is row r of o_row0 / lse_row0; rows past `rows` are never written.
struct PartialOutput {
  int rows = 0;                  // live rows of the tile
  int channel0 = 0;              // the warp's first output channel
  float* o_row0 = nullptr;       // fp32 partial O at (row 0, channel 0); rows kHeadDimV apart
  float* lse_row0 = nullptr;     // partial lse of row 0; rows 1 apart
  bool write_stats = false;      // whether this thread's warp writes the lse
};

// The partial epilogue: O / l in fp32 and the natural-log lse of the split's entries, without the
// sink (the combine applies it once, to the whole row). A row that read nothing here (l = 0) stores
// O 0 and lse -inf, a weight of 0 in the combine; NaN in l stores NaN in O and lse.
template <class AccO, class CoordO>
__device__ __forceinline__ void store_partial(const AccO& acc_o, const CoordO& cO, RowState& st,
                                              const PartialOutput& po) {
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(st.l[i]);
    const int r = get<0>(cO(0)) + 8 * i;
    float lse = -INFINITY;
    inv[i] = 0.f;
    if (!(l == 0.f)) {  // l > 0, or NaN
      lse = (st.m[i] + log2f(l)) * 0.6931471805599453f;
      inv[i] = 1.f / l;
    }
    if (po.write_stats && r < po.rows && (threadIdx.x & 3) == 0) po.lse_row0[r] = lse;
  }
#pragma unroll
  for (int e = 0; e < size(acc_o); e += 2) {
    const int r = get<0>(cO(e)), c = get<1>(cO(e));
    if (r >= po.rows) continue;
    const float f = inv[row_slot(cO, e)];
    *reinterpret_cast<float2*>(po.o_row0 + static_cast<int64_t>(r) * kHeadDimV + po.channel0 + c) =
        make_float2(acc_o(e) * f, acc_o(e + 1) * f);
  }
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
