// The sparse prefill kernel's loads: the entries a query token reads, their resolution to kv rows
// (or to "masked"), and the cp.async copies of whole rows (the Q tile, a block of named kv rows) into
// the swizzled shared-memory layout.
#pragma once

#include <cstdint>

#include "common/sparse_params.h"
#include "cuda/sparse_prefill/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

// Entries query token `token` reads: its topk_length clamped to [0, topk], or all topk.
__device__ __forceinline__ int entries_of(const SparsePrefillParams& p, int64_t token) {
  if (p.topk_length == nullptr) return p.topk;
  return min(max(p.topk_length[token], 0), p.topk);
}

// Threads 0..63 (two whole warps): entry e0 + threadIdx.x of the token, of its `n` read ones, to its kv
// row in row[threadIdx.x] (-1 past n, for -1, for any other negative id and for ids >= s_kv: such
// an entry is never read), and the block's bit mask of read entries in valid[0..1].
__device__ __forceinline__ void resolve_block(const SparsePrefillParams& p, int64_t token, int n, int e0,
                                              int32_t* row, uint32_t* valid) {
  const int j = threadIdx.x;
  int32_t r = -1;
  if (e0 + j < n) {
    const int32_t id = __ldg(p.indices + token * p.topk + e0 + j);
    if (id >= 0 && static_cast<int64_t>(id) < p.seqlen_kv) r = id;
  }
  row[j] = r;
  const uint32_t bits = __ballot_sync(0xffffffffu, r >= 0);
  if (j % 32 == 0) valid[j / 32] = bits;
}

// Issues the copies of kRowsT rows of kChunks 16-byte chunks into `dst` (a swizzled [kRowsT, 8 kChunks]
// bfloat16 tile): row r comes from source_of(r), or is zero-filled where that is null (nothing is read
// for it; the copy then names `anywhere`, a valid address it does not dereference). Warp w copies rows
// w, w + kWarps, ..., each lane 16-byte chunks lane, lane + 32, ...: one warp instruction reads 512
// contiguous bytes of a row. The caller fences and waits (cp_async_fence / cp_async_wait). Shared with
// the backward kernel (its Q, dO and kv tiles), whose CTA has as many warps.
template <int kRowsT, int kChunks, class Tr, class SmemTensor, class SourceOf>
__device__ __forceinline__ void copy_rows_async(SmemTensor& dst, const uint16_t* anywhere, SourceOf source_of) {
  static_assert(kRowsT % kWarps == 0, "whole rows per warp");
  constexpr int kSteps = (kChunks + 31) / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kRowsT / kWarps; ++i) {
    const int r = warp + i * kWarps;
    const uint16_t* src = source_of(r);
    const bool read = src != nullptr;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int c = lane + 32 * s;
      if (kChunks % 32 == 0 || c < kChunks) {
        const uint16_t* from = read ? src + c * 8 : anywhere;
        Tr::RowCopy::copy(*reinterpret_cast<const cute::uint128_t*>(from),
                          *reinterpret_cast<cute::uint128_t*>(&dst(r, c * 8)), read);
      }
    }
  }
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
