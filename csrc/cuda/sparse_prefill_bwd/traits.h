// CuTe types of the sparse prefill backward kernel: the swizzled shared-memory layouts of its tiles
// (the forward's 128-byte swizzle atom, sparse_common/tile.h), the transposed views the backward's
// products read, the one-warp MMA tile and the copy atoms.
#pragma once

#include <cute/arch/copy_sm80.hpp>

#include "cuda/sparse_common/tile.h"
#include "cuda/sparse_prefill_bwd/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

template <int kDqkValue>
struct Traits {
  static constexpr int kDqk = kDqkValue;
  static constexpr int kChunksPerRow = kDqk / 8;        // 16-byte chunks of a q or kv row: 72 or 64
  static constexpr int kDqChannels = kDqk / 4;          // dQ channels of a warp: 144 or 128
  static constexpr int kDkChunks = kDqk / 2 / kDkChunk; // dK chunks of a warp: 9 or 8
  static_assert(kDqChannels % 16 == 0 && (kDqk / 2) % kDkChunk == 0, "whole MMA tiles");

  using SmemAtom = typename TileTraits<kDqk>::SmemAtom;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRowsB>, Int<kDqk>>{}));
  using SmemLayoutDO = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRowsB>, Int<kHeadDimV>>{}));
  using SmemLayoutK = typename TileTraits<kDqk>::SmemLayoutK;  // (entry, channel)
  using SmemLayoutDS = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRowsB>, Int<kBlockN>>{}));
  // Views: V (entry, channel < 512) of a token block; K^T (channel, entry); Q^T and dO^T (channel,
  // row); dS^T (entry, row). Each maps to the element of the stored tile, so no copy is made.
  using SmemLayoutV = decltype(composition(SmemLayoutK{}, make_layout(Shape<Int<kBlockN>, Int<kHeadDimV>>{})));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutK{}, make_layout(Shape<Int<kDqk>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutQt =
      decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kDqk>, Int<kRowsB>>{}, GenRowMajor{})));
  using SmemLayoutDOt =
      decltype(composition(SmemLayoutDO{}, make_layout(Shape<Int<kHeadDimV>, Int<kRowsB>>{}, GenRowMajor{})));
  using SmemLayoutDSt =
      decltype(composition(SmemLayoutDS{}, make_layout(Shape<Int<kBlockN>, Int<kRowsB>>{}, GenRowMajor{})));

  // One warp's 16 x 16 tile of m16n8k16 atoms (bf16 in, fp32 accumulate); each warp walks its own slice.
  using WarpMma = TiledMMA<MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>, Layout<Shape<_1, _1, _1>>, Tile<_16, _16, _16>>;
  using CopyN = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;  // an operand stored K-major
  using CopyT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;  // an operand stored MN-major (the transposed views)
  // 16 bytes global -> shared, bypassing L1, zero-filled when the predicate is false (nothing is read).
  using RowCopy = SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>;
};

}  // namespace prefill_bwd
}  // namespace sparse_sm90
}  // namespace jax_flashmla
