// The indexer-logits kernel's work unit and shared-memory plan.
//
// Work unit: one CTA per (request, group of kTokens query tokens, run of pages_per_cta page columns),
// one warpgroup per query token of the group: kTokens = 2 when next_n is even (DeepSeek-V3.2's MTP
// decode has next_n 2), else 1. Each warpgroup loads its token's index queries (up to 64 heads x 128
// e4m3 channels) once; then the CTA walks its pages, each page (64 keys) copied into shared memory
// by cp.async while the page before it is scored, and read from there by every warpgroup: a page is
// read from memory once for the query tokens of its group.
//
// Pages past every token's visible limit are never read: their columns get -inf, as do a token's
// columns past its own limit. Page ids outside the pool are clamped into it, as the pure-JAX path
// does (indexer.py).
#pragma once

#include <cstdint>

#include "common/indexer_params.h"

namespace jax_flashmla {
namespace indexer_sm90 {

constexpr int kWarps = 4;                 // a warpgroup: one query token's 64 heads
constexpr int kWarpgroupThreads = 32 * kWarps;
constexpr int kHeads = kIndexerMaxHeads;  // rows of a Q tile; heads past num_heads are zero
constexpr int kDim = kIndexerHeadDim;
constexpr int kPage = kIndexerPageSize;   // keys a page, the N of one S = Q K^T block
constexpr int kStages = 2;                // pages in shared memory: the one scored, the one copied
constexpr int kChunk = 16;                // bytes a cp.async moves

constexpr int kKeyBytes = kPage * kDim;   // a page's e4m3 values
constexpr int kScaleBytes = kPage * 4;    // a page's float32 scales, after its values
constexpr int kPageBytes = kKeyBytes + kScaleBytes;
static_assert(kPageBytes == kPage * kIndexerRowBytes, "the pool's page layout");
static_assert(kKeyBytes % (kChunk * kWarpgroupThreads * 2) == 0, "every thread copies as many value chunks");
static_assert(kScaleBytes / kChunk <= kWarpgroupThreads, "one chunk of scales a thread at most");

template <int kTokens>
struct SharedStorage {
  alignas(128) uint8_t q[kTokens][kHeads * kDim];  // swizzled (traits.h)
  alignas(128) uint8_t keys[kStages][kKeyBytes];   // swizzled (traits.h)
  alignas(16) float scales[kStages][kPage];
  float weights[kTokens][kHeads];                  // 0 past num_heads
  float partial[kTokens][kWarps][kPage];           // each warp's sum over its 16 heads, per key
};

template <int kTokens>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<kTokens>));
}

}  // namespace indexer_sm90
}  // namespace jax_flashmla
