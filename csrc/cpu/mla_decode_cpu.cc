#include "cpu/mla_decode_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "common/mla_contract.h"

namespace jax_flashmla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (std::isnan(f)) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float f16_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
}

uint16_t float_to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}

void load_row(const DecodeParams& p, const uint16_t* src, int n, float* dst) {
  if (p.dtype == ElementType::kBF16) {
    for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  } else {
    for (int i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
  }
}

void store_row(const DecodeParams& p, const float* src, int n, uint16_t* dst) {
  if (p.dtype == ElementType::kBF16) {
    for (int i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  } else {
    for (int i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
  }
}

// Exclusive end of the keys query token `token` of request `req` sees.
int key_limit(const DecodeParams& p, int req, int token) {
  const int len = p.seqlens[req];
  if (!p.causal) return len;
  return std::clamp(len - p.seqlen_q + token + 1, 0, len);
}

// One piece: keys [page_begin * 64, page_end * 64) of request `req`, every query row of kv head
// `kv_head`. Writes the final out/lse when the request is not split, else its accumulator slot.
void attend_piece(const DecodeParams& p, int req, int kv_head, int page_begin, int page_end, int split_idx) {
  const int rows = p.rows_per_head_k;
  const int key_begin = page_begin * kPageSize;
  const int key_end = std::min(page_end * kPageSize, p.seqlens[req]);
  const int n_keys = std::max(key_end - key_begin, 0);

  // A row sees a prefix of the piece's keys: the first visible[r].
  std::vector<float> queries(static_cast<size_t>(rows) * kHeadDim);
  std::vector<int> visible(rows);
  for (int r = 0; r < rows; ++r) {
    const QueryRow qr = query_row(p, kv_head, r);
    const auto* src = static_cast<const uint16_t*>(p.q) + qo_row_index(p, req, qr) * kHeadDim;
    load_row(p, src, kHeadDim, &queries[static_cast<size_t>(r) * kHeadDim]);
    visible[r] = std::clamp(key_limit(p, req, qr.token) - key_begin, 0, n_keys);
  }

  // Scores of every visible (row, key) of the piece, then a plain softmax per row.
  std::vector<float> scores(static_cast<size_t>(rows) * std::max(n_keys, 1));
  std::vector<float> keys(static_cast<size_t>(std::max(n_keys, 1)) * kHeadDim);
  for (int i = 0; i < n_keys; ++i) {
    const int t = key_begin + i;
    const int page = p.block_table[static_cast<size_t>(req) * p.max_blocks_per_seq + t / kPageSize];
    const auto* src = static_cast<const uint16_t*>(p.k_cache) +
                      ((static_cast<size_t>(page) * kPageSize + t % kPageSize) * p.num_heads_k + kv_head) * kHeadDim;
    float* key = &keys[static_cast<size_t>(i) * kHeadDim];
    load_row(p, src, kHeadDim, key);
    for (int r = 0; r < rows; ++r) {
      if (i >= visible[r]) continue;
      const float* qr = &queries[static_cast<size_t>(r) * kHeadDim];
      float dot = 0.f;
      for (int c = 0; c < kHeadDim; ++c) dot += qr[c] * key[c];
      scores[static_cast<size_t>(r) * n_keys + i] = dot * p.softmax_scale;
    }
  }

  const int total_splits = p.num_splits[req + 1] - p.num_splits[req];
  std::vector<float> acc(kHeadDimV);
  for (int r = 0; r < rows; ++r) {
    const float* s = &scores[static_cast<size_t>(r) * n_keys];
    // std::max skips NaN scores, but they reach the sum below as exp(NaN); so does a row whose
    // visible scores are all -inf or one of them +inf (exp(-inf + inf)): NaN, never "no key".
    float row_max = -kInf;
    for (int i = 0; i < visible[r]; ++i) row_max = std::max(row_max, s[i]);
    std::fill(acc.begin(), acc.end(), 0.f);
    float row_sum = 0.f;
    for (int i = 0; i < visible[r]; ++i) {
      const float w = std::exp(s[i] - row_max);
      row_sum += w;
      const float* v = &keys[static_cast<size_t>(i) * kHeadDim];
      for (int c = 0; c < kHeadDimV; ++c) acc[c] += w * v[c];
    }
    const bool empty = visible[r] == 0;  // no key: out 0, lse +inf (-inf for a split piece)
    const float inv = empty ? 0.f : 1.f / row_sum;
    for (int c = 0; c < kHeadDimV; ++c) acc[c] *= inv;
    const float piece_lse = empty ? -kInf : std::log(row_sum) + row_max;

    const QueryRow qr = query_row(p, kv_head, r);
    if (total_splits == 1) {
      auto* dst = static_cast<uint16_t*>(p.out) + qo_row_index(p, req, qr) * kHeadDimV;
      store_row(p, acc.data(), kHeadDimV, dst);
      p.lse[lse_index(p, req, qr)] = empty ? kInf : piece_lse;
    } else {
      const int64_t row_index = accum_row_index(p, accum_slot(p.num_splits, req, split_idx), kv_head, r);
      std::copy(acc.begin(), acc.end(), p.o_accum + row_index * kHeadDimV);
      p.lse_accum[row_index] = piece_lse;
    }
  }
}

// Every piece of one part for one kv head, in the order the GPU kernel visits them.
void run_part(const DecodeParams& p, int part, int kv_head) {
  const int32_t* md = p.tile_md + static_cast<size_t>(part) * kTileMetadataSize;
  for (int req = md[kMdBeginReq]; req <= md[kMdEndReq]; ++req) {
    const int page_begin = req == md[kMdBeginReq] ? md[kMdBeginPage] : 0;
    const int page_end = req == md[kMdEndReq] ? md[kMdEndPage] : pages_of(p.seqlens[req]);
    const int split_idx = req == md[kMdBeginReq] ? md[kMdBeginSplit] : 0;
    attend_piece(p, req, kv_head, page_begin, page_end, split_idx);
  }
}

// Merges the split pieces of request `req` into out and lse. An empty piece has lse -inf and adds
// nothing; a NaN piece makes the row NaN (std::max would skip it).
void combine_request(const DecodeParams& p, int req) {
  const int64_t first = accum_slot(p.num_splits, req, 0);
  const int n = p.num_splits[req + 1] - p.num_splits[req];
  std::vector<float> acc(kHeadDimV);
  for (int kv_head = 0; kv_head < p.num_heads_k; ++kv_head) {
    for (int r = 0; r < p.rows_per_head_k; ++r) {
      auto row_index = [&](int s) { return accum_row_index(p, first + s, kv_head, r); };
      float max_lse = -kInf;
      bool nan = false;
      for (int s = 0; s < n; ++s) {
        max_lse = std::max(max_lse, p.lse_accum[row_index(s)]);
        nan |= std::isnan(p.lse_accum[row_index(s)]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      if (max_lse != -kInf) {
        for (int s = 0; s < n; ++s) {
          const float w = std::exp(p.lse_accum[row_index(s)] - max_lse);
          if (w == 0.f) continue;
          total += w;
          const float* o = p.o_accum + row_index(s) * kHeadDimV;
          for (int c = 0; c < kHeadDimV; ++c) acc[c] += w * o[c];
        }
      }
      if (nan) total = std::numeric_limits<float>::quiet_NaN();
      const bool empty = total == 0.f;
      for (int c = 0; c < kHeadDimV; ++c) acc[c] = empty ? 0.f : acc[c] / total;
      const QueryRow qr = query_row(p, kv_head, r);
      store_row(p, acc.data(), kHeadDimV, static_cast<uint16_t*>(p.out) + qo_row_index(p, req, qr) * kHeadDimV);
      p.lse[lse_index(p, req, qr)] = empty ? kInf : std::log(total) + max_lse;
    }
  }
}

}  // namespace

std::string validate_plan(const DecodeParams& p) {
  const std::string stale = " (was the metadata computed for these cache_seqlens and this num_sm_parts?)";
  if (p.num_splits[0] != 0) return "num_splits[0] must be 0" + stale;
  std::vector<int> pages_seen(p.batch, 0), pieces_seen(p.batch, 0);
  for (int part = 0; part < p.num_sm_parts; ++part) {
    const int32_t* md = p.tile_md + static_cast<size_t>(part) * kTileMetadataSize;
    if (md[kMdBeginReq] > md[kMdEndReq]) continue;  // empty part
    if (md[kMdBeginReq] < 0 || md[kMdEndReq] >= p.batch) return "tile_md part " + std::to_string(part) + " names a request outside the batch" + stale;
    for (int req = md[kMdBeginReq]; req <= md[kMdEndReq]; ++req) {
      const int pages = pages_of(p.seqlens[req]);
      const int begin = req == md[kMdBeginReq] ? md[kMdBeginPage] : 0;
      const int end = req == md[kMdEndReq] ? md[kMdEndPage] : pages;
      const int split = req == md[kMdBeginReq] ? md[kMdBeginSplit] : 0;
      const int splits = p.num_splits[req + 1] - p.num_splits[req];
      if (begin < 0 || end > pages || begin > end || split < 0 || split >= splits) {
        return "tile_md part " + std::to_string(part) + " does not fit request " + std::to_string(req) + stale;
      }
      pages_seen[req] += end - begin;
      pieces_seen[req] += 1;
    }
  }
  for (int req = 0; req < p.batch; ++req) {
    // Every request has a piece (an empty one too: it writes the request's rows).
    if (pieces_seen[req] < 1 || pages_seen[req] != pages_of(p.seqlens[req]) ||
        pieces_seen[req] != p.num_splits[req + 1] - p.num_splits[req]) {
      return "tile_md/num_splits do not cover request " + std::to_string(req) + " exactly" + stale;
    }
  }
  // The pieces beyond one per request bound the slots (max_accum_slots).
  if (p.num_splits[p.batch] - p.batch > p.num_sm_parts - 1) return "num_splits exceeds the workspace" + stale;
  return "";
}

std::string check_seqlens(const int32_t* seqlens, int batch) {
  for (int req = 0; req < batch; ++req) {
    if (seqlens[req] < 0) {
      return "request " + std::to_string(req) + " has cache_seqlens " + std::to_string(seqlens[req]) +
             "; lengths must be >= 0";
    }
  }
  return "";
}

std::string mla_decode_cpu(const DecodeParams& p) {
  if (std::string err = check_seqlens(p.seqlens, p.batch); !err.empty()) return err;
  // Page ids inside a request's length must point into the pool; the rest are never read.
  for (int req = 0; req < p.batch; ++req) {
    const int pages = pages_of(p.seqlens[req]);
    if (pages > p.max_blocks_per_seq) {
      return "request " + std::to_string(req) + " has cache_seqlens " + std::to_string(p.seqlens[req]) +
             " but block_table holds only " + std::to_string(p.max_blocks_per_seq) + " pages";
    }
    for (int i = 0; i < pages; ++i) {
      const int page = p.block_table[static_cast<size_t>(req) * p.max_blocks_per_seq + i];
      if (page < 0 || page >= p.num_blocks) {
        return "request " + std::to_string(req) + " page " + std::to_string(i) + " has id " + std::to_string(page) +
               ", outside the pool of " + std::to_string(p.num_blocks) + " pages";
      }
    }
  }
  if (std::string err = validate_plan(p); !err.empty()) return err;

  // Parts write disjoint pieces, so (part, kv head) work items run on threads without locks.
  const int items = p.num_sm_parts * p.num_heads_k;
  const int workers = std::max(1, std::min<int>(items, static_cast<int>(std::thread::hardware_concurrency())));
  auto work = [&](int w) {
    for (int item = w; item < items; item += workers) run_part(p, item / p.num_heads_k, item % p.num_heads_k);
  };
  std::vector<std::thread> threads;
  for (int w = 1; w < workers; ++w) threads.emplace_back(work, w);
  work(0);
  for (auto& t : threads) t.join();

  for (int req = 0; req < p.batch; ++req) {
    if (p.num_splits[req + 1] - p.num_splits[req] > 1) combine_request(p, req);
  }
  return "";
}

}  // namespace jax_flashmla
