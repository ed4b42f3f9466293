// The Python extension: hands JAX the XLA FFI handlers as capsules, and exposes the host scheduler.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <vector>

#include "common/mla_contract.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmMetadataCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmDecodeCpu);
#ifdef JFM_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmMetadataCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JfmDecodeCuda);
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
    return c;
  });

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
