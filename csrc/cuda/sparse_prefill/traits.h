// CuTe types of the sparse prefill kernel: those of the shared tile (sparse_common/tile.h) at d_qk
// 576 or 512, and the cp.async atom of the row copies.
#pragma once

#include <cute/arch/copy_sm80.hpp>

#include "cuda/sparse_common/tile.h"
#include "cuda/sparse_prefill/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

template <int kDqk>
struct Traits : TileTraits<kDqk> {
  static constexpr int kChunksPerRow = kDqk / 8;  // 16-byte chunks (8 bf16) of a row: 72 or 64
  // 16 bytes global -> shared, bypassing L1, zero-filled when the predicate is false (the source is
  // then not read).
  using RowCopy = SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>;
};

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
