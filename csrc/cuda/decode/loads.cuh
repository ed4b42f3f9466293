// The decode kernel's loads: a piece's page range, the Q tile (cp.async), the K pages (TMA, in two
// parts per stage) and the zeroing of V rows past a request's length.
#pragma once

#include "common/mla_contract.h"
#include "common/mla_params.h"
#include "cuda/decode/config.h"
#include "cuda/decode/traits.h"

namespace jax_flashmla {
namespace sm90 {

// The page range of request `req` in a part's tile_md row, clamped to the request's pages and the
// batch so that a stale plan can never index outside block_table.
struct PieceRange {
  int len;         // the request's tokens
  int page_begin;  // first page of the piece
  int n_pages;     // pages in the piece
  int split;       // index of the piece among its request's splits
};

__device__ __forceinline__ PieceRange piece_range(const int32_t* md, const DecodeParams& p, int req) {
  PieceRange r;
  r.len = max(p.seqlens[req], 0);
  const int pages = pages_of(r.len);
  r.page_begin = min(max(req == md[kMdBeginReq] ? md[kMdBeginPage] : 0, 0), pages);
  const int page_end = min(max(req == md[kMdEndReq] ? md[kMdEndPage] : pages, r.page_begin), pages);
  r.n_pages = page_end - r.page_begin;
  r.split = req == md[kMdBeginReq] ? md[kMdBeginSplit] : 0;
  return r;
}

// Page id of page `index` of request `req`; ids outside the pool, and pages past the block table,
// become a coordinate past the end of the tensor map, which TMA fills with zeros.
__device__ __forceinline__ int page_row_coord(const DecodeParams& p, int req, int index) {
  int page = -1;
  if (index < p.max_blocks_per_seq) page = p.block_table[static_cast<int64_t>(req) * p.max_blocks_per_seq + index];
  if (page < 0 || page >= p.num_blocks) page = p.num_blocks;
  return page * kPageSize;
}

// Starts loading the 64-row Q tile of (req, kv head, rows from row0) into the swizzled layout, with
// all kThreads threads; rows past the request's query rows are zero. Four threads share a row, so
// each finds its row's (token, head) with one division per piece; thread c0 of a row copies its
// chunks c0, c0 + 4, ..., c0 + 68, whose shared and global addresses are its two row bases plus
// compile-time offsets (the 18 copies need no per-copy address math). The four threads of a row
// read 64 contiguous bytes per step. The copies are cp.async, so all 18 are in flight at once;
// cp_async_wait_all() completes them.
__device__ __forceinline__ void start_q_tile(uint8_t* q_tile, const DecodeParams& p, int req, int kv_head, int row0) {
  constexpr int kChunksPerRow = kHeadDim * 2 / 16;  // 72 chunks of 16 bytes
  constexpr int kThreadsPerRow = kThreads / kRowsPerTile;
  static_assert(kThreadsPerRow == 4 && kChunksPerRow % kThreadsPerRow == 0, "the steps below assume 4 threads a row");
  const int r = threadIdx.x / kThreadsPerRow, c0 = threadIdx.x % kThreadsPerRow;
  const int row = row0 + r;
  const bool valid = row < p.rows_per_head_k;
  const int64_t elem = qo_row_index(p, req, query_row(p, kv_head, row)) * kHeadDim;
  const uint8_t* src = static_cast<const uint8_t*>(p.q) + (valid ? elem * 2 : 0) + c0 * 16;
  // Chunk c = c0 + 4k lies in 128-byte tile k / 2 at swizzled slot (c0 + 4 (k % 2)) ^ (r % 8).
  uint8_t* dst_even = q_tile + swizzled_offset(r, c0);
  uint8_t* dst_odd = q_tile + swizzled_offset(r, c0 + 4);
#pragma unroll
  for (int k = 0; k < kChunksPerRow / kThreadsPerRow; ++k) {
    cp_async_16((k % 2 ? dst_odd : dst_even) + (k / 2) * kTileBytes, src + k * kThreadsPerRow * 16, valid);
  }
}

// Loads part `w` of page `row_coord` into `stage` (schedule.cuh): V tiles 4w..4w+3, plus the RoPE
// tile when w is the warpgroup that reads this stage's P (1 for stage 0, 0 for stage 1).
__device__ __forceinline__ void issue_part(SharedStorage& s, int stage, int w, const CUtensorMap* map,
                                           int row_coord, int kv_head, uint64_t policy) {
  const bool rope = w == 1 - stage;
  uint64_t* full = &s.k_full[stage][w];
  mbar_arrive_expect_tx(full, (4 + rope) * kTileBytes);
#pragma unroll
  for (int t = 4 * w; t < 4 * w + 4; ++t) {
    tma_load_3d(s.k[stage] + t * kTileBytes, map, full, t * kChannelTile, kv_head, row_coord, policy);
  }
  if (rope) tma_load_3d(s.k[stage] + kPTile * kTileBytes, map, full, kPTile * kChannelTile, kv_head, row_coord, policy);
}

// On a request's last page, zeroes this warpgroup's V tiles (4 wg .. 4 wg + 3) in the key rows past
// the length before its P V reads them: those slots may hold NaN, and P = 0 times NaN is NaN. (Q K^T
// needs no zeroing: the scores of those keys are masked to -inf.)
__device__ __forceinline__ void zero_tail_values(uint8_t* stage, int valid, int wg, int wtid) {
  if (valid >= kPageSize) return;
  for (int i = wtid; i < (kPageSize - valid) * 4 * 8; i += 128) {
    const int r = valid + i / 32, chunk = i % 32;
    *reinterpret_cast<uint4*>(stage + (4 * wg + chunk / 8) * kTileBytes + swizzled_offset(r, chunk % 8)) =
        make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async();
  bar_sync(kBarWarpgroup + wg, 128);
}

}  // namespace sm90
}  // namespace jax_flashmla
