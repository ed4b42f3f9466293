// The sparse prefill backward kernel's loads: the red.global.add of dK. The entries a token reads, their
// resolution to kv rows and the cp.async row copies (the Q and dO tiles, a block of named kv rows) are
// the forward's (sparse_prefill/loads.cuh).
#pragma once

#include <cstdint>

#include "cuda/sparse_prefill/loads.cuh"
#include "cuda/sparse_prefill_bwd/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

using prefill::copy_rows_async;
using prefill::entries_of;
using prefill::resolve_block;
static_assert(kWarps == prefill::kWarps, "the forward's row copies spread rows over its warp count");

// dkv[at], dkv[at + 1] += a, b: one vector reduction (sm_90), relaxed, no value returned. `at` is even,
// so the address is 8-byte aligned.
__device__ __forceinline__ void red_add_f32x2(float* at, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(at), "f"(a), "f"(b) : "memory");
}

}  // namespace prefill_bwd
}  // namespace sparse_sm90
}  // namespace jax_flashmla
