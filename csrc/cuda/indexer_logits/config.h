// The indexer-logits kernel's work unit and shared-memory plan.
//
// Work unit: one warpgroup (CTA) per (request, query token, run of pages_per_cta page columns). It loads its
// query token's index queries (up to 64 heads x 128 e4m3 channels) once, then walks its pages: each
// page (64 keys) is copied into shared memory with cp.async while the page before it is scored, so
// the copy of page c + 1 overlaps the tensor-core work of page c. The CTAs of one request's query
// tokens are adjacent in the grid, so the second token's copy of a page finds it in L2.
//
// Pages past the query's visible limit are never read: their columns get -inf. So are page ids
// outside the pool clamped into it, as the pure-JAX path does (indexer.py).
#pragma once

#include <cstdint>

#include "common/indexer_params.h"

namespace jax_flashmla {
namespace indexer_sm90 {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kHeads = kIndexerMaxHeads;  // rows of the Q tile; heads past num_heads are zero
constexpr int kDim = kIndexerHeadDim;
constexpr int kPage = kIndexerPageSize;   // keys a page, the N of one S = Q K^T block
constexpr int kStages = 2;                // pages in shared memory: the one scored, the one copied
constexpr int kChunk = 16;                // bytes a cp.async moves

constexpr int kKeyBytes = kPage * kDim;   // a page's e4m3 values
constexpr int kScaleBytes = kPage * 4;    // a page's float32 scales, after its values
constexpr int kPageBytes = kKeyBytes + kScaleBytes;
static_assert(kPageBytes == kPage * kIndexerRowBytes, "the pool's page layout");
static_assert(kKeyBytes % (kChunk * kThreads) == 0, "every thread copies the same number of value chunks");
static_assert(kScaleBytes / kChunk <= kThreads, "one chunk of scales a thread at most");

struct SharedStorage {
  alignas(128) uint8_t q[kHeads * kDim];          // swizzled (traits.h)
  alignas(128) uint8_t keys[kStages][kKeyBytes];  // swizzled (traits.h)
  alignas(16) float scales[kStages][kPage];
  float weights[kHeads];                          // 0 past num_heads
  float partial[kWarps][kPage];                   // each warp's sum over its 16 heads, per key
};

constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));

}  // namespace indexer_sm90
}  // namespace jax_flashmla
