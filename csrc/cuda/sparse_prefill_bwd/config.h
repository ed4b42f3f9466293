// The sparse prefill backward kernel's work unit and shared-memory plan.
//
// Work unit: one CTA per (query token, tile of up to 32 heads). The CTA walks the token's entries in
// blocks of 64, as the forward does (resolution to kv rows, masked entries zero-filled and never
// read), and per block:
//   S = Q K^T, P = exp(scale S - lse) (0 where the entry or the head is not live),
//   dP = dO V^T, dS = scale P (sig dP - delta)          (dS and sig P to shared memory, bfloat16)
//   dQ += dS K                                          (fp32 registers, the whole walk)
//   dK = dS^T Q + (sig P)^T dO                          (32-channel chunks, red.global.add into dkv)
// then writes dQ once, in bfloat16. dkv is a float32 accumulator the handler zeroes first; every head
// tile of every token that names a row adds into it, so its summation order is not fixed.
//
// Head tile: 32 rows. 64 would halve the dkv atomics, but dQ alone would take 144 fp32 registers a
// thread and Q, dO and one token block 208 KB of shared memory, leaving no second token buffer; at 32
// dQ takes 72 registers and two token buffers fit, so the copies of block b + 1 run under block b's
// math. Rows past h_q hold zero Q and dO, and their P and dS are forced to 0: nothing of theirs
// reaches dkv, and their dQ is never stored.
//
// Warp roles (eight warps), each a 16 x 16 x 16 mma.sync tile walked over its own slice:
//   S and dP: warp w takes rows 16 (w % 2) .. + 15 and entries 16 (w / 2) .. + 15;
//   dQ:       rows 16 (w % 2) .. + 15 and 16-channel tiles w / 2, w / 2 + 4, ... (144 or 128 channels);
//   dK:       entries 16 (w % 4) .. + 15 and channels (d_qk / 2) (w / 4) .., 32 at a time.
#pragma once

#include <cstdint>

#include "common/mla_contract.h"
#include "cuda/sparse_common/tile.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

constexpr int kRowsB = 32;      // heads of one query token per CTA
constexpr int kStages = 2;      // token buffers
constexpr int kEntrySlots = 3;  // resolved-entry slots (written one block ahead, read up to a block behind)
constexpr int kWarps = kThreads / 32;
constexpr int kDkChunk = 32;    // dK channels per accumulation step of a warp

template <int kDqk>
struct SharedStorage {
  alignas(128) uint16_t q[kRowsB * kDqk];             // the Q tile, swizzled
  alignas(128) uint16_t d_out[kRowsB * kHeadDimV];    // the dO tile, swizzled
  alignas(128) uint16_t k[kStages][kBlockN * kDqk];   // token blocks, swizzled; V is channels 0..511
  alignas(128) uint16_t ds[kRowsB * kBlockN];         // scale * dS of the block, bfloat16, swizzled
  alignas(128) uint16_t ps[kRowsB * kBlockN];         // sig * P of the block, bfloat16, swizzled
  float lse_log2[kRowsB];                             // lse * log2(e); +inf past h_q
  float sig[kRowsB];
  float delta[kRowsB];
  int32_t row[kEntrySlots][kBlockN];                  // an entry's kv row, or -1 when masked
  uint32_t valid[kEntrySlots][kBlockN / 32];          // bit j % 32 of word j / 32: entry j is read
};

template <int kDqk>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<kDqk>)) + 128;  // + room to align the dynamic base
}

static_assert(smem_bytes<576>() <= 227 * 1024, "the d_qk 576 tile must fit one SM's shared memory");

}  // namespace prefill_bwd
}  // namespace sparse_sm90
}  // namespace jax_flashmla
