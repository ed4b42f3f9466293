// XLA FFI handlers of the "cpu" platform.
#include <cstdint>
#include <limits>
#include <string>

#include "common/ffi_params.h"
#include "common/sparse_ffi_params.h"
#include "cpu/mla_decode_cpu.h"
#include "cpu/sparse_decode_cpu.h"
#include "cpu/sparse_prefill_cpu.h"

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


// Operands and results: read_sparse_decode_params (common/sparse_ffi_params.h).
ffi::Error sparse_decode_cpu_handler(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32> indices,
                                     ffi::Buffer<ffi::S32> topk_length, ffi::Buffer<ffi::F32> attn_sink,
                                     ffi::AnyBuffer extra_k_cache, ffi::Buffer<ffi::S32> extra_indices,
                                     ffi::Buffer<ffi::S32> extra_topk_length, ffi::Result<ffi::AnyBuffer> out,
                                     ffi::ResultBuffer<ffi::F32> lse, float softmax_scale) {
  SparseDecodeParams p;
  if (auto err = read_sparse_decode_params(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                                           extra_topk_length, out, lse, softmax_scale, p);
      err.failure()) {
    return err;
  }
  if (std::string err = sparse_decode_cpu(p); !err.empty()) return invalid(err);
  return ffi::Error::Success();
}


// Operands: q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk] (both bf16), indices [s_q, 1, topk], topk_length
// [s_q] and attn_sink [h_q]; an absent optional operand is an empty buffer. Results: out bf16
// [s_q, h_q, 512], max_logits and lse float32 [s_q, h_q].
ffi::Error sparse_prefill_cpu_handler(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> indices,
                                      ffi::Buffer<ffi::S32> topk_length, ffi::Buffer<ffi::F32> attn_sink,
                                      ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> max_logits,
                                      ffi::ResultBuffer<ffi::F32> lse, float softmax_scale) {
  SparsePrefillParams p;
  if (auto err = read_sparse_prefill_params(q, kv, indices, topk_length, attn_sink, out, max_logits, lse,
                                            softmax_scale, p);
      err.failure()) {
    return err;
  }
  sparse_prefill_cpu(p);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmMetadataCpu, jax_flashmla::metadata_cpu, JFM_BIND_METADATA_ARGS(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmDecodeCpu, jax_flashmla::decode_cpu, JFM_BIND_DECODE_ARGS(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmSparseDecodeCpu, jax_flashmla::sparse_decode_cpu_handler,
                              JFM_BIND_SPARSE_DECODE_ARGS(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmSparsePrefillCpu, jax_flashmla::sparse_prefill_cpu_handler,
                              JFM_BIND_SPARSE_PREFILL_ARGS(xla::ffi::Ffi::Bind()));
