#include "cpu/sparse_prefill_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace jax_flashmla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

float widen_bf16(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

uint16_t narrow_to_bf16(float f) {  // round to nearest even; NaN stays a quiet NaN
  if (std::isnan(f)) return 0x7fc0;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Dot product of two float rows with eight independent partial sums (so the compiler can keep them in
// vector lanes without reassociating a single sum).
float dot(const float* a, const float* b, int n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int l = 0; l < 8; ++l) part[l] += a[c + l] * b[c + l];
  }
  for (; c < n; ++c) part[0] += a[c] * b[c];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Scratch space of one worker, reused across its items.
struct Scratch {
  std::vector<float> rows;    // the token's valid kv rows as floats, [n, head_dim]
  std::vector<float> query;   // one head's query, [head_dim]
  std::vector<float> scores;  // [n]
  std::vector<float> acc;     // [head_dim_v]
};

// Widens the kv rows that query token `token`'s valid entries name into scratch.rows; returns their count.
int gather_rows(const SparsePrefillParams& p, int64_t token, Scratch& s) {
  int used = p.topk;
  if (p.topk_length != nullptr) used = std::clamp(p.topk_length[token], 0, p.topk);
  const int32_t* row = p.indices + token * p.topk;
  s.rows.clear();
  int n = 0;
  for (int j = 0; j < used; ++j) {
    const int64_t id = row[j];
    if (id < 0 || id >= p.seqlen_kv) continue;  // an unused entry (-1, or any id outside the kv rows)
    s.rows.resize(s.rows.size() + p.head_dim);
    float* dst = s.rows.data() + static_cast<int64_t>(n) * p.head_dim;
    const uint16_t* src = p.kv + id * p.head_dim;
    for (int c = 0; c < p.head_dim; ++c) dst[c] = widen_bf16(src[c]);
    ++n;
  }
  return n;
}

// Heads [head_begin, head_end) of query token `token`, over the n rows in scratch.rows.
void attend(const SparsePrefillParams& p, int64_t token, int n, int head_begin, int head_end, Scratch& s) {
  const int d = p.head_dim;
  const int dv = p.head_dim_v;
  s.query.resize(d);
  s.scores.resize(std::max(n, 1));
  s.acc.resize(dv);
  for (int h = head_begin; h < head_end; ++h) {
    const int64_t row = token * p.num_heads_q + h;
    uint16_t* out = p.out + row * dv;
    if (n == 0) {  // no valid entry: out 0, lse +inf and max_logits -inf, whatever the sink
      std::fill(out, out + dv, narrow_to_bf16(0.f));
      p.max_logits[row] = -kInf;
      p.lse[row] = kInf;
      continue;
    }
    const uint16_t* q = p.q + row * d;
    for (int c = 0; c < d; ++c) s.query[c] = widen_bf16(q[c]);
    float row_max = -kInf;
    bool has_nan = false;
    for (int t = 0; t < n; ++t) {
      const float score = dot(s.query.data(), s.rows.data() + static_cast<int64_t>(t) * d, d) * p.softmax_scale;
      s.scores[t] = score;
      if (std::isnan(score)) has_nan = true;
      row_max = std::max(row_max, score);
    }
    // NaN in q or in a row the token reads makes the token's max_logits, lse and out NaN.
    if (has_nan) row_max = std::numeric_limits<float>::quiet_NaN();
    std::fill(s.acc.begin(), s.acc.end(), 0.f);
    float row_sum = 0.f;
    for (int t = 0; t < n; ++t) {
      const float w = std::exp(s.scores[t] - row_max);
      row_sum += w;
      const float* value = s.rows.data() + static_cast<int64_t>(t) * d;
      for (int c = 0; c < dv; ++c) s.acc[c] += w * value[c];
    }
    const float row_lse = std::log(row_sum) + row_max;
    float factor = 1.f / row_sum;
    // The sink scales out by exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)): +inf gives 0,
    // -inf gives 1. lse and max_logits stay those of the named rows.
    if (p.attn_sink != nullptr) factor *= 1.f / (1.f + std::exp(p.attn_sink[h] - row_lse));
    for (int c = 0; c < dv; ++c) out[c] = narrow_to_bf16(s.acc[c] * factor);
    p.max_logits[row] = row_max;
    p.lse[row] = row_lse;
  }
}

}  // namespace

void sparse_prefill_cpu(const SparsePrefillParams& p) {
  if (p.seqlen_q == 0 || p.num_heads_q == 0) return;
  // Work items: (query token, group of heads). With few tokens the heads split too, so that a short
  // call still spreads over the threads; each item widens its token's rows once.
  const int64_t workers_max = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const int64_t head_groups = std::clamp<int64_t>((workers_max + p.seqlen_q - 1) / p.seqlen_q, 1, p.num_heads_q);
  const int64_t heads_per_group = (p.num_heads_q + head_groups - 1) / head_groups;
  const int64_t items = p.seqlen_q * head_groups;
  const int64_t workers = std::min(items, workers_max);
  auto work = [&](int64_t w) {
    Scratch s;
    int64_t gathered = -1;  // the token whose rows scratch holds
    int n = 0;
    for (int64_t item = w; item < items; item += workers) {
      const int64_t token = item / head_groups;
      const int head_begin = static_cast<int>((item % head_groups) * heads_per_group);
      const int head_end = static_cast<int>(std::min<int64_t>(head_begin + heads_per_group, p.num_heads_q));
      if (head_begin >= head_end) continue;
      if (token != gathered) {
        n = gather_rows(p, token, s);
        gathered = token;
      }
      attend(p, token, n, head_begin, head_end, s);
    }
  };
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(work, w);
  work(0);
  for (auto& t : threads) t.join();
}

}  // namespace jax_flashmla
