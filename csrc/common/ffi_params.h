// Reads the operands of the decode FFI call into DecodeParams, checking every shape and dtype the
// Python layer promises (so a mismatch between the two is an FFI error, never a bad memory access).
// Shared by the CPU and CUDA handlers.
#pragma once

#include <string>

#include "common/mla_contract.h"
#include "common/mla_params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flashmla {

namespace ffi = xla::ffi;

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_flashmla: " + what);
}

// The part counts the decode grid can hold (kMaxSmParts), for error messages.
inline std::string parts_range() { return "1 <= num_sm_parts <= " + std::to_string(kMaxSmParts); }

inline ffi::Error check_metadata_shapes(ffi::Buffer<ffi::S32> seqlens, ffi::ResultBuffer<ffi::S32> tile_md,
                                        ffi::ResultBuffer<ffi::S32> num_splits, int32_t num_sm_parts) {
  auto sd = seqlens.dimensions();
  auto td = tile_md->dimensions();
  auto nd = num_splits->dimensions();
  if (sd.size() != 1 || td.size() != 2 || nd.size() != 1 || num_sm_parts < 1 || num_sm_parts > kMaxSmParts ||
      td[0] != num_sm_parts ||
      td[1] != kTileMetadataSize || nd[0] != sd[0] + 1) {
    return invalid("metadata shapes do not match (cache_seqlens [b], tile_md [num_sm_parts, 8], num_splits [b+1], " +
                   parts_range() + ")");
  }
  return ffi::Error::Success();
}

// Fills `p` from the call's buffers; returns an error naming the first operand with a wrong shape.
inline ffi::Error read_decode_params(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32> block_table,
                                     ffi::Buffer<ffi::S32> seqlens, ffi::Buffer<ffi::S32> tile_md,
                                     ffi::Buffer<ffi::S32> num_splits, ffi::Result<ffi::AnyBuffer> out,
                                     ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> o_accum,
                                     ffi::ResultBuffer<ffi::F32> lse_accum, float softmax_scale, bool causal,
                                     DecodeParams& p) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 4 || qd[3] != kHeadDim) return invalid("q must be [b, s_q, h_q, 576]");
  if (kd.size() != 4 || kd[1] != kPageSize || kd[3] != kHeadDim) return invalid("k_cache must be [blocks, 64, h_kv, 576]");
  if (q.element_type() != k_cache.element_type()) return invalid("q and k_cache dtypes differ");
  if (q.element_type() == ffi::DataType::BF16) {
    p.dtype = ElementType::kBF16;
  } else if (q.element_type() == ffi::DataType::F16) {
    p.dtype = ElementType::kF16;
  } else {
    return invalid("q must be bfloat16 or float16");
  }
  p.batch = static_cast<int>(qd[0]);
  p.seqlen_q = static_cast<int>(qd[1]);
  p.num_heads_q = static_cast<int>(qd[2]);
  p.num_blocks = static_cast<int>(kd[0]);
  p.num_heads_k = static_cast<int>(kd[2]);
  if (p.num_heads_k < 1 || p.num_heads_q % p.num_heads_k != 0) return invalid("h_q must be a multiple of h_kv");
  p.q_heads_per_k = p.num_heads_q / p.num_heads_k;
  p.rows_per_head_k = p.seqlen_q * p.q_heads_per_k;

  auto bd = block_table.dimensions();
  if (bd.size() != 2 || bd[0] != p.batch) return invalid("block_table must be [b, max_blocks_per_seq]");
  p.max_blocks_per_seq = static_cast<int>(bd[1]);
  if (seqlens.dimensions().size() != 1 || seqlens.dimensions()[0] != p.batch) return invalid("cache_seqlens must be [b]");
  auto td = tile_md.dimensions();
  if (td.size() != 2 || td[1] != kTileMetadataSize || td[0] < 1 || td[0] > kMaxSmParts) {
    return invalid("tile_md must be [num_sm_parts, 8] with " + parts_range());
  }
  p.num_sm_parts = static_cast<int>(td[0]);
  if (num_splits.dimensions().size() != 1 || num_splits.dimensions()[0] != p.batch + 1) {
    return invalid("num_splits must be [b + 1]");
  }
  auto od = out->dimensions();
  if (od.size() != 4 || od[0] != p.batch || od[1] != p.seqlen_q || od[2] != p.num_heads_q || od[3] != kHeadDimV ||
      out->element_type() != q.element_type()) {
    return invalid("out must be [b, s_q, h_q, 512] in q's dtype");
  }
  const int64_t slots = max_accum_slots(p.num_sm_parts);
  if (lse->element_count() != static_cast<int64_t>(p.batch) * p.num_heads_q * p.seqlen_q ||
      o_accum->element_count() != slots * p.num_heads_k * p.rows_per_head_k * kHeadDimV ||
      lse_accum->element_count() != slots * p.num_heads_k * p.rows_per_head_k) {
    return invalid("lse or split-accumulator workspace has the wrong size");
  }
  p.softmax_scale = softmax_scale;
  p.causal = causal;
  p.q = q.untyped_data();
  p.k_cache = k_cache.untyped_data();
  p.block_table = block_table.typed_data();
  p.seqlens = seqlens.typed_data();
  p.tile_md = tile_md.typed_data();
  p.num_splits = num_splits.typed_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  p.o_accum = o_accum->typed_data();
  p.lse_accum = lse_accum->typed_data();
  return ffi::Error::Success();
}

// The handlers' signatures, bound identically on every platform.
#define JFM_BIND_METADATA_ARGS(binding)                              \
  binding.Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()  /* cache_seqlens */ \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()     /* tile_md */       \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()     /* num_splits */    \
      .Attr<int32_t>("num_sm_parts")

#define JFM_BIND_DECODE_ARGS(binding)                                \
  binding.Arg<::xla::ffi::AnyBuffer>()              /* q */             \
      .Arg<::xla::ffi::AnyBuffer>()                 /* k_cache */       \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* block_table */   \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* cache_seqlens */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* tile_md */       \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()   /* num_splits */    \
      .Ret<::xla::ffi::AnyBuffer>()                 /* out */           \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* lse */           \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* o_accum */       \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()   /* lse_accum */     \
      .Attr<float>("softmax_scale")                                      \
      .Attr<bool>("causal")

}  // namespace jax_flashmla
