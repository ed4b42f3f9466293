// The tile of the SM90 sparse decode kernel (sparse_decode/; the prefill backward uses its layouts and
// MMA atom): one CTA holds up to 64 query rows that read the same tokens (the heads of one query
// token), walks those tokens in blocks of 64, and runs S = Q K^T, the online softmax and O += P V on
// mma.sync tensor-core atoms. (The sparse prefill forward runs the dense decode's wgmma schedule
// instead: sparse_prefill/kernel.cuh.)
//
// Eight warps: warp w holds query rows 16 (w % 4) .. 16 (w % 4) + 15 of the tile, and output
// channels 256 (w / 4) .. 256 (w / 4) + 255. Both warps of a row group compute the same 16 x 64
// scores (the QK^T work is done twice: 1.5x the tensor-core work of splitting it, in exchange for no
// cross-warp softmax hand-off); each keeps a 16 x 256 fp32 quarter of O (128 registers a thread).
//
// MMA: SM80's mma.sync m16n8k16 (bf16 in, fp32 accumulate), four warps along M, rather than SM90's
// wgmma: every operand then passes through registers where it can be checked, P feeds the P V product
// from the score registers directly, and the token block needs no wgmma descriptor layout.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>

#include "common/mla_contract.h"

namespace jax_flashmla {
namespace sparse_sm90 {

using namespace cute;

using Elem = cute::bfloat16_t;

constexpr int kThreads = 256;       // eight warps
constexpr int kRows = 64;           // query rows (heads of one query token) per CTA
constexpr int kRowGroups = 4;       // 16-row groups of the tile; a group with no live row skips the math
constexpr int kBlockN = 64;         // tokens per block
constexpr int kHalfV = kHeadDimV / 2;  // output channels of one warp

// Layouts, MMA and register copies of a tile whose Q rows and tokens are kDqk bfloat16 channels wide
// (576 or 512); V is channels 0..511 of the tokens.
template <int kDqkValue>
struct TileTraits {
  static constexpr int kDqk = kDqkValue;
  static constexpr int kKSteps = kDqk / 16;  // k-steps of Q K^T
  static_assert(kDqk % 64 == 0 && kDqk >= kHeadDimV, "tiles of 64 channels, V of 512");

  // Rows of 64 bf16 (128 bytes) whose 16-byte chunks are XOR-swizzled by the row: ldmatrix reads of
  // eight rows at one chunk hit eight different bank groups.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kDqk>>{}));
  using SmemLayoutK = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kDqk>>{}));
  // V^T: (channel, token) -> the element (token, channel) of the K block, channels 0..511.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutK{}, make_layout(Shape<Int<kHeadDimV>, Int<kBlockN>>{}, GenRowMajor{})));

  using TiledMma = TiledMMA<MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>, Layout<Shape<_4, _1, _1>>, Tile<_64, _16, _16>>;
  using CopyQK = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;  // Q (A) and K (B), both K-major
  using CopyVt = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;  // V^T (B of P V) from token-major rows
};

}  // namespace sparse_sm90
}  // namespace jax_flashmla
