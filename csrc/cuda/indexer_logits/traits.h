// CuTe types of the indexer-logits kernel: the shared-memory layouts of the query tile and of a page
// of keys, and the tensor-core MMA.
//
// MMA: SM90's wgmma m64n64k32 on e4m3 operands from shared memory with a float32 accumulator, the
// CTA's one warpgroup scoring all 64 heads against the page's 64 keys in four k-steps. (mma.sync has
// no e4m3 form on SM90: ptxas widens its m16n8k32 e4m3 to f16 and two HMMAs, converting both operands
// at every use.) Both operands are K-major (a head's 128 channels, a key's 128 channels), in 128-byte
// rows with the 128-byte swizzle that wgmma reads.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>

#include "cuda/indexer_logits/config.h"

namespace jax_flashmla {
namespace indexer_sm90 {

using namespace cute;

using Fp8 = cute::float_e4m3_t;

using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Fp8>{}, Shape<Int<kHeads>, Int<kDim>>{}));
using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Fp8>{}, Shape<Int<kPage>, Int<kDim>>{}));
using TiledMma = decltype(make_tiled_mma(SM90_64x64x32_F32E4M3E4M3_SS_TN<>{}));
constexpr int kKSteps = kDim / 32;

// The byte offset of (row, channel) in a buffer of SmemLayoutQ/K (128-byte rows, 16-byte chunk c of
// row r at chunk c ^ (r % 8)): where a cp.async chunk goes.
__device__ __forceinline__ int swizzled_offset(int row, int channel) {
  return row * kDim + ((((channel / kChunk) ^ (row % 8)) * kChunk) | (channel % kChunk));
}

}  // namespace indexer_sm90
}  // namespace jax_flashmla
