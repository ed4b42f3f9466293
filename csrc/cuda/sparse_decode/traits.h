// CuTe types of the sparse FP8 decode kernel: those of the shared tile (sparse_common/tile.h) at the
// format's d_qk, and the format's token layout. The dequantised tokens need no wgmma descriptor
// layout, one reason the tile uses mma.sync: the kernel is bound by the gather and the
// dequantisation, not by the tensor cores (FlashMLA's deep-dive finds the same of its wgmma kernel).
#pragma once

#include "common/kv_formats.h"
#include "cuda/sparse_common/tile.h"
#include "cuda/sparse_decode/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {

template <KvFormat kFormat>
struct Traits : TileTraits<kv_format_layout(kFormat).d_qk> {
  static constexpr KvFormat kFormatValue = kFormat;
  static constexpr KvFormatLayout kLayout = kv_format_layout(kFormat);
  static_assert(kLayout.head_dim_v == kHeadDimV, "V of 512 channels");
};

}  // namespace sparse_sm90
}  // namespace jax_flashmla
