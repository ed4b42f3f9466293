// The sparse decode kernel's loads: the Q tile, the resolution of a block's entries to token records
// (or to "masked"), and the dequantisation of the named tokens into shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common/sparse_params.h"
#include "cuda/ptx/sm90_ptx.cuh"
#include "cuda/sparse_decode/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {

// Entries a request reads from `pool`: its topk_length clamped to [0, topk], or all of them.
__device__ __forceinline__ int entries_of(const SparsePool& pool, int req) {
  if (pool.topk == 0) return 0;
  if (pool.topk_length == nullptr) return pool.topk;
  return min(max(pool.topk_length[req], 0), pool.topk);
}

// The entries split `split` of request `req` walks: [e_begin, e_end) of its n_main + n_extra entries
// (main then extra as one sequence), split by whole blocks: blocks [split nb / num_splits,
// (split + 1) nb / num_splits) of nb = ceil((n_main + n_extra) / 64). Empty when the split holds no
// block.
struct SplitRange {
  int n_main, n_extra, e_begin, e_end;
};

__device__ __forceinline__ SplitRange split_range(const SparseDecodeParams& p, int req, int split) {
  SplitRange r;
  r.n_main = entries_of(p.pool, req);
  r.n_extra = entries_of(p.extra, req);
  const int n_entries = r.n_main + r.n_extra;
  const int64_t n_blocks = ceil_div(n_entries, kBlockN);
  r.e_begin = static_cast<int>(split * n_blocks / p.num_splits) * kBlockN;
  r.e_end = min(static_cast<int>((split + 1) * n_blocks / p.num_splits) * kBlockN, n_entries);
  return r;
}

// A CTA of the sparse decode grids: one per (request, query token, split, head tile), head tiles
// innermost, then splits, then query tokens (the CTAs that read the same tokens run side by side).
struct DecodeCta {
  int req, token, split, head0, rows;  // rows: live heads of the tile (head0 .. head0 + rows - 1)
  int64_t qo_row0;                     // row of head head0 in out (and in each split's partials)
};

__device__ __forceinline__ DecodeCta decode_cta(const SparseDecodeParams& p) {
  const int head_tiles = ceil_div(p.num_heads_q, kRows);
  DecodeCta c;
  c.head0 = (blockIdx.x % head_tiles) * kRows;
  c.split = (blockIdx.x / head_tiles) % p.num_splits;
  c.token = (blockIdx.x / head_tiles / p.num_splits) % p.seqlen_q;
  c.req = blockIdx.x / head_tiles / p.num_splits / p.seqlen_q;
  c.rows = min(kRows, p.num_heads_q - c.head0);
  c.qo_row0 = (static_cast<int64_t>(c.req) * p.seqlen_q + c.token) * p.num_heads_q + c.head0;
  return c;
}

// Loads the Q rows (heads head0 .. head0 + rows - 1 of one query token) into the swizzled tile; rows
// past `rows` are zero. `q_row0` points at head head0's first channel.
template <class Tr, class SmemTensor>
__device__ __forceinline__ void load_q_tile(SmemTensor& sQ, const uint16_t* q_row0, int rows) {
  constexpr int kChunksPerRow = Tr::kDqk / 8;  // 16-byte chunks of 8 bf16
  for (int i = threadIdx.x; i < kRows * kChunksPerRow; i += kThreads) {
    const int r = i / kChunksPerRow, c = i % kChunksPerRow;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows) v = __ldg(reinterpret_cast<const uint4*>(q_row0 + static_cast<int64_t>(r) * Tr::kDqk) + c);
    *reinterpret_cast<uint4*>(&sQ(r, c * 8)) = v;
  }
}

// Resolves entry `e` (0-based over the main pool's entries, then the extra pool's) of (req, token)
// to the byte addresses of its token's record and scales; record is null for an entry that is past
// the lengths, -1, or any id outside its pool: such an entry is never read.
template <KvFormat kFormat>
__device__ __forceinline__ void resolve_entry(const SparseDecodeParams& p, int req, int token, int e, int n_main,
                                              int n_extra, const uint8_t*& record, const uint8_t*& scales) {
  record = nullptr;
  scales = nullptr;
  if (e >= n_main + n_extra) return;
  const bool main = e < n_main;
  const SparsePool& pool = main ? p.pool : p.extra;
  const int j = main ? e : e - n_main;
  const int32_t id = pool.indices[(static_cast<int64_t>(req) * p.seqlen_q + token) * pool.topk + j];
  if (id < 0 || static_cast<int64_t>(id) >= pool.num_slots()) return;
  const int page = id / pool.page_size, slot = id % pool.page_size;
  const uint8_t* base = pool.bytes + static_cast<int64_t>(page) * kv_page_bytes(kFormat, pool.page_size);
  record = base + kv_record_offset(kFormat, slot);
  scales = base + kv_scale_offset(kFormat, pool.page_size, slot);
}

// The scale of group g of a token: a float32 (V3.2) or ue8m0 2^(byte - 127) (MODEL1; 0xFF is NaN).
template <KvFormat kFormat>
__device__ __forceinline__ float group_scale(const uint8_t* scales, int g) {
  if constexpr (kv_format_layout(kFormat).scale_bytes == 4) {
    return __ldg(reinterpret_cast<const float*>(scales) + g);
  } else {
    const uint32_t byte = __ldg(scales + g);
    if (byte == 0xFFu) return __int_as_float(0x7fc00000);
    // 2^(byte - 127): the biased exponent byte for byte >= 1, the subnormal 2^-127 for byte 0.
    return __uint_as_float(byte == 0 ? 0x00400000u : byte << 23);
  }
}

// 16 e4m3 values times `scale`, each rounded to bfloat16 (exact unless the product underflows, as in
// the CPU handler), stored as two 16-byte chunks of 8 values at lo and hi (the swizzle keeps 8
// channels together, not 16).
__device__ __forceinline__ void dequant16(uint4 raw, float scale, uint16_t* lo, uint16_t* hi) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t packed[8];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // Two e4m3 bytes -> two halves (exact: e4m3 values are all representable) -> float.
      const __half2_raw two = __nv_cvt_fp8x2_to_halfraw2(
          static_cast<__nv_fp8x2_storage_t>((words[w] >> (16 * h)) & 0xFFFFu), __NV_E4M3);
      const float2 f = __half22float2(__half2(two));
      const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
      packed[2 * w + h] = *reinterpret_cast<const uint32_t*>(&b);
    }
  }
  *reinterpret_cast<uint4*>(lo) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  *reinterpret_cast<uint4*>(hi) = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}

// Dequantises the block's tokens into sK, four threads a token: thread `part` of token j converts
// the 16-byte chunks part, part + 4, ... of the e4m3 values (four adjacent threads read 64 adjacent
// bytes) and copies RoPE chunks part and part + 4. A masked entry's row is zeroed (its scores are
// -inf, and a zero V row keeps P V free of whatever the slot holds).
template <class Tr, class SmemTensor>
__device__ __forceinline__ void dequant_block(SmemTensor& sK, const uint8_t* const* records,
                                              const uint8_t* const* scale_ptrs) {
  constexpr KvFormatLayout L = Tr::kLayout;
  constexpr int kFp8Chunks = L.d_nope / kChunk;  // 32 (V3.2) or 28 (MODEL1)
  constexpr int kRopeChunks = L.d_rope * 2 / kChunk;  // 8
  static_assert(kFp8Chunks % kThreadsPerToken == 0 && kRopeChunks % kThreadsPerToken == 0, "even split");
  const int j = threadIdx.x / kThreadsPerToken, part = threadIdx.x % kThreadsPerToken;
  const uint8_t* record = records[j];
  if (record == nullptr) {
    for (int c = part; c < Tr::kDqk / 8; c += kThreadsPerToken) {
      *reinterpret_cast<uint4*>(&sK(j, c * 8)) = make_uint4(0, 0, 0, 0);
    }
    return;
  }
  const uint8_t* scales = scale_ptrs[j];
  uint4 raw[kFp8Chunks / kThreadsPerToken];
#pragma unroll
  for (int i = 0; i < kFp8Chunks / kThreadsPerToken; ++i) {
    raw[i] = __ldg(reinterpret_cast<const uint4*>(record) + i * kThreadsPerToken + part);
  }
  uint4 rope[kRopeChunks / kThreadsPerToken];
#pragma unroll
  for (int i = 0; i < kRopeChunks / kThreadsPerToken; ++i) {
    rope[i] = __ldg(reinterpret_cast<const uint4*>(record + kv_rope_offset(Tr::kFormatValue, 0)) +
                    i * kThreadsPerToken + part);
  }
#pragma unroll
  for (int i = 0; i < kFp8Chunks / kThreadsPerToken; ++i) {
    const int chunk = i * kThreadsPerToken + part;  // 16 e4m3 values: channels 16 chunk .. 16 chunk + 15
    const float scale = group_scale<Tr::kFormatValue>(scales, chunk * kChunk / L.group_size);
    dequant16(raw[i], scale, reinterpret_cast<uint16_t*>(&sK(j, chunk * kChunk)),
              reinterpret_cast<uint16_t*>(&sK(j, chunk * kChunk + 8)));
  }
#pragma unroll
  for (int i = 0; i < kRopeChunks / kThreadsPerToken; ++i) {
    const int chunk = i * kThreadsPerToken + part;  // 8 bf16: channels d_nope + 8 chunk ..
    *reinterpret_cast<uint4*>(&sK(j, L.d_nope + chunk * 8)) = rope[i];
  }
}

// ---- The pipelined kernel's loads (kPipeline): ids and records are copied into shared memory with
// cp.async one block ahead, then dequantised from there. --------------------------------------------

// Where entry `e` of (req, token) takes its id from, or null past the lengths (as resolve_entry).
__device__ __forceinline__ const int32_t* entry_id_ptr(const SparseDecodeParams& p, int req, int token, int e,
                                                       int n_main, int n_extra) {
  if (e >= n_main + n_extra) return nullptr;
  const bool main = e < n_main;
  const SparsePool& pool = main ? p.pool : p.extra;
  const int j = main ? e : e - n_main;
  return pool.indices + (static_cast<int64_t>(req) * p.seqlen_q + token) * pool.topk + j;
}

// Copies the ids of the block at entry e0 into `ids` (threads 0..63, one entry each; none past the
// lengths). The caller commits and waits.
__device__ __forceinline__ void stage_ids(const SparseDecodeParams& p, int req, int token, int e0, int n_main,
                                          int n_extra, int32_t* ids) {
  if (threadIdx.x >= kBlockN) return;
  const int32_t* src = entry_id_ptr(p, req, token, e0 + threadIdx.x, n_main, n_extra);
  if (src != nullptr) sm90::cp_async_4(ids + threadIdx.x, src);
}

// resolve_entry with the entry's id already at hand (`id`, read only when e is within the lengths):
// the same masks, the same addresses.
template <KvFormat kFormat>
__device__ __forceinline__ const uint8_t* resolve_staged(const SparseDecodeParams& p, int e, int n_main, int n_extra,
                                                         int32_t id, const uint8_t*& scales) {
  scales = nullptr;
  if (e >= n_main + n_extra) return nullptr;
  const SparsePool& pool = e < n_main ? p.pool : p.extra;
  if (id < 0 || static_cast<int64_t>(id) >= pool.num_slots()) return nullptr;
  const int page = id / pool.page_size, slot = id % pool.page_size;
  const uint8_t* base = pool.bytes + static_cast<int64_t>(page) * kv_page_bytes(kFormat, pool.page_size);
  scales = base + kv_scale_offset(kFormat, pool.page_size, slot);
  return base + kv_record_offset(kFormat, slot);
}

// Resolves the block at entry e0 (its ids in `ids`) and copies the records of its read entries into
// the stage, four threads a token (thread `part` copies 16-byte chunks part, part + 4, ...: four
// adjacent threads, 64 adjacent bytes); a masked entry is not copied at all (its stage row keeps
// whatever it held and is never read). Threads 0..63 publish the block's read mask in `valid`.
// The caller commits and waits.
template <KvFormat kFormat>
__device__ __forceinline__ void stage_block(const SparseDecodeParams& p, int e0, int n_main, int n_extra,
                                            const int32_t* ids, uint8_t* stage, uint8_t* stage_scales,
                                            uint32_t* valid) {
  using SL = StageLayout<kFormat>;
  constexpr int kChunks = SL::kRecordBytes / kChunk;  // 41 or 36
  const int tid = threadIdx.x;
  if (tid < kBlockN) {
    const uint8_t* scales;
    const bool read = resolve_staged<kFormat>(p, e0 + tid, n_main, n_extra, ids[tid], scales) != nullptr;
    const uint32_t bits = __ballot_sync(0xffffffffu, read);
    if (tid % 32 == 0) valid[tid / 32] = bits;
  }
  const int j = tid / kThreadsPerToken, part = tid % kThreadsPerToken;
  const uint8_t* scales;
  const uint8_t* record = resolve_staged<kFormat>(p, e0 + j, n_main, n_extra, ids[j], scales);
  if (record == nullptr) return;
  uint8_t* dst = stage + j * SL::kStride;
#pragma unroll
  for (int c = part; c < kChunks; c += kThreadsPerToken) sm90::cp_async_16(dst + c * kChunk, record + c * kChunk, true);
  if constexpr (SL::kLayout.scale_record_bytes == 8) {
    if (part == 0) sm90::cp_async_8(stage_scales + j * SL::kScaleBytes, scales);
  } else {
    static_assert(SL::kLayout.scale_record_bytes == 0, "V3.2 scales sit in the record");
  }
}

// group_scale from the staged scales (shared memory): the same values.
template <KvFormat kFormat>
__device__ __forceinline__ float staged_group_scale(const uint8_t* scales, int g) {
  if constexpr (kv_format_layout(kFormat).scale_bytes == 4) {
    return reinterpret_cast<const float*>(scales)[g];
  } else {
    const uint32_t byte = scales[g];
    if (byte == 0xFFu) return __int_as_float(0x7fc00000);
    return __uint_as_float(byte == 0 ? 0x00400000u : byte << 23);
  }
}

// dequant_block from the stage: the same threads, chunks, conversion and zero rows for the entries
// that `valid` does not read.
template <class Tr, class SmemTensor>
__device__ __forceinline__ void dequant_staged(SmemTensor& sK, const uint8_t* stage, const uint8_t* stage_scales,
                                               uint64_t valid) {
  using SL = StageLayout<Tr::kFormatValue>;
  constexpr KvFormatLayout L = Tr::kLayout;
  constexpr int kFp8Chunks = L.d_nope / kChunk;
  constexpr int kRopeChunks = L.d_rope * 2 / kChunk;
  const int j = threadIdx.x / kThreadsPerToken, part = threadIdx.x % kThreadsPerToken;
  if (((valid >> j) & 1u) == 0) {
    for (int c = part; c < Tr::kDqk / 8; c += kThreadsPerToken) {
      *reinterpret_cast<uint4*>(&sK(j, c * 8)) = make_uint4(0, 0, 0, 0);
    }
    return;
  }
  const uint8_t* record = stage + j * SL::kStride;
  const uint8_t* scales = L.scale_record_bytes == 0 ? record + kv_scale_offset(Tr::kFormatValue, 0, 0)
                                                    : stage_scales + j * SL::kScaleBytes;
#pragma unroll
  for (int i = 0; i < kFp8Chunks / kThreadsPerToken; ++i) {
    const int chunk = i * kThreadsPerToken + part;
    const uint4 raw = *reinterpret_cast<const uint4*>(record + chunk * kChunk);
    const float scale = staged_group_scale<Tr::kFormatValue>(scales, chunk * kChunk / L.group_size);
    dequant16(raw, scale, reinterpret_cast<uint16_t*>(&sK(j, chunk * kChunk)),
              reinterpret_cast<uint16_t*>(&sK(j, chunk * kChunk + 8)));
  }
#pragma unroll
  for (int i = 0; i < kRopeChunks / kThreadsPerToken; ++i) {
    const int chunk = i * kThreadsPerToken + part;
    *reinterpret_cast<uint4*>(&sK(j, L.d_nope + chunk * 8)) =
        *reinterpret_cast<const uint4*>(record + kv_rope_offset(Tr::kFormatValue, 0) + chunk * kChunk);
  }
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
