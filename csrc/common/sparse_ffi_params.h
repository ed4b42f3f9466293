// Reads the operands of the sparse decode and sparse prefill FFI calls into SparseDecodeParams and
// SparsePrefillParams, checking every shape and dtype the Python layer promises (a mismatch between
// the two is an FFI error, never a bad memory access). Shared by the CPU and CUDA handlers; index
// values are not read here (they may live on the device).
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "common/ffi_params.h"
#include "common/kv_formats.h"
#include "common/sparse_params.h"

namespace jax_flashmla {

// An FP8 pool operand: its format from the row bytes (656 v32, 576 model1), its page size from the
// rows per page. Returns an error naming `name` when it is neither.
inline ffi::Error read_sparse_pool(ffi::AnyBuffer pool, const char* name, SparsePool& out) {
  auto dims = pool.dimensions();
  if (pool.element_type() != ffi::DataType::U8 && pool.element_type() != ffi::DataType::F8E4M3FN) {
    return invalid(std::string(name) + " must be uint8 or float8_e4m3fn bytes");
  }
  if (dims.size() != 4 || dims[2] != 1) {
    return invalid(std::string(name) + " must be [num_blocks, rows_per_page, 1, 656 or 576]");
  }
  if (dims[3] == kv_format_layout(KvFormat::kV32).record_bytes) {
    out.format = KvFormat::kV32;
  } else if (dims[3] == kv_format_layout(KvFormat::kModel1).record_bytes) {
    out.format = KvFormat::kModel1;
  } else {
    return invalid(std::string(name) + " rows must be 656 (v32) or 576 (model1) bytes");
  }
  out.page_size = sparse_page_size(out.format, dims[1]);
  if (out.page_size == 0) return invalid(std::string(name) + " has a row count per page that no page size gives");
  if (dims[0] < 0 || dims[0] > std::numeric_limits<int32_t>::max()) {
    return invalid(std::string(name) + " has too many pages");
  }
  out.num_blocks = static_cast<int>(dims[0]);
  out.bytes = static_cast<const uint8_t*>(pool.untyped_data());
  return ffi::Error::Success();
}

inline ffi::Error read_sparse_indices(ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> lengths, const char* name,
                               const SparseDecodeParams& p, SparsePool& out) {
  auto dims = indices.dimensions();
  if (dims.size() != 3 || dims[0] != p.batch || dims[1] != p.seqlen_q) {
    return invalid(std::string(name) + " must be [b, s_q, topk]");
  }
  out.indices = indices.typed_data();
  out.topk = static_cast<int>(dims[2]);
  // An empty length buffer stands for "no topk_length": every entry is read.
  if (lengths.element_count() == 0) {
    out.topk_length = nullptr;
  } else if (lengths.dimensions().size() != 1 || lengths.dimensions()[0] != p.batch) {
    return invalid(std::string(name) + "'s lengths must be [b] or empty");
  } else {
    out.topk_length = lengths.typed_data();
  }
  return ffi::Error::Success();
}

// Operands: q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
// extra_topk_length; results out and lse. An optional operand that is absent is an empty buffer
// (extra_indices with topk 0 for the extra pool, which is then never read).
inline ffi::Error read_sparse_decode_params(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32> indices,
                                            ffi::Buffer<ffi::S32> topk_length, ffi::Buffer<ffi::F32> attn_sink,
                                            ffi::AnyBuffer extra_k_cache, ffi::Buffer<ffi::S32> extra_indices,
                                            ffi::Buffer<ffi::S32> extra_topk_length, ffi::Result<ffi::AnyBuffer> out,
                                            ffi::ResultBuffer<ffi::F32> lse, float softmax_scale,
                                            SparseDecodeParams& p) {
  auto qd = q.dimensions();
  if (q.element_type() != ffi::DataType::BF16 || qd.size() != 4) {
    return invalid("q must be bfloat16 [b, s_q, h_q, d_qk]");
  }
  p.batch = static_cast<int>(qd[0]);
  p.seqlen_q = static_cast<int>(qd[1]);
  p.num_heads_q = static_cast<int>(qd[2]);
  p.head_dim = static_cast<int>(qd[3]);
  if (auto err = read_sparse_pool(k_cache, "k_cache", p.pool); err.failure()) return err;
  if (p.head_dim != kv_format_layout(p.pool.format).d_qk) {
    return invalid("q's head dim does not match k_cache's format");
  }
  if (auto err = read_sparse_indices(indices, topk_length, "indices", p, p.pool); err.failure()) return err;
  if (auto err = read_sparse_indices(extra_indices, extra_topk_length, "extra_indices_in_kvcache", p, p.extra);
      err.failure()) {
    return err;
  }
  if (p.extra.topk > 0) {
    if (auto err = read_sparse_pool(extra_k_cache, "extra_k_cache", p.extra); err.failure()) return err;
    if (p.extra.format != p.pool.format) return invalid("extra_k_cache's format differs from k_cache's");
  }
  if (attn_sink.element_count() != 0) {
    if (attn_sink.element_count() != static_cast<size_t>(p.num_heads_q)) {
      return invalid("attn_sink must be [h_q] or empty");
    }
    p.attn_sink = attn_sink.typed_data();
  }
  auto od = out->dimensions();
  if (out->element_type() != ffi::DataType::BF16 || od.size() != 4 || od[0] != p.batch || od[1] != p.seqlen_q ||
      od[2] != p.num_heads_q || od[3] != kHeadDimV) {
    return invalid("out must be bfloat16 [b, s_q, h_q, 512]");
  }
  if (lse->element_count() != static_cast<size_t>(p.batch) * p.num_heads_q * p.seqlen_q) {
    return invalid("lse must be [b, h_q, s_q]");
  }
  p.q = static_cast<const uint16_t*>(q.untyped_data());
  p.softmax_scale = softmax_scale;
  p.out = static_cast<uint16_t*>(out->untyped_data());
  p.lse = lse->typed_data();
  return ffi::Error::Success();
}

// The split workspace of the CUDA sparse decode handler (results the op discards): o_accum
// [S, b, s_q, h_q, 512] and lse_accum [S, b, s_q, h_q], float32, or both empty (S = 0: the kernel
// may not split). Sets `splits` to S; p.o_accum and p.lse_accum to the buffers.
inline ffi::Error read_sparse_decode_workspace(ffi::ResultBuffer<ffi::F32> o_accum, ffi::ResultBuffer<ffi::F32> lse_accum,
                                               SparseDecodeParams& p, int64_t& splits) {
  splits = 0;
  if (o_accum->element_count() == 0 && lse_accum->element_count() == 0) return ffi::Error::Success();
  auto od = o_accum->dimensions();
  auto ld = lse_accum->dimensions();
  if (od.size() != 5 || ld.size() != 4 || od[0] != ld[0] || od[0] < 1 || od[0] > std::numeric_limits<int32_t>::max()) {
    return invalid("the split workspace must be [S, b, s_q, h_q, 512] and [S, b, s_q, h_q]");
  }
  for (int i = 1; i < 4; ++i) {
    const int64_t want = i == 1 ? p.batch : i == 2 ? p.seqlen_q : p.num_heads_q;
    if (od[i] != want || ld[i] != want) return invalid("the split workspace does not match q's [b, s_q, h_q]");
  }
  if (od[4] != kHeadDimV) return invalid("the split workspace must hold 512 channels a row");
  splits = od[0];
  p.o_accum = o_accum->typed_data();
  p.lse_accum = lse_accum->typed_data();
  return ffi::Error::Success();
}

// The sparse decode CPU handler's signature. The CUDA handler binds the same operands and
// attribute, and two more results and one more attribute (JFM_BIND_SPARSE_DECODE_CUDA_ARGS).
#define JFM_BIND_SPARSE_DECODE_ARGS(binding)                                   \
  binding.Arg<::xla::ffi::AnyBuffer>()              /* q */                        \
      .Arg<::xla::ffi::AnyBuffer>()                 /* k_cache */                  \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* indices */                  \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* topk_length */              \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* attn_sink */                \
      .Arg<::xla::ffi::AnyBuffer>()                 /* extra_k_cache */            \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* extra_indices_in_kvcache */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* extra_topk_length */        \
      .Ret<::xla::ffi::AnyBuffer>()                 /* out */                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* lse */                      \
      .Attr<float>("softmax_scale")

// The CUDA handler's: the CPU handler's operands, then the split workspace (o_accum, lse_accum),
// and the attribute num_splits (0: the handler chooses; N > 0: exactly N, a test hook).
#define JFM_BIND_SPARSE_DECODE_CUDA_ARGS(binding)                              \
  binding.Arg<::xla::ffi::AnyBuffer>()              /* q */                        \
      .Arg<::xla::ffi::AnyBuffer>()                 /* k_cache */                  \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* indices */                  \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* topk_length */              \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* attn_sink */                \
      .Arg<::xla::ffi::AnyBuffer>()                 /* extra_k_cache */            \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* extra_indices_in_kvcache */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* extra_topk_length */        \
      .Ret<::xla::ffi::AnyBuffer>()                 /* out */                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* lse */                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* o_accum */                  \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* lse_accum */                \
      .Attr<float>("softmax_scale")                                                \
      .Attr<int32_t>("num_splits")

// q, kv, indices and topk_length, checked and read alike by the forward and the backward.
inline ffi::Error read_sparse_prefill_inputs(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> indices,
                                             ffi::Buffer<ffi::S32> topk_length, SparsePrefillParams& p) {
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
  p.q = static_cast<const uint16_t*>(q.untyped_data());
  p.kv = static_cast<const uint16_t*>(kv.untyped_data());
  p.indices = indices.typed_data();
  return ffi::Error::Success();
}

// Operands: q, kv, indices, topk_length, attn_sink; results out, max_logits and lse. An optional
// operand that is absent is an empty buffer. Index values are not read here (they may live on the
// device): ids outside [0, s_kv) are unused entries wherever they are read.
inline ffi::Error read_sparse_prefill_params(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> indices,
                                             ffi::Buffer<ffi::S32> topk_length, ffi::Buffer<ffi::F32> attn_sink,
                                             ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> max_logits,
                                             ffi::ResultBuffer<ffi::F32> lse, float softmax_scale,
                                             SparsePrefillParams& p) {
  if (auto err = read_sparse_prefill_inputs(q, kv, indices, topk_length, p); err.failure()) return err;
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
  p.softmax_scale = softmax_scale;
  p.out = static_cast<uint16_t*>(out->untyped_data());
  p.max_logits = max_logits->typed_data();
  p.lse = lse->typed_data();
  return ffi::Error::Success();
}

// The sparse prefill handlers' signature, bound identically on every platform.
#define JFM_BIND_SPARSE_PREFILL_ARGS(binding)                        \
  binding.Arg<::xla::ffi::AnyBuffer>()             /* q */           \
      .Arg<::xla::ffi::AnyBuffer>()                /* kv */          \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()  /* indices */     \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()  /* topk_length */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* attn_sink */   \
      .Ret<::xla::ffi::AnyBuffer>()                /* out */         \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* max_logits */  \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* lse */         \
      .Attr<float>("softmax_scale")

// The sparse prefill backward's CUDA handler: operands q, kv, indices, topk_length (empty when absent),
// lse, d_out (bfloat16), sig and delta (float32 [s_q, h_q], the op's per-row factors); results dq
// (bfloat16, like q) and dkv (float32 [s_kv, 1, d_qk]). The same checks as the forward's.
inline ffi::Error read_sparse_prefill_bwd_params(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> indices,
                                                 ffi::Buffer<ffi::S32> topk_length, ffi::Buffer<ffi::F32> lse,
                                                 ffi::AnyBuffer d_out, ffi::Buffer<ffi::F32> sig,
                                                 ffi::Buffer<ffi::F32> delta, ffi::Result<ffi::AnyBuffer> dq,
                                                 ffi::ResultBuffer<ffi::F32> dkv, float softmax_scale,
                                                 SparsePrefillBwdParams& b) {
  SparsePrefillParams& p = b.fwd;
  if (auto err = read_sparse_prefill_inputs(q, kv, indices, topk_length, p); err.failure()) return err;
  const size_t rows = static_cast<size_t>(p.seqlen_q) * p.num_heads_q;
  if (lse.element_count() != rows || sig.element_count() != rows || delta.element_count() != rows) {
    return invalid("lse, sig and delta must be [s_q, h_q]");
  }
  auto dd = d_out.dimensions();
  if (d_out.element_type() != ffi::DataType::BF16 || dd.size() != 3 || dd[0] != p.seqlen_q ||
      dd[1] != p.num_heads_q || dd[2] != kHeadDimV) {
    return invalid("d_out must be bfloat16 [s_q, h_q, 512]");
  }
  auto gd = dq->dimensions();
  if (dq->element_type() != ffi::DataType::BF16 || gd.size() != 3 || gd[0] != p.seqlen_q ||
      gd[1] != p.num_heads_q || gd[2] != p.head_dim) {
    return invalid("dq must be bfloat16 shaped like q");
  }
  auto vd = dkv->dimensions();
  if (vd.size() != 3 || vd[0] != p.seqlen_kv || vd[1] != 1 || vd[2] != p.head_dim) {
    return invalid("dkv must be float32 shaped like kv");
  }
  p.softmax_scale = softmax_scale;
  b.lse = lse.typed_data();
  b.d_out = static_cast<const uint16_t*>(d_out.untyped_data());
  b.sig = sig.typed_data();
  b.delta = delta.typed_data();
  b.dq = static_cast<uint16_t*>(dq->untyped_data());
  b.dkv = dkv->typed_data();
  return ffi::Error::Success();
}

// The sparse prefill backward's signature (CUDA only: elsewhere the backward is pure JAX).
#define JFM_BIND_SPARSE_PREFILL_BWD_ARGS(binding)                    \
  binding.Arg<::xla::ffi::AnyBuffer>()             /* q */           \
      .Arg<::xla::ffi::AnyBuffer>()                /* kv */          \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()  /* indices */     \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()  /* topk_length */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* lse */         \
      .Arg<::xla::ffi::AnyBuffer>()                /* d_out */       \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* sig */         \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* delta */       \
      .Ret<::xla::ffi::AnyBuffer>()                /* dq */          \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()  /* dkv */         \
      .Attr<float>("softmax_scale")

}  // namespace jax_flashmla
