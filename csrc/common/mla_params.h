// Arguments of one decode call, as the FFI handlers hand them to the CPU implementation and the CUDA
// kernels. All tensors are dense and row-major in the shapes of the contract (README, "API").
#pragma once

#include <cstdint>

#include "common/mla_contract.h"

namespace jax_flashmla {

enum class ElementType { kBF16, kF16 };

struct DecodeParams {
  int batch = 0;
  int seqlen_q = 0;            // s_q
  int num_heads_q = 0;         // h_q
  int num_heads_k = 0;         // h_kv
  int num_blocks = 0;          // pages in the pool
  int max_blocks_per_seq = 0;  // block_table columns
  int num_sm_parts = 0;        // tile_md rows
  int q_heads_per_k = 0;       // h_q / h_kv
  int rows_per_head_k = 0;     // s_q * h_q / h_kv; row r is query token r / q_heads_per_k
  float softmax_scale = 0.f;
  bool causal = false;
  ElementType dtype = ElementType::kBF16;

  const void* q = nullptr;               // [batch, s_q, h_q, 576]
  const void* k_cache = nullptr;         // [num_blocks, 64, h_kv, 576]
  const int32_t* block_table = nullptr;  // [batch, max_blocks_per_seq]
  const int32_t* seqlens = nullptr;      // [batch]
  const int32_t* tile_md = nullptr;      // [num_sm_parts, 8]
  const int32_t* num_splits = nullptr;   // [batch + 1]

  void* out = nullptr;          // [batch, s_q, h_q, 512], dtype of q
  float* lse = nullptr;         // [batch, h_q, s_q]
  float* o_accum = nullptr;     // [max_accum_slots(num_sm_parts), h_kv, rows_per_head_k, 512]
  float* lse_accum = nullptr;   // [max_accum_slots(num_sm_parts), h_kv, rows_per_head_k]
};

// Query row `row` of kv head `kv_head` (the rows a kv head serves are its q heads, token-major) as
// a (token, head) pair, and where that pair lives in q/out, lse and the split accumulators. The
// CPU path, the decode kernel and the combine kernel all index through these.
struct QueryRow {
  int token;  // query token, 0 <= token < s_q
  int head;   // q head, 0 <= head < h_q
};

JFM_HOST_DEVICE inline int query_token(const DecodeParams& p, int row) { return row / p.q_heads_per_k; }

JFM_HOST_DEVICE inline QueryRow query_row(const DecodeParams& p, int kv_head, int row) {
  return {query_token(p, row), kv_head * p.q_heads_per_k + row % p.q_heads_per_k};
}

// Index of (req, token, head) in [b, s_q, h_q]: times 576 for q, times 512 for out.
JFM_HOST_DEVICE inline int64_t qo_row_index(const DecodeParams& p, int req, QueryRow r) {
  return (static_cast<int64_t>(req) * p.seqlen_q + r.token) * p.num_heads_q + r.head;
}

// Index of (req, head, token) in lse [b, h_q, s_q].
JFM_HOST_DEVICE inline int64_t lse_index(const DecodeParams& p, int req, QueryRow r) {
  return (static_cast<int64_t>(req) * p.num_heads_q + r.head) * p.seqlen_q + r.token;
}

// Index of (slot, kv head, row) in lse_accum [slots, h_kv, rows]: times 512 for o_accum.
JFM_HOST_DEVICE inline int64_t accum_row_index(const DecodeParams& p, int64_t slot, int kv_head, int row) {
  return (slot * p.num_heads_k + kv_head) * p.rows_per_head_k + row;
}

}  // namespace jax_flashmla
