// The indexer top-k kernel: per row r of logits [rows, width] and its visible count
// n = clamp(min(visible[r], width), 0), the positions of the min(topk, n) largest logits among
// positions [0, n), best first, then -1: exactly what indexer._select returns for lo = 0. Order:
// larger logit first, NaN above every number, +0 and -0 equal, ties to the lower position.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "common/indexer_params.h"
#include "cuda/indexer_topk/config.h"

namespace jax_flashmla {
namespace indexer_topk_sm90 {

// The logit's rank as an unsigned key whose order is the selection's: -0 as +0, every NaN as the
// positive quiet NaN (above +inf), negative floats' magnitude bits flipped, then the sign bit.
__device__ __forceinline__ uint32_t rank_key(float x) {
  uint32_t bits = __float_as_uint(x);
  if (x == 0.f) bits = 0u;
  if (x != x) bits = 0x7FC00000u;
  const int32_t s = static_cast<int32_t>(bits);
  return static_cast<uint32_t>(s < 0 ? s ^ 0x7FFFFFFF : s) ^ 0x80000000u;
}

// (key, position) as one integer whose descending order is the selection's order.
__device__ __forceinline__ uint64_t pack(uint32_t key, int position) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(position));
}

using Sort = cub::BlockRadixSort<uint64_t, kThreads, kItemsPerThread>;
using Scan = cub::BlockScan<int, kThreads>;

struct SharedStorage {
  union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
  } cub;
  uint64_t picked[kMaxTopk];
  uint32_t hist[kBins];
  uint32_t prefix;     // the threshold's bits found so far
  int remaining;       // how many of the k still lie at or below the prefix's bin
};

__global__ void __launch_bounds__(kThreads) indexer_topk_kernel(const __grid_constant__ IndexerTopkParams p) {
  __shared__ SharedStorage s;
  const int64_t r = blockIdx.x;
  const float* row = p.logits + r * p.width;
  int64_t n = p.visible[r];
  n = n < 0 ? 0 : n > p.width ? p.width : n;
  const int k = p.topk;
  int count;  // entries picked

  if (n <= k) {  // every visible position
    for (int i = threadIdx.x; i < n; i += kThreads) s.picked[i] = pack(rank_key(row[i]), i);
    count = static_cast<int>(n);
  } else {
    // Radix select: the k-th largest key, eight bits a pass from the top.
    uint32_t prefix = 0u, mask = 0u;
    int remaining = k;
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int b = threadIdx.x; b < kBins; b += kThreads) s.hist[b] = 0u;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const uint32_t u = rank_key(row[i]);
        if ((u & mask) == prefix) atomicAdd(&s.hist[(u >> shift) & (kBins - 1)], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int above = 0, bin = kBins - 1;
        for (; bin > 0 && above + static_cast<int>(s.hist[bin]) < remaining; --bin) above += s.hist[bin];
        s.prefix = prefix | (static_cast<uint32_t>(bin) << shift);
        s.remaining = remaining - above;
      }
      __syncthreads();
      prefix = s.prefix;
      remaining = s.remaining;
      mask |= static_cast<uint32_t>(kBins - 1) << shift;
      __syncthreads();  // s.prefix and s.remaining are read before the next pass writes them
    }
    // prefix is the k-th largest key: the keys above it all go, then the first `remaining` equal to it.
    const int above_total = k - remaining;
    int above_base = 0, equal_base = 0;
    for (int64_t start = 0; start < n; start += kThreads) {
      const int64_t i = start + threadIdx.x;
      uint32_t u = 0u;
      if (i < n) u = rank_key(row[i]);
      const int above = i < n && u > prefix, equal = i < n && u == prefix;
      int offset, chunk_total;
      Scan(s.cub.scan).ExclusiveSum(above | (equal << 16), offset, chunk_total);
      const int above_at = above_base + (offset & 0xFFFF), equal_at = equal_base + (offset >> 16);
      if (above) s.picked[above_at] = pack(u, static_cast<int>(i));
      if (equal && equal_at < remaining) s.picked[above_total + equal_at] = pack(u, static_cast<int>(i));
      above_base += chunk_total & 0xFFFF;
      equal_base += chunk_total >> 16;
      __syncthreads();  // the scan's storage is reused by the next chunk
    }
    count = k;
  }
  __syncthreads();

  uint64_t items[kItemsPerThread];
#pragma unroll
  for (int j = 0; j < kItemsPerThread; ++j) {
    const int at = threadIdx.x * kItemsPerThread + j;
    items[j] = at < count ? s.picked[at] : 0ull;  // 0 sorts below every packed entry
  }
  __syncthreads();  // s.picked is read before the sort's storage (beside it) is used
  Sort(s.cub.sort).SortDescending(items);
  int32_t* out = p.positions + r * k;
#pragma unroll
  for (int j = 0; j < kItemsPerThread; ++j) {
    const int rank = threadIdx.x * kItemsPerThread + j;
    if (rank < k) out[rank] = rank < count ? static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(items[j])) : -1;
  }
}

}  // namespace indexer_topk_sm90
}  // namespace jax_flashmla
