// The sparse FP8 decode on the two-warpgroup schedule of the sparse prefill (the "seesaw" kernel):
// its work unit, its shared memory and the build option that makes it the sparse decode's kernel.
//
// Work unit: as the mma.sync kernel's (sparse_decode/config.h), one CTA per (request, query token,
// split, tile of up to 64 heads); the CTA walks its split's entry blocks of 64 (the main pool's
// entries, then the extra pool's, as one sequence). The blocks run through the prefill's schedule
// (sparse_prefill/schedule.cuh): warpgroup 0 scores the even blocks, warpgroup 1 the odd ones, each
// hands the other its P, each owns 256 output channels, and one warpgroup's softmax and loads overlap
// the other's tensor-core work. What differs from the prefill is where a block comes from: the
// warpgroup that refills a part of a stage reads its tokens' e4m3 values and scales from the pool,
// dequantises them in registers and stores bfloat16 into the part's swizzled tiles (loads.cuh), so
// the dequantisation of one block overlaps the other warpgroup's products on the block before.
//
// Shared memory: the prefill's plan at the format's d_qk (V3.2 576: nine 64-channel tiles, RoPE in
// the ninth, P of a block written over its RoPE tile once its scores are done; MODEL1 512: eight
// tiles, V being all 512 channels with RoPE in the eighth, and P in tiles of its own).
#pragma once

#include "common/kv_formats.h"
#include "cuda/sparse_prefill/config.h"

// Which kernel the sparse decode calls run (sparse_decode/sparse_decode.cu): 0 (default until the
// seesaw kernel has passed the GPU tests and been timed against the mma.sync kernel) the mma.sync
// kernel; 1 the seesaw kernel, each consumer warpgroup refilling the parts it has finished with; 2 the
// seesaw kernel with a producer warpgroup (below). All three are compiled in every build.
#ifndef JAX_FLASHMLA_SPARSE_DECODE_SEESAW
#define JAX_FLASHMLA_SPARSE_DECODE_SEESAW 0
#endif

static_assert(JAX_FLASHMLA_SPARSE_DECODE_SEESAW >= 0 && JAX_FLASHMLA_SPARSE_DECODE_SEESAW <= 2,
              "JAX_FLASHMLA_SPARSE_DECODE_SEESAW is 0 (mma.sync), 1 (seesaw) or 2 (seesaw with a producer)");

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

constexpr bool kSelected = JAX_FLASHMLA_SPARSE_DECODE_SEESAW != 0;
constexpr bool kSelectedProducer = JAX_FLASHMLA_SPARSE_DECODE_SEESAW == 2;

// With a producer warpgroup (kProducer, sparse_prefill/config.h's plan): the third warpgroup loads
// and dequantises every part, so the two consumer warpgroups never wait on memory.
template <bool kProducer>
constexpr int threads() {
  return prefill::cta_threads<kProducer>();
}

template <KvFormat kFormat>
using Storage = prefill::ProducerStorage<kv_format_layout(kFormat).d_qk>;

template <KvFormat kFormat>
constexpr int smem_bytes() {
  return prefill::producer_smem_bytes<kv_format_layout(kFormat).d_qk>();
}

// The 64-channel tiles of a block that hold e4m3 values (the rest of the token, RoPE, is bfloat16).
template <KvFormat kFormat>
constexpr int fp8_tiles() {
  return kv_format_layout(kFormat).d_nope / 64;  // 8 (V3.2) or 7 (MODEL1)
}

static_assert(kv_format_layout(KvFormat::kV32).d_nope % 64 == 0 && kv_format_layout(KvFormat::kModel1).d_nope % 64 == 0,
              "the e4m3 channels fill whole tiles");
static_assert(kv_format_layout(KvFormat::kV32).d_rope == 64 && kv_format_layout(KvFormat::kModel1).d_rope == 64,
              "RoPE is one tile");

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
