// The end of a piece: the two warpgroups' row sums are added, and the normalized output is stored,
// to out/lse for a whole request or to its accumulator slot for a split one.
#pragma once

#include <cmath>

#include "common/mla_contract.h"
#include "common/mla_params.h"
#include "cuda/decode/softmax.cuh"
#include "cuda/decode/traits.h"

namespace jax_flashmla {
namespace sm90 {

// Which piece a CTA is working on, and which of its rows.
struct PieceCoord {
  int req;      // request
  int split;    // index of the piece among its request's pieces
  int kv_head;
  int row0;     // first query row of the CTA's 64-row tile
  int key_begin;  // first key of the piece
  int n_pages;    // pages in the piece
};

// Stores one warpgroup's half of a piece's output: `o` is the 64x256 fp32 accumulator fragment of
// channels [256 wg, 256 wg + 256) (rows r_lo and r_lo + 8 of this thread), normalized by the whole
// row sums in `st`. A whole request writes out/lse; a split one its accumulator slot. The row max
// m is in log2 units. `limit` holds the rows' key limits.
template <typename Elem>
__device__ __forceinline__ void store_piece(const DecodeParams& p, const float* o, const PieceCoord& pc,
                                            const ThreadCoord& t, const RowState& st, RowLimits limit, bool final_out,
                                            int64_t slot) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = pc.row0 + t.r_lo + 8 * half;
    if (row >= p.rows_per_head_k) continue;
    float l = half ? st.l_hi : st.l_lo;
    const float m = half ? st.m_hi : st.m_lo;
    // A row that sees keys in this piece has l >= 1 when any of their scaled scores is finite (the
    // largest contributes 2^0), and l NaN when one is NaN. l == 0 means every one was -inf, or the
    // max was +inf (a non-finite q, or a scale that overflows): NaN, as in the reference, never
    // "no visible key". A row without keys here (length 0, causal rows before their first key,
    // split pieces past the row's keys) keeps l == 0: out 0, lse +inf (-inf in the accumulator).
    const bool sees_keys = pc.n_pages > 0 && (half ? limit.hi : limit.lo) > pc.key_begin;
    if (sees_keys && l == 0.f) l = NAN;
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
    const float lse = empty ? (final_out ? INFINITY : -INFINITY) : (m + log2f(l)) * 0.6931471805599453f;
    const QueryRow qr = query_row(p, pc.kv_head, row);
    if (final_out) {
      Elem* out = static_cast<Elem*>(p.out) + qo_row_index(p, pc.req, qr) * kHeadDimV + t.wg * 256;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int i = j * 4 + half * 2;
        *reinterpret_cast<uint32_t*>(out + j * 8 + t.col_q) = pack2<Elem>(o[i] * inv, o[i + 1] * inv);
      }
      if (t.wg == 0 && t.lane % 4 == 0) p.lse[lse_index(p, pc.req, qr)] = lse;
    } else {
      const int64_t acc_row = accum_row_index(p, slot, pc.kv_head, row);
      float* acc = p.o_accum + acc_row * kHeadDimV + t.wg * 256;
      const uint64_t keep = evict_last_policy();
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int i = j * 4 + half * 2;
        st_global_f2_hint(acc + j * 8 + t.col_q, o[i] * inv, o[i + 1] * inv, keep);
      }
      if (t.wg == 0 && t.lane % 4 == 0) p.lse_accum[acc_row] = lse;
    }
  }
}

// Ends a piece: adds the two warpgroups' row sums (each thread holds partial sums of rows r_lo and
// r_lo + 8 over its columns) through `row_sum`, then stores the output. All kThreads threads call it.
// `start_next()` runs once the Q tile and both stages are free, before the output is stored, so the
// next piece's loads overlap the store.
template <typename Elem, typename StartNext>
__device__ __forceinline__ void finish_piece(const DecodeParams& p, const float* o, float (*row_sum)[kRowsPerTile],
                                             const PieceCoord& pc, const ThreadCoord& t, RowState st,
                                             RowLimits limit, StartNext start_next) {
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    st.l_lo += __shfl_xor_sync(0xffffffff, st.l_lo, d);
    st.l_hi += __shfl_xor_sync(0xffffffff, st.l_hi, d);
  }
  if (t.lane % 4 == 0) {
    row_sum[t.wg][t.r_lo] = st.l_lo;
    row_sum[t.wg][t.r_lo + 8] = st.l_hi;
  }
  __syncthreads();
  st.l_lo = row_sum[0][t.r_lo] + row_sum[1][t.r_lo];
  st.l_hi = row_sum[0][t.r_lo + 8] + row_sum[1][t.r_lo + 8];
  __syncthreads();  // row_sum, the Q tile and the stages may be overwritten by the next piece
  start_next();

  const int total_splits = p.num_splits[pc.req + 1] - p.num_splits[pc.req];
  const int64_t slot = accum_slot(p.num_splits, pc.req, pc.split);
  const bool final_out = total_splits == 1;
  if (!final_out && (slot < 0 || slot >= max_accum_slots(p.num_sm_parts))) return;  // stale plan
  store_piece<Elem>(p, o, pc, t, st, limit, final_out, slot);
}

}  // namespace sm90
}  // namespace jax_flashmla
