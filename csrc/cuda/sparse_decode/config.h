// Tile sizes of the sparse FP8 decode kernel and its shared-memory plan.
//
// Work unit: one CTA per (request, query token, tile of up to 64 heads). The CTA walks its query
// token's entries (the main pool's, then the extra pool's) in blocks of 64: it resolves each entry to
// a pool slot (or masks it), dequantises the named tokens into shared memory as bfloat16, then
// S = Q K^T, the online softmax and O += P V with mma.sync tensor-core atoms.
//
// Eight warps: warp w holds query rows 16 (w % 4) .. 16 (w % 4) + 15 of the tile, and output
// channels 256 (w / 4) .. 256 (w / 4) + 255. Both warps of a row group compute the same 16 x 64
// scores (the QK^T work is done twice: 1.5x the tensor-core work of splitting it, in exchange for no
// cross-warp softmax hand-off); each keeps a 16 x 256 fp32 quarter of O (128 registers a thread).
#pragma once

#include <cstdint>

#include "common/kv_formats.h"
#include "common/mla_contract.h"

namespace jax_flashmla {
namespace sparse_sm90 {

constexpr int kThreads = 256;       // eight warps
constexpr int kRows = 64;           // heads of one query token per CTA
constexpr int kRowGroups = 4;       // 16-row groups of the tile; a group with no live head skips the math
constexpr int kBlockN = 64;         // entries (tokens) per block
constexpr int kHalfV = kHeadDimV / 2;  // output channels of one warp
constexpr int kThreadsPerToken = kThreads / kBlockN;  // 4 threads dequantise one token
constexpr int kChunk = 16;          // bytes per vector load of the token data

static_assert(kThreadsPerToken == 4, "the dequantisation assumes 4 threads a token");

// The token data of one block and the Q tile, as bfloat16 in the swizzled layout of traits.h, and the
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
