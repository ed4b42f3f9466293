// Reads the operands of the indexer-logits FFI call into IndexerLogitsParams, checking every shape and
// dtype the Python layer promises (jax_flashmla/ops/indexer_logits.py): a mismatch is an FFI error,
// never a bad memory access. Index values (limits, page ids) are not read here: they live on the device.
#pragma once

#include <cstdint>
#include <limits>

#include "common/ffi_params.h"
#include "common/indexer_params.h"

namespace jax_flashmla {

// Operands: q e4m3 [b, next_n, h, 128], kv_cache uint8 [num_pages, 64, 1, 132], weights float32
// [b * next_n, h], limits int32 [b, next_n], block_table int32 [b, width]; result logits float32
// [b * next_n, max_context_len].
inline ffi::Error read_indexer_logits_params(ffi::AnyBuffer q, ffi::AnyBuffer kv_cache, ffi::Buffer<ffi::F32> weights,
                                             ffi::Buffer<ffi::S32> limits, ffi::Buffer<ffi::S32> block_table,
                                             ffi::ResultBuffer<ffi::F32> logits, IndexerLogitsParams& p) {
  auto qd = q.dimensions();
  if (q.element_type() != ffi::DataType::F8E4M3FN || qd.size() != 4 || qd[3] != kIndexerHeadDim) {
    return invalid("q must be float8_e4m3fn [b, next_n, h, 128]");
  }
  if (qd[2] < 1 || qd[2] > kIndexerMaxHeads) return invalid("q must have 1 to 64 heads");
  auto kd = kv_cache.dimensions();
  if (kv_cache.element_type() != ffi::DataType::U8 || kd.size() != 4 || kd[1] != kIndexerPageSize || kd[2] != 1 ||
      kd[3] != kIndexerRowBytes) {
    return invalid("kv_cache must be uint8 [num_pages, 64, 1, 132]");
  }
  if (kd[0] < 1 || kd[0] > std::numeric_limits<int32_t>::max()) return invalid("kv_cache must have 1 to 2^31 - 1 pages");
  const int64_t rows = qd[0] * qd[1];
  auto wd = weights.dimensions();
  if (wd.size() != 2 || wd[0] != rows || wd[1] != qd[2]) return invalid("weights must be float32 [b * next_n, h]");
  auto ld = limits.dimensions();
  if (ld.size() != 2 || ld[0] != qd[0] || ld[1] != qd[1]) return invalid("limits must be int32 [b, next_n]");
  auto bd = block_table.dimensions();
  if (bd.size() != 2 || bd[0] != qd[0] || bd[1] > std::numeric_limits<int32_t>::max()) {
    return invalid("block_table must be int32 [b, max_pages]");
  }
  auto od = logits->dimensions();
  if (od.size() != 2 || od[0] != rows) return invalid("logits must be float32 [b * next_n, max_context_len]");
  if (qd[0] > std::numeric_limits<int32_t>::max() || qd[1] > std::numeric_limits<int32_t>::max()) {
    return invalid("q has too many requests or query tokens");
  }
  p.batch = static_cast<int>(qd[0]);
  p.next_n = static_cast<int>(qd[1]);
  p.num_heads = static_cast<int>(qd[2]);
  p.num_pages = static_cast<int>(kd[0]);
  p.table_width = static_cast<int>(bd[1]);
  p.logits_width = od[1];
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.pool = static_cast<const uint8_t*>(kv_cache.untyped_data());
  p.weights = weights.typed_data();
  p.limits = limits.typed_data();
  p.block_table = block_table.typed_data();
  p.logits = logits->typed_data();
  return ffi::Error::Success();
}

// Operands: logits float32 [rows, width], visible int32 [rows]; result positions int32 [rows, topk].
inline ffi::Error read_indexer_topk_params(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> visible,
                                           ffi::ResultBuffer<ffi::S32> positions, IndexerTopkParams& p) {
  auto ld = logits.dimensions();
  if (ld.size() != 2 || ld[1] > std::numeric_limits<int32_t>::max()) {
    return invalid("logits must be float32 [rows, width] with width < 2^31");
  }
  auto vd = visible.dimensions();
  if (vd.size() != 1 || vd[0] != ld[0]) return invalid("visible must be int32 [rows]");
  auto pd = positions->dimensions();
  if (pd.size() != 2 || pd[0] != ld[0] || pd[1] < 1 || pd[1] > kIndexerTopkMax) {
    return invalid("positions must be int32 [rows, topk] with 1 <= topk <= 2048");
  }
  p.rows = ld[0];
  p.width = ld[1];
  p.topk = static_cast<int>(pd[1]);
  p.logits = logits.typed_data();
  p.visible = visible.typed_data();
  p.positions = positions->typed_data();
  return ffi::Error::Success();
}

}  // namespace jax_flashmla

#define JFM_BIND_INDEXER_TOPK_ARGS(binding)                         \
  binding.Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* logits */   \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()     /* visible */  \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()     /* positions */

#define JFM_BIND_INDEXER_LOGITS_ARGS(binding)                         \
  binding.Arg<::xla::ffi::AnyBuffer>()             /* q */            \
      .Arg<::xla::ffi::AnyBuffer>()                /* kv_cache */     \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* weights */      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()  /* limits */       \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()  /* block_table */  \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* logits */
