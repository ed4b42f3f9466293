// CuTe types of the sparse FP8 decode kernel: the swizzled shared-memory layout of Q and of the
// dequantised tokens (and V^T as a view of the latter), the tensor-core MMA and the ldmatrix copies
// that feed it.
//
// MMA: SM80's mma.sync m16n8k16 (bf16 in, fp32 accumulate), four warps along M. This first version
// uses it rather than SM90's wgmma because every operand then passes through registers where it can
// be checked, P feeds the P V product from the score registers directly, and the dequantised tokens
// need no wgmma descriptor layout; the kernel is bound by the gather and the dequantisation, not by
// the tensor cores (FlashMLA's deep-dive finds the same of its wgmma kernel). Moving to wgmma is a
// tuning step.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>

#include "cuda/sparse_decode/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {

using namespace cute;

using Elem = cute::bfloat16_t;

template <KvFormat kFormat>
struct Traits {
  static constexpr KvFormat kFormatValue = kFormat;
  static constexpr KvFormatLayout kLayout = kv_format_layout(kFormat);
  static constexpr int kDqk = kLayout.d_qk;  // 576 (V3.2) or 512 (MODEL1)
  static constexpr int kKSteps = kDqk / 16;  // k-steps of Q K^T
  static_assert(kDqk % 64 == 0 && kLayout.head_dim_v == kHeadDimV, "tiles of 64 channels, V of 512");

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
