// The Python extension: hands JAX the XLA FFI handlers as capsules, and exposes the host scheduler.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <vector>

#include "common/indexer_params.h"
#include "common/kv_formats.h"
#include "common/mla_contract.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmMetadataCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmDecodeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmSparseDecodeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmSparsePrefillCpu);
#ifdef JFM_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmMetadataCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmDecodeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmSparseDecodeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmSparsePrefillCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmSparsePrefillBwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmIndexerLogitsCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmIndexerTopkCuda);
#endif

namespace nb = nanobind;

namespace {

nb::capsule handler_capsule(XLA_FFI_Handler* handler) { return nb::capsule(reinterpret_cast<void*>(handler)); }

using Int32Vector = nb::ndarray<nb::numpy, int32_t, nb::c_contig>;

Int32Vector owned_array(std::vector<int32_t>&& data, std::initializer_list<size_t> shape) {
  auto* heap = new std::vector<int32_t>(std::move(data));
  nb::capsule owner(heap, [](void* ptr) noexcept { delete static_cast<std::vector<int32_t>*>(ptr); });
  return Int32Vector(heap->data(), shape, owner);
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "jax_flashmla compiled core: XLA FFI handlers and the tile scheduler";

  m.def("cpu_targets", []() {
    nb::dict targets;
    targets["jax_flashmla_metadata"] = handler_capsule(JfmMetadataCpu);
    targets["jax_flashmla_decode"] = handler_capsule(JfmDecodeCpu);
    targets["jax_flashmla_sparse_decode"] = handler_capsule(JfmSparseDecodeCpu);
    targets["jax_flashmla_sparse_prefill"] = handler_capsule(JfmSparsePrefillCpu);
    return targets;
  });

  m.def("built_with_cuda", []() {
#ifdef JFM_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  m.def("cuda_targets", []() {
    nb::dict targets;
#ifdef JFM_WITH_CUDA
    targets["jax_flashmla_metadata"] = handler_capsule(JfmMetadataCuda);
    targets["jax_flashmla_decode"] = handler_capsule(JfmDecodeCuda);
    targets["jax_flashmla_sparse_decode"] = handler_capsule(JfmSparseDecodeCuda);
    targets["jax_flashmla_sparse_prefill"] = handler_capsule(JfmSparsePrefillCuda);
    targets["jax_flashmla_sparse_prefill_bwd"] = handler_capsule(JfmSparsePrefillBwdCuda);  // CUDA only
    targets["jax_flashmla_indexer_logits"] = handler_capsule(JfmIndexerLogitsCuda);  // CUDA only
    targets["jax_flashmla_indexer_topk"] = handler_capsule(JfmIndexerTopkCuda);  // CUDA only, opt-in
#endif
    return targets;
  });

  m.def(
      "schedule_tiles",
      [](nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> seqlens, int num_sm_parts) {
        if (num_sm_parts < 1) throw nb::value_error("num_sm_parts must be >= 1");
        const int batch = static_cast<int>(seqlens.shape(0));
        std::vector<int32_t> tile_md(static_cast<size_t>(num_sm_parts) * jax_flashmla::kTileMetadataSize);
        std::vector<int32_t> num_splits(batch + 1);
        jax_flashmla::schedule_tiles(seqlens.data(), batch, num_sm_parts, tile_md.data(), num_splits.data());
        return nb::make_tuple(owned_array(std::move(tile_md), {static_cast<size_t>(num_sm_parts),
                                                               static_cast<size_t>(jax_flashmla::kTileMetadataSize)}),
                              owned_array(std::move(num_splits), {static_cast<size_t>(batch + 1)}));
      },
      nb::arg("cache_seqlens"), nb::arg("num_sm_parts"),
      "Runs the tile scheduler on the host: (tile_md [num_sm_parts, 8], num_splits [b + 1]).");

  m.def("contract_constants", []() {
    nb::dict c;
    c["HEAD_DIM"] = jax_flashmla::kHeadDim;
    c["HEAD_DIM_V"] = jax_flashmla::kHeadDimV;
    c["PAGE_SIZE"] = jax_flashmla::kPageSize;
    c["ROWS_PER_TILE"] = jax_flashmla::kRowsPerTile;
    c["TILE_METADATA_SIZE"] = jax_flashmla::kTileMetadataSize;
    c["MAX_SM_PARTS"] = jax_flashmla::kMaxSmParts;
    // The FP8 KV-cache formats (kv_formats.h), by name, in KvFormat's order.
    nb::list formats;
    for (int f = 0; f < jax_flashmla::kNumKvFormats; ++f) {
      const auto format = static_cast<jax_flashmla::KvFormat>(f);
      const jax_flashmla::KvFormatLayout l = jax_flashmla::kv_format_layout(format);
      nb::dict d;
      d["name"] = format == jax_flashmla::KvFormat::kV32 ? "v32" : "model1";
      d["d_qk"] = l.d_qk;
      d["d_nope"] = l.d_nope;
      d["d_rope"] = l.d_rope;
      d["head_dim_v"] = l.head_dim_v;
      d["group_size"] = l.group_size;
      d["num_groups"] = l.num_groups;
      d["scale_bytes"] = l.scale_bytes;
      d["record_bytes"] = l.record_bytes;
      d["scale_record_bytes"] = l.scale_record_bytes;
      d["page_align"] = l.page_align;
      d["token_bytes"] = jax_flashmla::kv_token_bytes(format);
      formats.append(d);
    }
    c["KV_FORMATS"] = formats;
    c["FP8_E4M3_MAX"] = jax_flashmla::kFp8E4m3Max;
    c["FP8_MIN_SCALE"] = jax_flashmla::kFp8MinScale;
    // The domain of the SM90 indexer-logits kernel (indexer_params.h).
    c["INDEXER_HEAD_DIM"] = jax_flashmla::kIndexerHeadDim;
    c["INDEXER_MAX_HEADS"] = jax_flashmla::kIndexerMaxHeads;
    c["INDEXER_PAGE_SIZE"] = jax_flashmla::kIndexerPageSize;
    c["INDEXER_ROW_BYTES"] = jax_flashmla::kIndexerRowBytes;
    c["INDEXER_TOPK_MAX"] = jax_flashmla::kIndexerTopkMax;
    return c;
  });

  // Where a token's bytes sit in a page of an FP8 pool: the offsets of kv_formats.h.
  m.def(
      "kv_offsets",
      [](int format, int page_size, int token) {
        if (format < 0 || format >= jax_flashmla::kNumKvFormats) throw nb::value_error("unknown KV-cache format");
        if (page_size < 1 || token < 0 || token >= page_size) throw nb::value_error("need 0 <= token < page_size");
        const auto f = static_cast<jax_flashmla::KvFormat>(format);
        nb::dict d;
        d["page_bytes"] = jax_flashmla::kv_page_bytes(f, page_size);
        d["record"] = jax_flashmla::kv_record_offset(f, token);
        d["scale"] = jax_flashmla::kv_scale_offset(f, page_size, token);
        d["rope"] = jax_flashmla::kv_rope_offset(f, token);
        return d;
      },
      nb::arg("format"), nb::arg("page_size"), nb::arg("token"),
      "Byte offsets in a page of an FP8 KV-cache pool (kv_formats.h): page_bytes, and the token's record, first "
      "scale and first RoPE value.");

  // The contract's sizing rules, so Python plans and sizes the workspace exactly as the handlers check.
  m.def(
      "num_sm_parts",
      [](int sm_count, int rows_per_head_k, int num_heads_k) {
        if (sm_count < 1 || rows_per_head_k < 1 || num_heads_k < 1) throw nb::value_error("arguments must be >= 1");
        return jax_flashmla::num_sm_parts_for(sm_count, rows_per_head_k, num_heads_k);
      },
      nb::arg("sm_count"), nb::arg("rows_per_head_k"), nb::arg("num_heads_k"),
      "Persistent CTAs per (kv head, row tile): num_sm_parts_for() of mla_contract.h.");
  m.def(
      "max_accum_slots",
      [](int num_sm_parts) {
        if (num_sm_parts < 1) throw nb::value_error("num_sm_parts must be >= 1");
        return jax_flashmla::max_accum_slots(num_sm_parts);
      },
      nb::arg("num_sm_parts"), "Split-accumulator slots of the workspace: max_accum_slots() of mla_contract.h.");
}
