// The seesaw sparse decode's source of blocks for prefill::walk_blocks: the entry blocks of one split
// of one (request, query token), read from the FP8 pools and dequantised into the stage's bfloat16
// tiles by the warpgroup that refills the part.
#pragma once

#include <cstdint>

#include "common/sparse_params.h"
#include "cuda/ptx/sm90_ptx.cuh"
#include "cuda/sparse_decode/loads.cuh"
#include "cuda/sparse_decode_seesaw/config.h"
#include "cuda/sparse_prefill/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

using prefill::kMaskSlots;
using prefill::kTileBytes;

template <KvFormat kFormat>
struct DequantSource {
  static constexpr KvFormatLayout kLayout = kv_format_layout(kFormat);
  static constexpr int kFp8Tiles = fp8_tiles<kFormat>();
  static constexpr int kRopeTile = kFp8Tiles;  // the token's 64 bf16 RoPE channels
  static constexpr int kRopeOffset = kLayout.record_bytes - 2 * kLayout.d_rope;  // within the record

  // This thread's two rows of a block, 16 w + lane / 4 and that + 8 (w: the warp within its
  // warpgroup): the entry's id in its pool, or -1 when the entry is not read (past the split, -1, or
  // outside the pool).
  struct Rows {
    int32_t id[2];
  };
  // A part completes on two arrivals of each of its 128 threads: the cp.async arrival of its RoPE
  // copies and the plain one after its dequantised stores.
  static constexpr int kArrivals = 2 * prefill::kWarpgroupThreads;
  static constexpr bool kProducerFed = false;

  const SparseDecodeParams& p;
  int req, token;
  SplitRange range;

  __device__ __forceinline__ static int row_of(int i) {
    return 16 * ((threadIdx.x / 32) % 4) + (threadIdx.x % 32) / 4 + 8 * i;
  }

  // The pool of entry e and its index there.
  __device__ __forceinline__ const SparsePool& pool_of(int e, int& j) const {
    const bool main = e < range.n_main;
    j = main ? e : e - range.n_main;
    return main ? p.pool : p.extra;
  }

  __device__ __forceinline__ Rows rows(int block) const {
    Rows r;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int e = range.e_begin + block * kBlockN + row_of(i);
      int32_t id = -1;
      if (e < range.e_end) {
        int j;
        const SparsePool& pool = pool_of(e, j);
        const int32_t v = __ldg(pool.indices + (static_cast<int64_t>(req) * p.seqlen_q + token) * pool.topk + j);
        if (v >= 0 && static_cast<int64_t>(v) < pool.num_slots()) id = v;
      }
      r.id[i] = id;
    }
    return r;
  }

  // Where row i's token record and scales are in their pool (`read`: the entry is read).
  __device__ __forceinline__ void locate(int block, int i, int32_t id, const uint8_t*& record,
                                         const uint8_t*& scales) const {
    int j;
    const SparsePool& pool = pool_of(range.e_begin + block * kBlockN + row_of(i), j);
    const int page = id / pool.page_size, slot = id % pool.page_size;
    const uint8_t* page_base = pool.bytes + static_cast<int64_t>(page) * kv_page_bytes(kFormat, pool.page_size);
    record = page_base + kv_record_offset(kFormat, slot);
    scales = page_base + kv_scale_offset(kFormat, pool.page_size, slot);
  }

  // Starts bringing the lines a later fill of this part reads into L2, so that fill waits for L2
  // rather than for memory: the four threads of a token take the first, middle and last line of the
  // part's 256 e4m3 bytes and the line of its scales (RoPE goes by cp.async, not waited on here).
  __device__ __forceinline__ void prefetch(int part, int block, const Rows& r) const {
    const int c4 = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (r.id[i] < 0) continue;
      const uint8_t* record;
      const uint8_t* scales;
      locate(block, i, r.id[i], record, scales);
      const int fp8_bytes = min(256, kLayout.d_nope - 256 * part);
      const uint8_t* line = c4 == 3 ? scales : record + 256 * part + (c4 == 2 ? fp8_bytes - 1 : 128 * c4);
      sm90::prefetch_l2(line);
    }
  }

  // The scale of tile 4 part + tt from the bytes fill loaded: a float32 (V3.2), or 2^(b - 127) for the
  // ue8m0 byte b (MODEL1; 0xFF is NaN, 0 the subnormal 2^-127: group_scale's rule).
  __device__ __forceinline__ static float scale_of(uint2 bits, int tt, int part) {
    if constexpr (kLayout.scale_bytes == 4) {
      return __uint_as_float(tt < 2 ? bits.x : bits.y);
    } else {
      const int g = 4 * part + tt;
      const uint32_t b = ((g < 4 ? bits.x : bits.y) >> (8 * (g % 4))) & 0xFFu;
      return b == 0xFFu ? __int_as_float(0x7fc00000) : __uint_as_float(b == 0 ? 0x00400000u : b << 23);
    }
  }

  // Part `part` of block `block` into stage `stage` (walk_blocks' contract, schedule.cuh): its e4m3
  // tiles dequantised (value * its group's scale, rounded to bfloat16, as the CPU handler does), the
  // RoPE tile copied by cp.async when it belongs to this part, unread rows as zeros. A thread
  // converts, in each of its two rows, one 16-byte chunk (16 channels) of each of the part's e4m3
  // tiles: four adjacent threads cover a tile's 64 bytes of a token. The rows go one after the other
  // (load, convert, store): holding both rows' values at once spills at 255 registers, so each fill
  // waits for two global round trips.
  template <int kDqk>
  __device__ __forceinline__ void fill(prefill::SharedStorage<kDqk>& s, int stage, int part, int block,
                                       const Rows& r) const {
    static_assert(kDqk == kLayout.d_qk, "the format's tile plan");
    const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4, c4 = lane % 4;
    // V3.2's RoPE tile (the ninth) goes with the part of the warpgroup that reads the block's P from
    // it; MODEL1's (the eighth, a V tile) is part 1's last tile.
    const bool rope_here = kDqk == 576 ? part == 1 - stage : part == 1;
    uint8_t* base = s.k[stage];

#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row_of(i);
      const bool read = r.id[i] >= 0;
      const uint8_t* record = nullptr;
      const uint8_t* scales = nullptr;
      if (read) locate(block, i, r.id[i], record, scales);
      // RoPE is bfloat16 already: copied by cp.async (zeros for an unread row), no registers.
      if (rope_here) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          sm90::cp_async_16(base + kRopeTile * kTileBytes + sm90::swizzled_offset(row, c4 + 4 * k),
                            read ? record + kRopeOffset + (c4 + 4 * k) * 16 : p.pool.bytes, read);
        }
      }
      uint4 raw[4];
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) {
        const int tile = 4 * part + tt;
        raw[tt] = make_uint4(0, 0, 0, 0);
        if (read && tile < kFp8Tiles) raw[tt] = __ldg(reinterpret_cast<const uint4*>(record + tile * 64) + c4);
      }
      // The scales' bytes (unread rows: 0.0f or 2^-127, either way their zero values stay zeros):
      // V3.2's part's two float32 (groups of 128 channels), MODEL1's 8-byte ue8m0 record (groups of 64).
      uint2 scale_bits = make_uint2(0, 0);
      if (read) {
        scale_bits = kLayout.scale_bytes == 4 ? __ldg(reinterpret_cast<const uint2*>(scales) + part)
                                              : __ldg(reinterpret_cast<const uint2*>(scales));
      }
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) {
        const int tile = 4 * part + tt;
        if (tile >= kFp8Tiles) continue;
        uint8_t* tile_base = base + tile * kTileBytes;
        dequant16(raw[tt], scale_of(scale_bits, tt, part), reinterpret_cast<uint16_t*>(tile_base + sm90::swizzled_offset(row, 2 * c4)),
                  reinterpret_cast<uint16_t*>(tile_base + sm90::swizzled_offset(row, 2 * c4 + 1)));
      }
    }
    if (part == stage) {
      // Bit r of word w: entry 16 w + r of the block is read (lanes 4 q of this warp hold rows q, q + 8).
      // Published before the arrivals below, so whoever waits on the part's k_full also sees it.
      uint32_t bits = 0;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint32_t b = __ballot_sync(0xffffffffu, r.id[i] >= 0);
#pragma unroll
        for (int q = 0; q < 8; ++q) bits |= ((b >> (4 * q)) & 1u) << (q + 8 * i);
      }
      if (lane == 0) s.mask[block % kMaskSlots][warp] = static_cast<uint16_t>(bits);
    }
    // The stores are generic-proxy writes that wgmma reads through the async proxy.
    sm90::fence_proxy_async();
    sm90::mbar_arrive(&s.k_full[stage][part]);
    sm90::cp_async_mbar_arrive(&s.k_full[stage][part]);  // once this thread's RoPE copies have landed
    if (part == stage) sm90::bar_sync(sm90::kBarWarpgroup + part, prefill::kWarpgroupThreads);
  }
};

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
