// The sparse prefill backward kernel's loads: cp.async copies of whole rows (the Q and dO tiles, a
// block of named kv rows) into the swizzled shared-memory tiles, and the red.global.add of dK. The
// entries a token reads and their resolution to kv rows are the forward's (sparse_prefill/loads.cuh).
#pragma once

#include <cstdint>

#include "cuda/sparse_prefill/loads.cuh"
#include "cuda/sparse_prefill_bwd/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

using prefill::entries_of;
using prefill::resolve_block;

// Issues the copies of kRowsT rows of kChunks 16-byte chunks into `dst` (a swizzled [kRowsT, 8 kChunks]
// bfloat16 tile): row r from source_of(r), or zero-filled where that is null (the copy then names
// `anywhere`, a valid address it does not dereference). Warp w copies rows w, w + 8, ..., each lane
// chunks lane, lane + 32, ...: one warp instruction reads 512 contiguous bytes of a row. The caller
// fences and waits.
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

// dkv[at], dkv[at + 1] += a, b: one vector reduction (sm_90), relaxed, no value returned. `at` is even,
// so the address is 8-byte aligned.
__device__ __forceinline__ void red_add_f32x2(float* at, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(at), "f"(a), "f"(b) : "memory");
}

}  // namespace prefill_bwd
}  // namespace sparse_sm90
}  // namespace jax_flashmla
