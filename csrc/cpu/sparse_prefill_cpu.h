// The CPU implementation of the sparse prefill contract (FlashMLA's flash_mla_sparse_fwd): every query
// token attends, with every head, to the kv rows its row of indices names.
#pragma once

#include <cstdint>

namespace jax_flashmla {

struct SparsePrefillParams {
  int64_t seqlen_q = 0;
  int64_t seqlen_kv = 0;
  int num_heads_q = 0;
  int head_dim = 0;    // d_qk: 576 or 512
  int head_dim_v = 0;  // d_v: 512, V being the first d_v channels of a kv row
  int topk = 0;
  const uint16_t* q = nullptr;            // bf16 [seqlen_q, num_heads_q, head_dim]
  const uint16_t* kv = nullptr;           // bf16 [seqlen_kv, head_dim] (one kv head)
  const int32_t* indices = nullptr;       // [seqlen_q, topk]; ids outside [0, seqlen_kv) are unused entries
  const int32_t* topk_length = nullptr;   // [seqlen_q] or null: token i reads its first topk_length[i] entries
  const float* attn_sink = nullptr;       // [num_heads_q] or null
  float softmax_scale = 0.f;
  uint16_t* out = nullptr;                // bf16 [seqlen_q, num_heads_q, head_dim_v]
  float* max_logits = nullptr;            // [seqlen_q, num_heads_q]
  float* lse = nullptr;                   // [seqlen_q, num_heads_q], natural log
};

// Runs the sparse prefill on the host, spread over the machine's threads. Never fails: an id outside
// the kv rows is an unused entry, as in FlashMLA.
void sparse_prefill_cpu(const SparsePrefillParams& p);

}  // namespace jax_flashmla
