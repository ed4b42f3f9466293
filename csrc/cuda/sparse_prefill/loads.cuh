// The sparse prefill kernels' loads: the entries a query token reads and their resolution to kv rows
// (or to "masked"); the forward's cp.async gathers of a block's rows into a stage of the two-warpgroup
// schedule (issue_part) and of its Q tile; and the row copies of the backward kernel (copy_rows_async).
#pragma once

#include <cstdint>

#include "common/sparse_params.h"
#include "cuda/ptx/sm90_ptx.cuh"
#include "cuda/sparse_prefill/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

// Entries query token `token` reads: its topk_length clamped to [0, topk], or all topk.
__device__ __forceinline__ int entries_of(const SparsePrefillParams& p, int64_t token) {
  if (p.topk_length == nullptr) return p.topk;
  return min(max(p.topk_length[token], 0), p.topk);
}

// Threads 0..63 (two whole warps): entry e0 + threadIdx.x of the token, of its `n` read ones, to its kv
// row in row[threadIdx.x] (-1 past n, for -1, for any other negative id and for ids >= s_kv: such
// an entry is never read), and the block's bit mask of read entries in valid[0..1].
__device__ __forceinline__ void resolve_block(const SparsePrefillParams& p, int64_t token, int n, int e0,
                                              int32_t* row, uint32_t* valid) {
  const int j = threadIdx.x;
  int32_t r = -1;
  if (e0 + j < n) {
    const int32_t id = __ldg(p.indices + token * p.topk + e0 + j);
    if (id >= 0 && static_cast<int64_t>(id) < p.seqlen_kv) r = id;
  }
  row[j] = r;
  const uint32_t bits = __ballot_sync(0xffffffffu, r >= 0);
  if (j % 32 == 0) valid[j / 32] = bits;
}

// Issues the copies of kRowsT rows of kChunks 16-byte chunks into `dst` (a swizzled [kRowsT, 8 kChunks]
// bfloat16 tile): row r comes from source_of(r), or is zero-filled where that is null (nothing is read
// for it; the copy then names `anywhere`, a valid address it does not dereference). Warp w copies rows
// w, w + kWarps, ..., each lane 16-byte chunks lane, lane + 32, ...: one warp instruction reads 512
// contiguous bytes of a row. The caller fences and waits (cp_async_fence / cp_async_wait). Shared with
// the backward kernel (its Q, dO and kv tiles), whose CTA has as many warps.
template <int kRowsT, int kChunks, class Tr, class SmemTensor, class SourceOf>
__device__ __forceinline__ void copy_rows_async(SmemTensor& dst, const uint16_t* anywhere, SourceOf source_of) {
  static_assert(kRowsT % kWarps == 0, "whole rows per warp");
  constexpr int kSteps = (kChunks + 31) / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kRowsT / kWarps; ++i) {
    const int r = warp + i * kWarps;
    const uint16_t* src = source_of(r);
    const bool read = src != nullptr;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int c = lane + 32 * s;
      if (kChunks % 32 == 0 || c < kChunks) {
        const uint16_t* from = read ? src + c * 8 : anywhere;
        Tr::RowCopy::copy(*reinterpret_cast<const cute::uint128_t*>(from),
                          *reinterpret_cast<cute::uint128_t*>(&dst(r, c * 8)), read);
      }
    }
  }
}

// The kv rows a thread copies in a part load of block `block`: rows 16 warp + lane / 8 + 4 j
// (j = 0..3) of the block (warp within the warpgroup), chunk lane % 8 of each of their tiles, so
// that one warp instruction copies four whole 128-byte tile rows. A row is -1 when its entry is not
// read (past n, -1, or any id outside [0, s_kv)). Read before the copies are issued, so that the index
// loads' latency hides under the math.
struct PartRows {
  int32_t id[4];
};

__device__ __forceinline__ PartRows part_rows(const SparsePrefillParams& p, int64_t token, int n, int block) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
  PartRows rows;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int e = block * kBlockN + 16 * warp + lane / 8 + 4 * j;
    int32_t id = -1;
    if (e < n) {
      const int32_t v = __ldg(p.indices + token * p.topk + e);
      if (v >= 0 && static_cast<int64_t>(v) < p.seqlen_kv) id = v;
    }
    rows.id[j] = id;
  }
  return rows;
}

// The block's mask word of this thread's warp (bit r: entry 16 warp + r is read) from `rows`: lanes
// 8 q of the warp hold rows 16 warp + q + 4 j. All lanes call it.
__device__ __forceinline__ uint16_t part_mask_bits(const PartRows& rows) {
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t b = __ballot_sync(0xffffffffu, rows.id[j] >= 0);
#pragma unroll
    for (int q = 0; q < 4; ++q) bits |= ((b >> (8 * q)) & 1u) << (4 * j + q);
  }
  return static_cast<uint16_t>(bits);
}

// Gathers part `part` of block `block` into stage `stage` (the warpgroup `part` calls it, all 128
// threads): V tiles 4 part .. 4 part + 3, and with d_qk 576 the RoPE tile when part == 1 - stage (the
// part of the warpgroup that reads the block's P from that tile, kernel.cuh). Rows of unread entries
// are zero-filled, never read. The part's mbarrier completes when every thread's copies have
// landed. The warpgroup that runs the block's softmax (part == stage) also publishes the block's
// mask of read entries in mask[block % kMaskSlots], visible to the warpgroup on return.
// kForProducer (a producer warpgroup fills every part, schedule.cuh): the mask is published before the
// copies, and a plain mbarrier arrival follows the cp.async one, so whoever waits on the part's k_full
// also sees the mask (the part then completes on 256 arrivals).
template <int kDqk, bool kForProducer = false>
__device__ __forceinline__ void issue_part(SharedStorage<kDqk>& s, const SparsePrefillParams& p, int stage, int part,
                                           int block, const PartRows& rows) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4, chunk = lane % 8;
  const bool rope = kDqk == 576 && part == 1 - stage;
  uint8_t* base = s.k[stage];
  if constexpr (kForProducer) {
    if (part == stage) {
      const uint16_t bits = part_mask_bits(rows);
      if (lane == 0) s.mask[block % kMaskSlots][warp] = bits;
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = 16 * warp + lane / 8 + 4 * j;
    const bool read = rows.id[j] >= 0;
    const uint16_t* src = p.kv + (read ? static_cast<int64_t>(rows.id[j]) * kDqk + chunk * 8 : 0);
#pragma unroll
    for (int i = 0; i < 5; ++i) {
      if (i == 4 && !rope) continue;
      const int tile = i < 4 ? 4 * part + i : 8;
      sm90::cp_async_16(base + tile * kTileBytes + sm90::swizzled_offset(row, chunk), src + (read ? tile * 64 : 0),
                        read);
    }
  }
  sm90::cp_async_mbar_arrive(&s.k_full[stage][part]);
  if constexpr (kForProducer) {
    sm90::mbar_arrive(&s.k_full[stage][part]);
  } else if (part == stage) {
    const uint16_t bits = part_mask_bits(rows);
    if (lane == 0) s.mask[block % kMaskSlots][warp] = bits;
    sm90::bar_sync(sm90::kBarWarpgroup + part, kWarpgroupThreads);
  }
}

// The prefill's source of blocks for walk_blocks (schedule.cuh): query token `token`'s first n
// entries, their kv rows gathered by cp.async.
// kForProducer: the producer warpgroup's source (issue_part's kForProducer).
template <bool kForProducer = false>
struct GatherSource {
  using Rows = PartRows;
  // A part completes on its threads' cp.async arrivals (and, for the producer, their plain ones).
  static constexpr int kArrivals = kForProducer ? 2 * kWarpgroupThreads : kWarpgroupThreads;
  static constexpr bool kProducerFed = false;
  const SparsePrefillParams& p;
  int64_t token;
  int n;

  __device__ __forceinline__ Rows rows(int block) const { return part_rows(p, token, n, block); }
  // The gathers are asynchronous already: nothing to prefetch.
  __device__ __forceinline__ void prefetch(int, int, const Rows&) const {}
  template <int kDqk>
  __device__ __forceinline__ void fill(SharedStorage<kDqk>& s, int stage, int part, int block, const Rows& r) const {
    issue_part<kDqk, kForProducer>(s, p, stage, part, block, r);
  }
};

// Issues the copies of the Q tile: heads head0 .. head0 + rows - 1 of the token from `q_row0`, the
// rows past `rows` zero-filled. All kThreads threads; the caller commits and waits.
template <int kDqk>
__device__ __forceinline__ void issue_q_tile(SharedStorage<kDqk>& s, const uint16_t* q_row0, int rows) {
  constexpr int kChunks = kDqk / 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int row = c / kChunks, tile = (c % kChunks) / 8, chunk = c % 8;
    const bool read = row < rows;
    sm90::cp_async_16(s.q + tile * kTileBytes + sm90::swizzled_offset(row, chunk),
                      q_row0 + (read ? static_cast<int64_t>(row) * kDqk + (c % kChunks) * 8 : 0), read);
  }
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
