// The sparse FP8 decode kernel's shared-memory plan and dequantisation split.
//
// Work unit: one CTA per (request, query token, split, tile of up to 64 heads). The CTA walks its
// split of its query token's entries (the main pool's, then the extra pool's, as one sequence; all
// of them with one split) in blocks of 64: it resolves each entry to a pool slot (or masks it),
// dequantises the named tokens into shared memory as bfloat16, then runs the tile math shared with
// the prefill kernel (sparse_common/: warp roles in tile.h).
#pragma once

#include <cstdint>

#include "common/kv_formats.h"
#include "common/mla_contract.h"
#include "common/sparse_params.h"
#include "cuda/sparse_common/tile.h"

namespace jax_flashmla {
namespace sparse_sm90 {

constexpr int kThreadsPerToken = kThreads / kBlockN;  // 4 threads dequantise one token
constexpr int kChunk = 16;          // bytes per vector load of the token data

static_assert(kThreadsPerToken == 4, "the dequantisation assumes 4 threads a token");
static_assert(kRows == kSparseDecodeHeadsPerCta, "the handler sizes the grid with kSparseDecodeHeadsPerCta");

// The token data of one block and the Q tile, as bfloat16 in the swizzled layout of sparse_common/tile.h, and the
// block's resolved entries.
template <int kDqk>
struct SharedStorage {
  alignas(128) uint16_t q[kRows * kDqk];
  alignas(128) uint16_t k[kBlockN * kDqk];  // the dequantised tokens; V is channels 0..511 of it
  const uint8_t* record[kBlockN];           // the entry's token record, or null when masked
  const uint8_t* scales[kBlockN];           // its scales (V3.2: inside the record)
  uint32_t valid[kBlockN / 32];             // bit j % 32 of word j / 32: entry j is read
};

template <int kDqk>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<kDqk>)) + 128;  // + room to align the dynamic base
}

static_assert(smem_bytes<576>() <= 227 * 1024, "the V3.2 tile must fit one SM's shared memory");

}  // namespace sparse_sm90
}  // namespace jax_flashmla
