// The CPU implementation of the sparse decode contract over an FP8 token pool (kv_formats.h): every
// query token attends to the pool slots its row of indices names, from one pool or two.
#pragma once

#include <cstdint>
#include <string>

#include "common/kv_formats.h"

namespace jax_flashmla {

// One FP8 pool and the slot ids into it.
struct SparsePool {
  const uint8_t* bytes = nullptr;  // num_blocks pages of kv_page_bytes(format, page_size) bytes
  KvFormat format = KvFormat::kV32;
  int num_blocks = 0;
  int page_size = 0;
  const int32_t* indices = nullptr;      // [batch, seqlen_q, topk], slot ids, -1 unused
  int topk = 0;                          // 0: the pool takes no part
  const int32_t* topk_length = nullptr;  // [batch] or null: request i reads its first topk_length[i] entries

  int64_t num_slots() const { return static_cast<int64_t>(num_blocks) * page_size; }
};

struct SparseDecodeParams {
  int batch = 0;
  int seqlen_q = 0;
  int num_heads_q = 0;
  int head_dim = 0;  // d_qk of q and of the pools' format
  const uint16_t* q = nullptr;          // bf16 [batch, seqlen_q, num_heads_q, head_dim]
  SparsePool pool;                      // k_cache
  SparsePool extra;                     // extra_k_cache (topk 0 when absent)
  const float* attn_sink = nullptr;     // [num_heads_q] or null
  float softmax_scale = 0.f;
  uint16_t* out = nullptr;              // bf16 [batch, seqlen_q, num_heads_q, head_dim_v]
  float* lse = nullptr;                 // [batch, num_heads_q, seqlen_q]
};

// The page size of a pool whose pages are `rows_per_page` rows of the format's record, or 0 when no
// page size gives that many rows.
int sparse_page_size(KvFormat format, int64_t rows_per_page);

// Dequantises token `slot` of a pool into `dst` (d_qk floats, each rounded to bfloat16 as
// jax_flashmla.dequantize_kv_cache does).
void dequantize_token(const uint8_t* pool, KvFormat format, int page_size, int64_t slot, float* dst);

// Runs the sparse decode on the host. Returns an empty string on success, else the error (an index
// outside its pool, naming the request, query token and position).
std::string sparse_decode_cpu(const SparseDecodeParams& p);

}  // namespace jax_flashmla
