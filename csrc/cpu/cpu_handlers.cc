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
  auto qd = q.dimensions();
  if (q.element_type() != ffi::DataType::BF16 || qd.size() != 3 || (qd[2] != 576 && qd[2] != 512)) {
    return invalid("q must be bfloat16 [s_q, h_q, 576 or 512]");
  }
  p.seqlen_q = qd[0];
  p.num_heads_q = static_cast<int>(qd[1]);
  p.head_dim = static_cast<int>(qd[2]);
  p.head_dim_v = kHeadDimV;
  auto kd = kv.dimensions();
  if (kv.element_type() != ffi::DataType::BF16 || kd.size() != 3 || kd[1] != 1 || kd[2] != p.head_dim) {
    return invalid("kv must be bfloat16 [s_kv, 1, d_qk of q]");
  }
  p.seqlen_kv = kd[0];
  auto id = indices.dimensions();
  if (id.size() != 3 || id[0] != p.seqlen_q || id[1] != 1 || id[2] < 1 ||
      id[2] > std::numeric_limits<int32_t>::max()) {
    return invalid("indices must be [s_q, 1, topk >= 1]");
  }
  p.topk = static_cast<int>(id[2]);
  if (topk_length.element_count() != 0) {
    if (topk_length.dimensions().size() != 1 || topk_length.dimensions()[0] != p.seqlen_q) {
      return invalid("topk_length must be [s_q] or empty");
    }
    p.topk_length = topk_length.typed_data();
  }
  if (attn_sink.element_count() != 0) {
    if (attn_sink.dimensions().size() != 1 || attn_sink.dimensions()[0] != p.num_heads_q) {
      return invalid("attn_sink must be [h_q] or empty");
    }
    p.attn_sink = attn_sink.typed_data();
  }
  auto od = out->dimensions();
  if (out->element_type() != ffi::DataType::BF16 || od.size() != 3 || od[0] != p.seqlen_q ||
      od[1] != p.num_heads_q || od[2] != kHeadDimV) {
    return invalid("out must be bfloat16 [s_q, h_q, 512]");
  }
  const size_t rows = static_cast<size_t>(p.seqlen_q) * p.num_heads_q;
  if (max_logits->element_count() != rows || lse->element_count() != rows) {
    return invalid("max_logits and lse must be [s_q, h_q]");
  }
  p.q = static_cast<const uint16_t*>(q.untyped_data());
  p.kv = static_cast<const uint16_t*>(kv.untyped_data());
  p.indices = indices.typed_data();
  p.softmax_scale = softmax_scale;
  p.out = static_cast<uint16_t*>(out->untyped_data());
  p.max_logits = max_logits->typed_data();
  p.lse = lse->typed_data();
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
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()              // q
                                  .Arg<xla::ffi::AnyBuffer>()              // kv
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // indices
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // topk_length
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // attn_sink
                                  .Ret<xla::ffi::AnyBuffer>()              // out
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // max_logits
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // lse
                                  .Attr<float>("softmax_scale"));
