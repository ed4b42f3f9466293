// XLA FFI handlers of the "cpu" platform.
#include "common/ffi_params.h"
#include "cpu/mla_decode_cpu.h"

namespace jax_flashmla {
namespace {

ffi::Error metadata_cpu(ffi::Buffer<ffi::S32> seqlens, ffi::ResultBuffer<ffi::S32> tile_md,
                        ffi::ResultBuffer<ffi::S32> num_splits, int32_t num_sm_parts) {
  if (auto err = check_metadata_shapes(seqlens, tile_md, num_splits, num_sm_parts); err.failure()) return err;
  const int batch = static_cast<int>(seqlens.dimensions()[0]);
  if (std::string err = check_seqlens(seqlens.typed_data(), batch); !err.empty()) return invalid(err);
  schedule_tiles(seqlens.typed_data(), batch, num_sm_parts,
                 tile_md->typed_data(), num_splits->typed_data());
  return ffi::Error::Success();
}

ffi::Error decode_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32> block_table,
                      ffi::Buffer<ffi::S32> seqlens, ffi::Buffer<ffi::S32> tile_md, ffi::Buffer<ffi::S32> num_splits,
                      ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> lse,
                      ffi::ResultBuffer<ffi::F32> o_accum, ffi::ResultBuffer<ffi::F32> lse_accum, float softmax_scale,
                      bool causal) {
  DecodeParams p;
  if (auto err = read_decode_params(q, k_cache, block_table, seqlens, tile_md, num_splits, out, lse, o_accum,
                                    lse_accum, softmax_scale, causal, p);
      err.failure()) {
    return err;
  }
  if (std::string err = mla_decode_cpu(p); !err.empty()) return invalid(err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmMetadataCpu, jax_flashmla::metadata_cpu, JFM_BIND_METADATA_ARGS(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmDecodeCpu, jax_flashmla::decode_cpu, JFM_BIND_DECODE_ARGS(xla::ffi::Ffi::Bind()));
