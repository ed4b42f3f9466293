// Parameters of the sparse decode over FP8 token pools (kv_formats.h), shared by the CPU handler and
// the SM90 kernel: plain pointers into the call's buffers (host memory on the CPU, device memory on
// the GPU) and the shapes read from them.
#pragma once

#include <cstdint>

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

  JFM_HOST_DEVICE int64_t num_slots() const { return static_cast<int64_t>(num_blocks) * page_size; }
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

}  // namespace jax_flashmla
