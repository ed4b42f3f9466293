// The indexer top-k kernel's work unit and limits (opt-in; kernel.cuh says what it computes).
//
// Work unit: one CTA of 512 threads per row of logits (a query token). A radix select over the
// row's visible logits finds the k-th largest rank key in four 8-bit passes (shared-memory
// histograms), the row is walked once more in position order to gather the keys above it and the
// first of those equal to it, and a block radix sort orders the k gathered (key, position) pairs.
#pragma once

#include <cstdint>

namespace jax_flashmla {
namespace indexer_topk_sm90 {

constexpr int kThreads = 512;
constexpr int kItemsPerThread = 4;
constexpr int kMaxTopk = kThreads * kItemsPerThread;  // 2048, DeepSeek-V3.2's index_topk
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

}  // namespace indexer_topk_sm90
}  // namespace jax_flashmla
