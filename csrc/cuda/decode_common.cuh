// Building blocks of the decode kernel (mla_decode_sm90.cu) and the combine kernel (mla_combine.cu):
// shared-memory tile geometry, the Q load, masking and softmax helpers and the per-piece output store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/mla_contract.h"
#include "common/mla_params.h"
#include "cuda/sm90_ptx.cuh"

namespace jax_flashmla {
namespace sm90 {

constexpr int kThreads = 256;                           // two consumer warpgroups
constexpr int kChannelTile = 64;                        // channels per 128-byte swizzled tile
constexpr int kTileBytes = 64 * kChannelTile * 2;       // 64 rows x 64 channels of 16-bit elements
constexpr int kChannelTiles = kHeadDim / kChannelTile;  // 9; tiles 0..7 are V, tile 8 is RoPE
constexpr int kBlockBytes = kChannelTiles * kTileBytes;  // one page of K, or the Q tile: 73728

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a 128-byte-swizzled tile.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Exclusive end of the keys that query row `row` (of this kv head) sees.
__device__ __forceinline__ int key_limit(const DecodeParams& p, int len, int row) {
  if (!p.causal) return len;
  const int token = row / p.q_heads_per_k;
  return min(max(len - p.seqlen_q + token + 1, 0), len);
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
  const int token = row / p.q_heads_per_k;
  const int head = kv_head * p.q_heads_per_k + row % p.q_heads_per_k;
  const int64_t elem = ((static_cast<int64_t>(req) * p.seqlen_q + token) * p.num_heads_q + head) * kHeadDim;
  const uint8_t* src = static_cast<const uint8_t*>(p.q) + (valid ? elem * 2 : 0) + c0 * 16;
  // Chunk c = c0 + 4k lies in 128-byte tile k / 2 at swizzled slot (c0 + 4 (k % 2)) ^ (r % 8).
  uint8_t* dst_even = q_tile + swizzled_offset(r, c0);
  uint8_t* dst_odd = q_tile + swizzled_offset(r, c0 + 4);
#pragma unroll
  for (int k = 0; k < kChunksPerRow / kThreadsPerRow; ++k) {
    cp_async_16((k % 2 ? dst_odd : dst_even) + (k / 2) * kTileBytes, src + k * kThreadsPerRow * 16, valid);
  }
}

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

// 2^x by the SFU's approximate instruction (relative error about 2^-22, far below what the 16-bit P
// keeps); -inf gives +0. exp2f adds a range reduction that the softmax does not need.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Masks keys at or past each row's limit in a raw score fragment (to -inf) and returns the row
// maxima of the raw scores over the warpgroup's columns. The fragment holds kValues accumulators of
// a 64 x (2 kValues) wgmma tile (rows r_lo, r_lo + 8); `key0` is the key of its first column. The
// per-key compares run only in warps that hold a limit inside the fragment (the last pages).
// The softmax scale is applied later, folded into the exponent (it is positive, so maxima agree).
template <int kValues>
__device__ __forceinline__ void mask_row_max(float* sc, int key0, int col_q, int limit_lo, int limit_hi, float& mx_lo,
                                             float& mx_hi) {
  if (__any_sync(0xffffffffu, key0 + 2 * kValues > min(limit_lo, limit_hi))) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) {
      const int key = key0 + (i / 4) * 8 + col_q + (i & 1);
      if (key >= (((i >> 1) & 1) ? limit_hi : limit_lo)) sc[i] = -INFINITY;
    }
  }
  mx_lo = -INFINITY;
  mx_hi = -INFINITY;
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    if ((i >> 1) & 1) mx_hi = fmaxf(mx_hi, sc[i]); else mx_lo = fmaxf(mx_lo, sc[i]);
  }
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffff, mx_lo, d));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffff, mx_hi, d));
  }
}

// A row that has seen no key keeps max -inf; exponents are taken against 0 then, giving 0, not NaN.
__device__ __forceinline__ float exp_base(float m) { return m == -INFINITY ? 0.f : m; }

// The factor 2^(m_old - m_new) that moves sums taken against the running max m_old to m_new
// (log2 units); exactly 1 when the max did not move, so rescale_rows can skip the work.
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return m_old == m_new ? 1.f : exp2_approx(m_old - exp_base(m_new));
}

// Rescales the rows of a 64x256 output fragment (rows r_lo and r_lo + 8 of this thread) by a_lo and
// a_hi. The whole warp skips it when no factor of its 16 rows differs from 1 (x * 1 == x): once the
// row maxima settle most pages change none of them. Call with the warp converged.
__device__ __forceinline__ void rescale_rows(float* o, float a_lo, float a_hi) {
  if (!__any_sync(0xffffffffu, a_lo != 1.f || a_hi != 1.f)) return;
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] *= ((i >> 1) & 1) ? a_hi : a_lo;
}

// V of `stage`, channels [256 wg, 256 wg + 256), token step kk: the MN-major B operand of PV.
__device__ __forceinline__ uint64_t v_desc(const uint8_t* stage, int wg, int kk) {
  return desc_advance(smem_desc_sw128(stage + (4 * wg) * kTileBytes, kTileBytes, 1024), kk * 16 * 128);
}

// Raises `kKernel`'s dynamic shared-memory limit to `bytes`. The attribute belongs to the current
// device, so it is set once per device (a template argument per kernel keeps their flags apart).
template <auto kKernel>
inline cudaError_t allow_dynamic_smem(int bytes) {
  static bool configured[64] = {};
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const bool tracked = device >= 0 && device < 64;
  if (tracked && configured[device]) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && tracked) configured[device] = true;
  return err;
}

// Stores one warpgroup's half of a piece's output: `o` is the 64x256 fp32 accumulator fragment of
// channels [256 wg, 256 wg + 256) (rows r_lo and r_lo + 8 of this thread), normalized by l. A whole
// request writes out/lse; a split one its accumulator slot. m is the row max in log2 units.
template <typename Elem>
__device__ __forceinline__ void store_piece(const DecodeParams& p, const float* o, int req, int kv_head, int row0,
                                            int r_lo, int wg, int lane, float l_lo, float l_hi, float m_lo,
                                            float m_hi, bool final_out, int64_t slot) {
  const int col_q = 2 * (lane % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + r_lo + 8 * half;
    if (row >= p.rows_per_head_k) continue;
    const float l = half ? l_hi : l_lo, m = half ? m_hi : m_lo;
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
    const float lse = empty ? (final_out ? INFINITY : -INFINITY) : (m + log2f(l)) * 0.6931471805599453f;
    const int token = row / p.q_heads_per_k;
    const int head = kv_head * p.q_heads_per_k + row % p.q_heads_per_k;
    if (final_out) {
      Elem* out = static_cast<Elem*>(p.out) +
                  ((static_cast<int64_t>(req) * p.seqlen_q + token) * p.num_heads_q + head) * kHeadDimV + wg * 256;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int i = j * 4 + half * 2;
        *reinterpret_cast<uint32_t*>(out + j * 8 + col_q) = pack2<Elem>(o[i] * inv, o[i + 1] * inv);
      }
      if (wg == 0 && lane % 4 == 0) p.lse[(static_cast<int64_t>(req) * p.num_heads_q + head) * p.seqlen_q + token] = lse;
    } else {
      const int64_t acc_row = (slot * p.num_heads_k + kv_head) * p.rows_per_head_k + row;
      float* acc = p.o_accum + acc_row * kHeadDimV + wg * 256;
      const uint64_t keep = evict_last_policy();
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int i = j * 4 + half * 2;
        st_global_f2_hint(acc + j * 8 + col_q, o[i] * inv, o[i + 1] * inv, keep);
      }
      if (wg == 0 && lane % 4 == 0) p.lse_accum[acc_row] = lse;
    }
  }
}

// Ends a piece: adds the two warpgroups' row sums (each thread holds partial sums of rows r_lo and
// r_lo + 8 over its columns) through `row_sum`, then stores the output. All kThreads threads call it.
// `start_next()` runs once the Q tile and both stages are free, before the output is stored, so the
// next piece's loads overlap the store.
template <typename Elem, typename StartNext>
__device__ __forceinline__ void finish_piece(const DecodeParams& p, const float* o, float (*row_sum)[kRowsPerTile],
                                             int req, int split, int kv_head, int row0, int r_lo, int wg, int lane,
                                             float l_lo, float l_hi, float m_lo, float m_hi, StartNext start_next) {
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffff, l_lo, d);
    l_hi += __shfl_xor_sync(0xffffffff, l_hi, d);
  }
  if (lane % 4 == 0) {
    row_sum[wg][r_lo] = l_lo;
    row_sum[wg][r_lo + 8] = l_hi;
  }
  __syncthreads();
  l_lo = row_sum[0][r_lo] + row_sum[1][r_lo];
  l_hi = row_sum[0][r_lo + 8] + row_sum[1][r_lo + 8];
  __syncthreads();  // row_sum, the Q tile and the stages may be overwritten by the next piece
  start_next();

  const int total_splits = p.num_splits[req + 1] - p.num_splits[req];
  const int64_t slot = accum_slot(p.num_splits, req, split);
  const bool final_out = total_splits == 1;
  if (!final_out && (slot < 0 || slot >= max_accum_slots(p.num_sm_parts))) return;  // stale plan
  store_piece<Elem>(p, o, req, kv_head, row0, r_lo, wg, lane, l_lo, l_hi, m_lo, m_hi, final_out, slot);
}

}  // namespace sm90
}  // namespace jax_flashmla
