// Parameters of the indexer-logits op (DeepGEMM's fp8_paged_mqa_logits contract, jax_flashmla/indexer.py):
// plain pointers into the call's device buffers and the shapes read from them.
#pragma once

#include <cstdint>

namespace jax_flashmla {

// The SM90 kernel's domain; other shapes take the pure-JAX path (the Python layer decides).
constexpr int kIndexerHeadDim = 128;  // channels of an index query head and of an index key
constexpr int kIndexerMaxHeads = 64;  // index heads of one query token (DeepSeek-V3.2: 64)
constexpr int kIndexerPageSize = 64;  // tokens per page of the key pool
constexpr int kIndexerRowBytes = kIndexerHeadDim + 4;  // a key's 128 e4m3 values and its float32 scale

struct IndexerLogitsParams {
  int batch = 0;
  int next_n = 0;     // query tokens per request
  int num_heads = 0;  // 1 .. kIndexerMaxHeads
  int num_pages = 0;  // pages of the key pool
  int table_width = 0;  // block_table's columns
  int64_t logits_width = 0;  // max_context_len: the logits' columns
  const uint8_t* q = nullptr;        // e4m3 [batch, next_n, num_heads, 128]
  const uint8_t* pool = nullptr;     // [num_pages, 64 * 132] bytes: 64 keys' values, then their scales
  const float* weights = nullptr;    // [batch * next_n, num_heads]
  const int32_t* limits = nullptr;   // [batch, next_n]: query (i, j) sees positions < limits[i, j]
  const int32_t* block_table = nullptr;  // [batch, table_width]
  float* logits = nullptr;           // [batch * next_n, logits_width]
  int pages_per_cta = 1;             // page columns one CTA walks (set by the launcher)
};

// The top-k of the indexer's logits (indexer._select with lo = 0), the opt-in SM90 kernel's operands.
constexpr int kIndexerTopkMax = 2048;  // the kernel's largest topk (DeepSeek-V3.2's index_topk)

struct IndexerTopkParams {
  int64_t rows = 0;
  int64_t width = 0;               // logits' columns, < 2^31
  int topk = 0;                    // 1 .. kIndexerTopkMax
  const float* logits = nullptr;   // [rows, width]
  const int32_t* visible = nullptr;  // [rows]: row r picks among positions < visible[r]
  int32_t* positions = nullptr;    // [rows, topk]: best first, -1 past the visible count
};

}  // namespace jax_flashmla
