// Layouts of the decode kernel: the 128-byte swizzle of its shared-memory tiles, the wgmma
// descriptors of P and V, the accumulator fragment a thread holds, named barrier ids, and the
// per-dtype element packing and wgmma ops.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/decode/config.h"
#include "cuda/ptx/sm90_ptx.cuh"
#include "cuda/ptx/wgmma_ops.cuh"

namespace jax_flashmla {
namespace sm90 {

// Named barriers of the pair hand-offs (schedule.cuh), and kBarWarpgroup + wg for one warpgroup.
constexpr int kBarMaxA = 1, kBarMaxB = 2, kBarWarpgroup = 3;

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a 128-byte-swizzled tile.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// A thread's place in the CTA. In a wgmma accumulator fragment it holds rows r_lo and r_lo + 8 of
// its warpgroup's 64 rows, and in every 8-column chunk the two columns col_q, col_q + 1.
struct ThreadCoord {
  int tid;    // 0..255
  int wg;     // warpgroup: 0 owns output channels 0..255, 1 owns 256..511
  int wtid;   // thread within the warpgroup
  int lane;   // lane within the warp
  int r_lo;   // first of the two accumulator rows
  int col_q;  // first of the two columns in each 8-column chunk
};

__device__ __forceinline__ ThreadCoord thread_coord() {
  ThreadCoord t;
  t.tid = threadIdx.x;
  t.wg = t.tid / 128;
  t.wtid = t.tid % 128;
  t.lane = t.tid % 32;
  t.r_lo = t.wtid / 32 * 16 + t.lane / 4;
  t.col_q = 2 * (t.lane % 4);
  return t;
}

// A value for each of a thread's two rows (r_lo, r_lo + 8).
struct RowPair {
  float lo, hi;
};

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

// The three wgmma the kernel issues, per element type: S = Q K^T (64x64, both from shared memory),
// and O += P V (64x256) with P from registers (rs) or from shared memory (ss).
template <typename Elem>
struct Ops;
template <>
struct Ops<__nv_bfloat16> {
  __device__ static void scores(float* d, uint64_t a, uint64_t b, int acc) { wgmma_m64n64k16_ss_Bf16<0>(d, a, b, acc); }
  __device__ static void values_rs(float* d, const uint32_t* a, uint64_t b) { wgmma_m64n256k16_rs_Bf16<1>(d, a, b, 1); }
  __device__ static void values_ss(float* d, uint64_t a, uint64_t b) { wgmma_m64n256k16_ss_Bf16<1>(d, a, b, 1); }
};
template <>
struct Ops<__half> {
  __device__ static void scores(float* d, uint64_t a, uint64_t b, int acc) { wgmma_m64n64k16_ss_F16<0>(d, a, b, acc); }
  __device__ static void values_rs(float* d, const uint32_t* a, uint64_t b) { wgmma_m64n256k16_rs_F16<1>(d, a, b, 1); }
  __device__ static void values_ss(float* d, uint64_t a, uint64_t b) { wgmma_m64n256k16_ss_F16<1>(d, a, b, 1); }
};

// V of `stage`, channels [256 wg, 256 wg + 256), token step kk: the MN-major B operand of PV.
__device__ __forceinline__ uint64_t v_desc(const uint8_t* stage, int wg, int kk) {
  return desc_advance(smem_desc_sw128(stage + (4 * wg) * kTileBytes, kTileBytes, 1024), kk * 16 * 128);
}

// P in a stage's RoPE tile, token step kk: the K-major A operand of PV.
__device__ __forceinline__ uint64_t p_desc(const uint8_t* stage, int kk) {
  return desc_advance(smem_desc_sw128(stage + kPTile * kTileBytes, 16, 1024), kk * 32);
}

// Stores a packed P fragment (make_p's order, softmax.cuh) into a page's P tile for the other
// warpgroup.
__device__ __forceinline__ void store_p(const uint32_t* packed, uint8_t* stage, int r_lo, int col_q) {
  uint8_t* tile = stage + kPTile * kTileBytes;
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int row = r_lo + (((i >> 1) & 1) ? 8 : 0);
    const int col = (i / 4) * 8 + col_q;
    *reinterpret_cast<uint32_t*>(tile + swizzled_offset(row, col / 8) + (col % 8) * 2) = packed[i / 2];
  }
}

}  // namespace sm90
}  // namespace jax_flashmla
