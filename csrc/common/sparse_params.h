// Parameters of the sparse ops, shared by the CPU handlers and the SM90 kernels: plain pointers into
// the call's buffers (host memory on the CPU, device memory on the GPU) and the shapes read from
// them. The sparse decode reads FP8 token pools (kv_formats.h); the sparse prefill a bfloat16 kv.
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

// Heads of one query token that one CTA of the SM90 sparse decode kernel computes (its tile's rows).
constexpr int kSparseDecodeHeadsPerCta = 64;

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
  // Split over the entries (SM90 kernel only; the CPU handler ignores these): each (request, query
  // token) walks its entry blocks in num_splits contiguous ranges, each range's partial result going
  // to the workspace, then a combine writes out and lse. num_splits 1: out and lse directly, no
  // workspace. Rows of the workspace are the rows of out, (request, token, head); split s's rows
  // start at s * batch * seqlen_q * num_heads_q.
  int num_splits = 1;
  float* o_accum = nullptr;             // [>= num_splits, batch, seqlen_q, num_heads_q, 512]: O / l per split
  float* lse_accum = nullptr;           // [>= num_splits, batch, seqlen_q, num_heads_q]: its lse, -inf if empty
};

// The sparse prefill (FlashMLA's flash_mla_sparse_fwd): every query token attends, with every head,
// to the kv rows its row of indices names.
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

// The sparse prefill's backward (dq and dkv; the SM90 kernel only). The per-row factors come from
// the op's JAX pre-step: sig = sigmoid(lse - sink) (1 without a sink) and delta = sig * sum_v(d_out *
// out) - d_lse, both 0 on a row with no valid entry.
struct SparsePrefillBwdParams {
  SparsePrefillParams fwd;          // q, kv, indices, topk_length, shapes, softmax_scale (no results)
  const float* lse = nullptr;       // [seqlen_q, num_heads_q], natural log, as the forward returned it
  const uint16_t* d_out = nullptr;  // bf16 [seqlen_q, num_heads_q, head_dim_v]
  const float* sig = nullptr;       // [seqlen_q, num_heads_q]
  const float* delta = nullptr;     // [seqlen_q, num_heads_q]
  uint16_t* dq = nullptr;           // bf16 [seqlen_q, num_heads_q, head_dim]
  float* dkv = nullptr;             // [seqlen_kv, head_dim]: zeroed by the handler, summed into by the kernel
};

}  // namespace jax_flashmla
