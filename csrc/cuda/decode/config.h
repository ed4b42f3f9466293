// Tile sizes of the decode kernel and its shared-memory plan.
#pragma once

#include <cstdint>

#include "common/mla_contract.h"

// 1: the decode kernel is launched as a programmatic dependent of the kernel before it in the stream
// (launch.cuh), so its CTAs start as that kernel's leave and its prologue overlaps that kernel's tail;
// it reads no input before grid_dependency_wait (schedule.cuh). 0 (default until an A/B on an H100
// has timed it): a plain launch, after the previous kernel has completed.
#ifndef JAX_FLASHMLA_DECODE_PDL
#define JAX_FLASHMLA_DECODE_PDL 0
#endif

namespace jax_flashmla {
namespace sm90 {

constexpr bool kDependentLaunch = JAX_FLASHMLA_DECODE_PDL != 0;

constexpr int kThreads = 256;                           // two consumer warpgroups
constexpr int kChannelTile = 64;                        // channels per 128-byte swizzled tile
constexpr int kTileBytes = 64 * kChannelTile * 2;       // 64 rows x 64 channels of 16-bit elements
constexpr int kChannelTiles = kHeadDim / kChannelTile;  // 9; tiles 0..7 are V, tile 8 is RoPE
constexpr int kBlockBytes = kChannelTiles * kTileBytes;  // one page of K, or the Q tile: 73728
constexpr int kPTile = kChannelTiles - 1;               // the RoPE tile of a page, reused for that page's P

// Scores part by part when at most kMaxTilesByPart row tiles share each page: then the K loads
// are the wait. With more, the tiles' CTAs find the pages in L2 and the tensor pipe is the limit.
// (H200 A/Bs, docs/performance.md: part by part 0 to +1.4% at one tile; at two -0.1 to +3.4% for
// s_k <= 8192, -1.5 to +1.5% at 16384; at four 0.2-5.5% slower, more at longer s_k.)
constexpr int kMaxTilesByPart = 2;

struct SharedStorage {
  alignas(1024) uint8_t q[kBlockBytes];     // Q tile, 9 swizzled tiles of 64 rows x 64 channels
  alignas(1024) uint8_t k[2][kBlockBytes];  // stage 0: even pages (A), stage 1: odd pages (B)
  float max_a[kRowsPerTile];                // running max after page A (published by warpgroup 0)
  float max_b[kRowsPerTile];                // running max after page B (published by warpgroup 1)
  float row_sum[2][kRowsPerTile];           // per-warpgroup row sums, at the end of a piece
  uint64_t k_full[2][2];                    // TMA completion of [stage][part] (schedule.cuh)
};

constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;  // + room to align the dynamic base

}  // namespace sm90
}  // namespace jax_flashmla
