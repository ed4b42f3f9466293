#include "cpu/sparse_decode_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace jax_flashmla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

uint16_t float_to_bf16_bits(float f) {  // round to nearest even, NaN stays NaN
  if (std::isnan(f)) return 0x7fc0;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float round_to_bf16(float f) { return bf16_bits_to_float(float_to_bf16_bits(f)); }

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
float e4m3fn_to_float(uint8_t byte) {
  const int exponent = (byte >> 3) & 0xF;
  const int mantissa = byte & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: mantissa / 8 * 2^-6
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);  // (1 + m / 8) * 2^(e - 7)
  }
  return (byte & 0x80) ? -magnitude : magnitude;
}

const float* e4m3fn_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int b = 0; b < 256; ++b) t[b] = e4m3fn_to_float(static_cast<uint8_t>(b));
    return t;
  }();
  return table.data();
}

int effective_length(const SparsePool& pool, int req) {
  if (pool.topk_length == nullptr) return pool.topk;
  return std::clamp(pool.topk_length[req], 0, pool.topk);
}

const int32_t* row_of(const SparsePool& pool, const SparseDecodeParams& p, int req, int token) {
  return pool.indices + (static_cast<int64_t>(req) * p.seqlen_q + token) * pool.topk;
}

// Every entry a request reads (before its topk_length) is -1 or a slot of the pool.
std::string check_indices(const SparseDecodeParams& p, const SparsePool& pool, const char* name,
                          const char* pool_name) {
  const int64_t num_slots = pool.num_slots();
  for (int req = 0; req < p.batch; ++req) {
    const int used = effective_length(pool, req);
    for (int token = 0; token < p.seqlen_q; ++token) {
      const int32_t* row = row_of(pool, p, req, token);
      for (int j = 0; j < used; ++j) {
        if (row[j] != -1 && (row[j] < 0 || row[j] >= num_slots)) {
          return std::string(name) + ": request " + std::to_string(req) + ", query token " + std::to_string(token) +
                 ", position " + std::to_string(j) + " holds slot " + std::to_string(row[j]) + ", outside the " +
                 std::to_string(num_slots) + " slots of " + pool_name + " (-1 marks an unused entry)";
        }
      }
    }
  }
  return "";
}

// Appends the dequantised tokens that (req, token)'s valid entries name to `keys` (d_qk floats each).
void gather(const SparseDecodeParams& p, const SparsePool& pool, int req, int token, std::vector<float>& keys) {
  const int used = effective_length(pool, req);
  const int32_t* row = row_of(pool, p, req, token);
  for (int j = 0; j < used; ++j) {
    if (row[j] < 0) continue;  // -1; other ids were rejected before
    keys.resize(keys.size() + p.head_dim);
    dequantize_token(pool.bytes, pool.format, pool.page_size, row[j], keys.data() + keys.size() - p.head_dim);
  }
}

// Query token `token` of request `req`, heads [head_begin, head_end).
void attend(const SparseDecodeParams& p, int req, int token, int head_begin, int head_end, std::vector<float>& keys,
            std::vector<float>& scores, std::vector<float>& acc) {
  const int d = p.head_dim;
  keys.clear();
  gather(p, p.pool, req, token, keys);
  gather(p, p.extra, req, token, keys);
  const int n = static_cast<int>(keys.size() / d);
  scores.resize(std::max(n, 1));
  acc.assign(kHeadDimV, 0.f);
  std::vector<float> query(d);
  for (int h = head_begin; h < head_end; ++h) {
    const int64_t row = (static_cast<int64_t>(req) * p.seqlen_q + token) * p.num_heads_q + h;
    uint16_t* out = p.out + row * kHeadDimV;
    float* lse = p.lse + (static_cast<int64_t>(req) * p.num_heads_q + h) * p.seqlen_q + token;
    if (n == 0) {  // no valid entry: out 0, lse +inf, whatever the sink
      std::fill(out, out + kHeadDimV, float_to_bf16_bits(0.f));
      *lse = kInf;
      continue;
    }
    for (int c = 0; c < d; ++c) query[c] = bf16_bits_to_float(p.q[row * d + c]);
    // std::max skips NaN scores, but they reach the sum below as exp(NaN), so NaN in q gives NaN.
    float row_max = -kInf;
    for (int t = 0; t < n; ++t) {
      const float* key = keys.data() + static_cast<int64_t>(t) * d;
      float dot = 0.f;
      for (int c = 0; c < d; ++c) dot += query[c] * key[c];
      scores[t] = dot * p.softmax_scale;
      row_max = std::max(row_max, scores[t]);
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    float row_sum = 0.f;
    for (int t = 0; t < n; ++t) {
      const float w = std::exp(scores[t] - row_max);
      row_sum += w;
      const float* value = keys.data() + static_cast<int64_t>(t) * d;
      for (int c = 0; c < kHeadDimV; ++c) acc[c] += w * value[c];
    }
    const float row_lse = std::log(row_sum) + row_max;
    float factor = 1.f / row_sum;
    // The sink scales out by exp(lse) / (exp(lse) + exp(sink)); lse stays that of the named tokens.
    if (p.attn_sink != nullptr) factor *= 1.f / (1.f + std::exp(p.attn_sink[h] - row_lse));
    for (int c = 0; c < kHeadDimV; ++c) out[c] = float_to_bf16_bits(acc[c] * factor);
    *lse = row_lse;
  }
}

}  // namespace

void dequantize_token(const uint8_t* pool, KvFormat format, int page_size, int64_t slot, float* dst) {
  const KvFormatLayout l = kv_format_layout(format);
  const int64_t page = slot / page_size;
  const int token = static_cast<int>(slot % page_size);
  const uint8_t* base = pool + page * kv_page_bytes(format, page_size);
  const uint8_t* record = base + kv_record_offset(format, token);
  const uint8_t* scales = base + kv_scale_offset(format, page_size, token);
  const float* fp8 = e4m3fn_table();
  for (int g = 0; g < l.num_groups; ++g) {
    float* group = dst + g * l.group_size;
    const uint8_t* values = record + g * l.group_size;
    if (l.scale_bytes == 4) {  // float32 scale: the product is exact unless it underflows
      float scale;
      std::memcpy(&scale, scales + 4 * g, sizeof(scale));
      for (int c = 0; c < l.group_size; ++c) group[c] = round_to_bf16(fp8[values[c]] * scale);
    } else if (scales[g] == 0xFF) {  // ue8m0 0xFF is NaN
      std::fill(group, group + l.group_size, std::numeric_limits<float>::quiet_NaN());
    } else {  // ue8m0: times 2^(byte - 127), exactly (ldexp)
      for (int c = 0; c < l.group_size; ++c) group[c] = round_to_bf16(std::ldexp(fp8[values[c]], scales[g] - 127));
    }
  }
  const uint8_t* rope = base + kv_rope_offset(format, token);
  for (int c = 0; c < l.d_rope; ++c) {
    uint16_t bits;
    std::memcpy(&bits, rope + 2 * c, sizeof(bits));
    dst[l.d_nope + c] = bf16_bits_to_float(bits);
  }
}

std::string sparse_decode_cpu(const SparseDecodeParams& p) {
  if (std::string err = check_indices(p, p.pool, "indices", "k_cache"); !err.empty()) return err;
  if (std::string err = check_indices(p, p.extra, "extra_indices_in_kvcache", "extra_k_cache"); !err.empty()) {
    return err;
  }
  // Work items: (request, query token, group of heads). Heads are split so that one long query row
  // still spreads over the threads; each item gathers its row's tokens once.
  const int workers_max = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const int rows = p.batch * p.seqlen_q;
  const int head_groups = std::clamp((workers_max + rows - 1) / rows, 1, p.num_heads_q);
  const int heads_per_group = (p.num_heads_q + head_groups - 1) / head_groups;
  const int items = rows * head_groups;
  const int workers = std::min(items, workers_max);
  auto work = [&](int w) {
    std::vector<float> keys, scores, acc;
    for (int item = w; item < items; item += workers) {
      const int row = item / head_groups;
      const int head_begin = (item % head_groups) * heads_per_group;
      const int head_end = std::min(head_begin + heads_per_group, p.num_heads_q);
      if (head_begin < head_end) attend(p, row / p.seqlen_q, row % p.seqlen_q, head_begin, head_end, keys, scores, acc);
    }
  };
  std::vector<std::thread> threads;
  for (int w = 1; w < workers; ++w) threads.emplace_back(work, w);
  work(0);
  for (auto& t : threads) t.join();
  return "";
}

}  // namespace jax_flashmla
