// The sparse prefill kernel's work unit and shared-memory plan.
//
// Work unit: one CTA per (query token, tile of up to 64 heads). The CTA walks the token's entries
// (its first topk_length, or all topk) in blocks of 64: threads 0..63 resolve an entry each to a kv
// row (or to "masked": -1, any id outside [0, s_kv), or past topk_length), the eight warps copy the
// named rows (d_qk bfloat16, contiguous) into shared memory with cp.async, and the tile math shared
// with the sparse decode (sparse_common/: warp roles in tile.h) runs on them.
//
// Rows: the tile holds heads head0 .. head0 + 63 of one query token (tokens differ in the rows they
// read, so no other packing shares a block). With h_q not a multiple of 64 the last tile is padded:
// its rows past h_q hold zero queries, a 16-row group with no live head skips the math, and no
// padded row is ever written. h_q 1..128 is one or two tiles.
//
// Pipeline: two token buffers. The copies of block b + 1 are issued right after the barrier that
// publishes block b, so they run under block b's math; a block with no read entry is neither copied
// nor computed. The resolved entries live in a ring of three slots (written one block ahead, read up
// to a block behind), so one barrier a block orders them.
#pragma once

#include <cstdint>

#include "common/mla_contract.h"
#include "cuda/sparse_common/tile.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

constexpr int kStages = 2;     // token buffers
constexpr int kEntrySlots = 3;  // resolved-entry slots
constexpr int kWarps = kThreads / 32;

template <int kDqk>
struct SharedStorage {
  alignas(128) uint16_t q[kRows * kDqk];               // the Q tile, swizzled (tile.h)
  alignas(128) uint16_t k[kStages][kBlockN * kDqk];    // token blocks, swizzled; V is channels 0..511
  int32_t row[kEntrySlots][kBlockN];                   // an entry's kv row, or -1 when masked
  uint32_t valid[kEntrySlots][kBlockN / 32];           // bit j % 32 of word j / 32: entry j is read
};

template <int kDqk>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<kDqk>)) + 128;  // + room to align the dynamic base
}

static_assert(smem_bytes<576>() <= 227 * 1024, "the d_qk 576 tile must fit one SM's shared memory");

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
