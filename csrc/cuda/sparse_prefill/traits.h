// Layouts and tensor-core operations of the sparse prefill kernel. Its tiles are the decode kernel's
// (decode/traits.h): 64 rows x 64 bf16 channels, 128-byte rows whose 16-byte chunks are XOR-swizzled
// by the row, which is what wgmma's 128-byte-swizzle descriptors read. The three products are CuTe's
// SM90 GMMA atoms: S = Q K^T (64 x 64, both K-major in shared memory) and O += P V (64 x 256 of this
// warpgroup's channels; V MN-major in shared memory, P from registers or from shared memory).
#pragma once

#include <cute/arch/mma_sm90_gmma.hpp>

#include <cstdint>
#include <utility>

#include "cuda/decode/traits.h"
#include "cuda/ptx/sm90_ptx.cuh"
#include "cuda/sparse_prefill/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

using sm90::desc_advance;
using sm90::smem_desc_sw128;
namespace gmma = cute::SM90::GMMA;

using ScoresAtom = gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
using ValuesSSAtom = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>;
using ValuesRSAtom = gmma::MMA_64x256x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>;

// The atoms take their accumulators one by one; these spread an array over them (every index a
// constant, so the array stays in registers).
template <class Atom, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t a, uint64_t b, float* d, gmma::ScaleOut scale,
                                        std::index_sequence<I...>) {
  Atom::fma(a, b, d[I]..., scale);
}
template <class Atom, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t* a, uint64_t b, float* d, std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], b, d[I]..., gmma::ScaleOut::One);
}

// S (+)= Q[:, 16 k-step] K[:, 16 k-step]^T.
__device__ __forceinline__ void scores_step(float* s, uint64_t q, uint64_t k, bool accumulate) {
  gmma_ss<ScoresAtom>(q, k, s, accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero,
                      std::make_index_sequence<32>{});
}
// O += P[:, 16 tokens] V[16 tokens, 256 channels], P from shared memory.
__device__ __forceinline__ void values_step_ss(float* o, uint64_t p, uint64_t v) {
  gmma_ss<ValuesSSAtom>(p, v, o, gmma::ScaleOut::One, std::make_index_sequence<128>{});
}
// The same with P from registers (four packed bf16 pairs: wgmma's A fragment of one k-step).
__device__ __forceinline__ void values_step_rs(float* o, const uint32_t* p, uint64_t v) {
  gmma_rs<ValuesRSAtom>(p, v, o, std::make_index_sequence<128>{});
}

// Descriptors. Q and K are K-major (8-row groups 1024 bytes apart); a k-step of 16 channels is 32
// bytes along the row, tile t starts t * kTileBytes in. V: channels [256 wg, 256 wg + 256) of a
// block are its tiles 4 wg .. 4 wg + 3, MN-major (64-channel groups one tile apart), 16 tokens a
// k-step. P: a 64 x 64 K-major tile.
__device__ __forceinline__ uint64_t kmajor_desc(const uint8_t* tiles) { return smem_desc_sw128(tiles, 16, 1024); }
__device__ __forceinline__ uint64_t v_desc(const uint8_t* block, int wg, int kk) {
  return desc_advance(smem_desc_sw128(block + 4 * wg * kTileBytes, kTileBytes, 1024), kk * 16 * 128);
}
__device__ __forceinline__ uint64_t p_desc(const uint8_t* p_tile, int kk) {
  return desc_advance(kmajor_desc(p_tile), kk * 32);
}

// Stores a packed P fragment (decode/softmax.cuh make_p's order) into a P tile for the other
// warpgroup.
__device__ __forceinline__ void store_p(const uint32_t* packed, uint8_t* p_tile, int r_lo, int col_q) {
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int row = r_lo + (((i >> 1) & 1) ? 8 : 0);
    const int col = (i / 4) * 8 + col_q;
    *reinterpret_cast<uint32_t*>(p_tile + sm90::swizzled_offset(row, col / 8) + (col % 8) * 2) = packed[i / 2];
  }
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
