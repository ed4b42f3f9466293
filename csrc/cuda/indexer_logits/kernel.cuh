// The indexer-logits kernel (config.h: work unit and pipeline; traits.h: layouts and MMA):
//
//   logits[row, p] = scale_p * sum_h w[row, h] * relu(q[row, h] . k_p)   for p < limit[row], else -inf
//
// with row = (request, query token), k_p the e4m3 values of the key at position p (its page from the
// block table) and scale_p its float32 scale. Per page and query token (one warpgroup each):
// S = Q K^T on tensor cores (64 heads x 64 keys, float32, traits.h), then the sum over heads (each
// warp holds 16 heads of every key) and 64 logits. relu keeps NaN (a NaN score is not "below zero"),
// so NaN in a visible key, its scale, q or w reaches the logit, as in the pure-JAX path.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include <cutlass/arch/barrier.h>

#include "cuda/indexer_logits/traits.h"
#include "cuda/ptx/sm90_ptx.cuh"

namespace jax_flashmla {
namespace indexer_sm90 {

// The CTA's page columns and its query tokens: token group fastest in the grid, then the run of
// columns, then the request.
template <int kTokens>
struct CtaWork {
  int request, first_column, end_column;  // page columns [first, end)
  int64_t row[kTokens];                   // request * next_n + token, per warpgroup
  int64_t limit[kTokens];                 // positions < limit are seen, cut to the block table
  int live_end[kTokens];                  // page columns of the run holding a seen position: [first, live_end)

  __device__ static CtaWork of(const IndexerLogitsParams& p) {
    const int64_t page_columns = (p.logits_width + kPage - 1) / kPage;
    const int64_t runs = (page_columns + p.pages_per_cta - 1) / p.pages_per_cta;
    const int groups = p.next_n / kTokens;
    CtaWork w;
    int64_t idx = blockIdx.x;
    const int group = static_cast<int>(idx % groups);
    idx /= groups;
    const int run = static_cast<int>(idx % runs);
    w.request = static_cast<int>(idx / runs);
    w.first_column = run * p.pages_per_cta;
    w.end_column = static_cast<int>(min<int64_t>(page_columns, w.first_column + p.pages_per_cta));
    const int64_t table_limit = static_cast<int64_t>(p.table_width) * kPage;
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      w.row[t] = static_cast<int64_t>(w.request) * p.next_n + group * kTokens + t;
      w.limit[t] = min<int64_t>(p.limits[w.row[t]], table_limit);
      w.live_end[t] = static_cast<int>(
          max<int64_t>(w.first_column, min<int64_t>(w.end_column, (w.limit[t] + kPage - 1) / kPage)));
    }
    return w;
  }

  __device__ int cta_live_end() const {
    int end = live_end[0];
#pragma unroll
    for (int t = 1; t < kTokens; ++t) end = max(end, live_end[t]);
    return end;
  }
};

// a[i] for a runtime i, by selects (an indexed register array would go to local memory).
template <int N, class T>
__device__ __forceinline__ T pick(const T (&a)[N], int i) {
  T v = a[0];
#pragma unroll
  for (int t = 1; t < N; ++t) v = i == t ? a[t] : v;
  return v;
}

// The query tiles (zero rows past num_heads) and the head weights of the CTA's tokens, into shared
// memory, by all its threads.
template <int kTokens>
__device__ __forceinline__ void load_queries(const IndexerLogitsParams& p, const CtaWork<kTokens>& w,
                                             SharedStorage<kTokens>& s) {
  constexpr int kChunksPerRow = kDim / kChunk;
  constexpr int kThreads = kTokens * kWarpgroupThreads;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    const uint8_t* q = p.q + w.row[t] * p.num_heads * kDim;
    for (int c = threadIdx.x; c < kHeads * kChunksPerRow; c += kThreads) {
      const int head = c / kChunksPerRow, channel = (c % kChunksPerRow) * kChunk;
      const bool live = head < p.num_heads;
      sm90::cp_async_16(s.q[t] + swizzled_offset(head, channel), q + (live ? head * kDim + channel : 0), live);
    }
  }
  if (threadIdx.x < kTokens * kHeads) {
    const int t = threadIdx.x / kHeads, head = threadIdx.x % kHeads;
    s.weights[t][head] = head < p.num_heads ? p.weights[pick(w.row, t) * p.num_heads + head] : 0.f;
  }
}

// The page at `column` of the request's block table into stage `stage` (values swizzled, then
// scales), by all the CTA's threads.
template <int kTokens>
__device__ __forceinline__ void load_page(const IndexerLogitsParams& p, const CtaWork<kTokens>& w, int column,
                                          int stage, SharedStorage<kTokens>& s) {
  constexpr int kThreads = kTokens * kWarpgroupThreads;
  int page = p.block_table[static_cast<int64_t>(w.request) * p.table_width + column];
  page = min(max(page, 0), p.num_pages - 1);
  const uint8_t* src = p.pool + static_cast<int64_t>(page) * kPageBytes;
  constexpr int kChunksPerKey = kDim / kChunk;
#pragma unroll
  for (int i = 0; i < kKeyBytes / (kChunk * kThreads); ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int key = c / kChunksPerKey, channel = (c % kChunksPerKey) * kChunk;
    sm90::cp_async_16(s.keys[stage] + swizzled_offset(key, channel), src + key * kDim + channel, true);
  }
  if (threadIdx.x < kScaleBytes / kChunk) {
    sm90::cp_async_16(reinterpret_cast<uint8_t*>(s.scales[stage]) + threadIdx.x * kChunk,
                      src + kKeyBytes + threadIdx.x * kChunk, true);
  }
}

// NaN stays NaN: only a score below zero becomes zero.
__device__ __forceinline__ float relu_keep_nan(float x) { return x < 0.f ? 0.f : x; }

template <int kTokens>
__global__ void __launch_bounds__(kTokens * kWarpgroupThreads)
    indexer_logits_kernel(const __grid_constant__ IndexerLogitsParams p) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  SharedStorage<kTokens>& s = *reinterpret_cast<SharedStorage<kTokens>*>(smem_raw);
  const CtaWork<kTokens> w = CtaWork<kTokens>::of(p);
  if (w.request >= p.batch) return;
  const int token = threadIdx.x / kWarpgroupThreads;  // this warpgroup's query token in the group
  const int tid = threadIdx.x % kWarpgroupThreads;    // the thread within it
  const int live_end = pick(w.live_end, token);
  const int64_t limit = pick(w.limit, token);
  float* out = p.logits + pick(w.row, token) * p.logits_width;

  // This token's columns no seen position reaches: -inf, nothing read for them.
  const int64_t dead_from = static_cast<int64_t>(live_end) * kPage;
  const int64_t dead_to = min<int64_t>(static_cast<int64_t>(w.end_column) * kPage, p.logits_width);
  for (int64_t pos = dead_from + tid; pos < dead_to; pos += kWarpgroupThreads) out[pos] = -INFINITY;
  const int cta_live_end = w.cta_live_end();  // the same in every thread: the loop's barriers match
  if (cta_live_end == w.first_column) return;

  load_queries(p, w, s);
  load_page(p, w, w.first_column, 0, s);
  sm90::cp_async_commit();

  TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Fp8*>(s.q[token])), SmemLayoutQ{});
  Tensor rQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ));  // descriptors, (MMA, 1, K steps)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kHeads>, Int<kPage>>{});
  // Which (head, key) each accumulator value stands for.
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kHeads>, Int<kPage>>{}));
  const int lane = tid % 32, warp = tid / 32;
  // A thread's values cover keys 8 j + 2 (lane % 4) + {0, 1}, j < 8, each at two heads: sixteen sums.
  constexpr int kSums = kPage / 4;
  float head_weight[size(decltype(acc){})];

  for (int column = w.first_column; column < cta_live_end; ++column) {
    const int stage = (column - w.first_column) % kStages;
    if (column + 1 < cta_live_end) {
      load_page(p, w, column + 1, stage ^ 1, s);
      sm90::cp_async_commit();
      sm90::cp_async_wait_group<1>();
    } else {
      sm90::cp_async_wait_group<0>();
    }
    cutlass::arch::fence_view_async_shared();  // the copies' bytes, visible to wgmma's reads
    __syncthreads();  // this page (and, the first time, the query tiles and weights) is in shared memory
    if (column == w.first_column) {
#pragma unroll
      for (int e = 0; e < size(acc); ++e) head_weight[e] = s.weights[token][get<0>(cS(e))];
    }

    if (column < live_end) {  // uniform across the warpgroup
      Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Fp8*>(s.keys[stage])), SmemLayoutK{});
      Tensor rK = thr_mma.make_fragment_B(thr_mma.partition_B(sK));
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        gemm(mma, rQ(_, _, ks), rK(_, _, ks), acc);
        mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);

      // Sum over heads: each thread folds its two heads of each of its keys, the eight threads of a
      // warp that share keys (lanes equal mod 4) add theirs, then the warpgroup's four warps' sums meet
      // in shared memory.
      float sums[kSums];
#pragma unroll
      for (int i = 0; i < kSums; ++i) sums[i] = 0.f;
#pragma unroll
      for (int e = 0; e < size(acc); ++e) {
        const int key = get<1>(cS(e));
        sums[(key / 8) * 2 + key % 2] += head_weight[e] * relu_keep_nan(acc(e));
      }
#pragma unroll
      for (int i = 0; i < kSums; ++i) {
        sums[i] += __shfl_xor_sync(0xffffffffu, sums[i], 4);
        sums[i] += __shfl_xor_sync(0xffffffffu, sums[i], 8);
        sums[i] += __shfl_xor_sync(0xffffffffu, sums[i], 16);
      }
      if (lane < 4) {
#pragma unroll
        for (int i = 0; i < kSums; ++i) s.partial[token][warp][(i / 2) * 8 + 2 * lane + i % 2] = sums[i];
      }
      sm90::bar_sync(1 + token, kWarpgroupThreads);  // this warpgroup's partial sums are written
      if (tid < kPage) {
        const int key = tid;
        const int64_t pos = static_cast<int64_t>(column) * kPage + key;
        const float* part = &s.partial[token][0][key];
        const float sum = (part[0] + part[kPage]) + (part[2 * kPage] + part[3 * kPage]);
        if (pos < p.logits_width) out[pos] = pos < limit ? sum * s.scales[stage][key] : -INFINITY;
      }
    }
    __syncthreads();  // every warpgroup is done with this stage and its partial sums before they are reused
  }
}

}  // namespace indexer_sm90
}  // namespace jax_flashmla
