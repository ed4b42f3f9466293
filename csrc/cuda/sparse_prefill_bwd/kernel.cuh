// The sparse prefill backward kernel (config.h describes the work unit, the math and the warp roles).
#pragma once

#include <cuda_bf16.h>

#include <cmath>

#include "common/sparse_params.h"
#include "cuda/sparse_common/softmax.cuh"
#include "cuda/sparse_prefill_bwd/loads.cuh"
#include "cuda/sparse_prefill_bwd/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

// acc += A B^T for one warp: A (16, K) and B (16, K), both K-major in shared memory, 16 channels of K
// at a time (the forward's Q K^T loop).
template <class Tr, class TensorA, class TensorB, class Acc>
__device__ __forceinline__ void gemm_kmajor(const TensorA& sA, const TensorB& sB, int lane, Acc& acc) {
  typename Tr::WarpMma mma;
  Tensor rA = make_tensor<Elem>(partition_shape_A(mma, Shape<_16, _16>{}));
  Tensor rB = make_tensor<Elem>(partition_shape_B(mma, Shape<_16, _16>{}));
  auto copy_a = make_tiled_copy_A(typename Tr::CopyN{}, mma);
  auto copy_b = make_tiled_copy_B(typename Tr::CopyN{}, mma);
  auto thr_a = copy_a.get_slice(lane);
  auto thr_b = copy_b.get_slice(lane);
  Tensor sA_parts = thr_a.partition_S(sA);  // (CPY, 1, K / 16)
  Tensor sB_parts = thr_b.partition_S(sB);  // (CPY, 1, K / 16)
  Tensor rA_copy = thr_a.retile_D(rA);
  Tensor rB_copy = thr_b.retile_D(rB);
#pragma unroll 2  // fully unrolled, the hoisted ldmatrix addresses of 36 steps spill
  for (int ks = 0; ks < size<2>(sA_parts); ++ks) {
    copy(copy_a, sA_parts(_, _, ks), rA_copy(_, _, 0));
    copy(copy_b, sB_parts(_, _, ks), rB_copy(_, _, 0));
    gemm(mma, rA(_, _, 0), rB(_, _, 0), acc);
  }
}

// Grid: one CTA per (query token, head tile), head tiles innermost, so the tiles of one token run side
// by side and read the token's rows from L2.
template <int kDqk>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_prefill_bwd_kernel(const __grid_constant__ SparsePrefillBwdParams p) {
  using Tr = Traits<kDqk>;
  using Mma = typename Tr::WarpMma;
  extern __shared__ uint8_t smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<kDqk>*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 127) & ~static_cast<uintptr_t>(127));

  const int num_heads = p.fwd.num_heads_q;
  const int head_tiles = ceil_div(num_heads, kRowsB);
  const int head0 = (blockIdx.x % head_tiles) * kRowsB;
  const int64_t token = blockIdx.x / head_tiles;
  const int rows = min(kRowsB, num_heads - head0);
  const int64_t row0 = token * num_heads + head0;  // row of (token, head0) in q, d_out, lse, dq

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;

  auto smem_tensor = [](uint16_t* at, auto layout) {
    return make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(at)), layout);
  };
  Tensor sQ = smem_tensor(smem.q, typename Tr::SmemLayoutQ{});
  Tensor sDO = smem_tensor(smem.d_out, typename Tr::SmemLayoutDO{});
  Tensor sDS = smem_tensor(smem.ds, typename Tr::SmemLayoutDS{});
  Tensor sPS = smem_tensor(smem.ps, typename Tr::SmemLayoutDS{});
  Tensor sQt = smem_tensor(smem.q, typename Tr::SmemLayoutQt{});
  Tensor sDOt = smem_tensor(smem.d_out, typename Tr::SmemLayoutDOt{});
  Tensor sDSt = smem_tensor(smem.ds, typename Tr::SmemLayoutDSt{});
  Tensor sPSt = smem_tensor(smem.ps, typename Tr::SmemLayoutDSt{});

  if (tid < kRowsB) {
    const bool live = tid < rows;
    smem.lse_log2[tid] = live ? p.lse[row0 + tid] * 1.4426950408889634f : INFINITY;
    smem.sig[tid] = live ? p.sig[row0 + tid] : 0.f;
    smem.delta[tid] = live ? p.delta[row0 + tid] : 0.f;
  }

  Mma mma;
  auto thr_mma = mma.get_slice(lane);
  // dQ of this warp's 16 rows x kDqChannels channels (16-channel tiles cg, cg + 4, ...), fp32, over
  // the whole walk.
  Tensor acc_dq = partition_fragment_C(mma, Shape<_16, Int<Tr::kDqChannels>>{});
  clear(acc_dq);

  const float scale = p.fwd.softmax_scale;
  const float scale_log2 = scale * 1.4426950408889634f;
  const int n = entries_of(p.fwd, token);
  const int blocks = ceil_div(n, kBlockN);
  auto any_read = [&](int slot) { return (smem.valid[slot][0] | smem.valid[slot][1]) != 0u; };
  auto copy_block = [&](int b) {
    const int32_t* row = smem.row[b % kEntrySlots];
    Tensor sK = smem_tensor(smem.k[b % kStages], typename Tr::SmemLayoutK{});
    copy_rows_async<kBlockN, Tr::kChunksPerRow, Tr>(sK, p.fwd.kv, [&](int j) -> const uint16_t* {
      const int32_t id = row[j];
      return id < 0 ? nullptr : p.fwd.kv + static_cast<int64_t>(id) * kDqk;
    });
  };

  if (blocks > 0) {
    const uint16_t* q_row0 = p.fwd.q + row0 * kDqk;
    copy_rows_async<kRowsB, Tr::kChunksPerRow, Tr>(sQ, q_row0, [&](int r) -> const uint16_t* {
      return r < rows ? q_row0 + static_cast<int64_t>(r) * kDqk : nullptr;
    });
    const uint16_t* do_row0 = p.d_out + row0 * kHeadDimV;
    copy_rows_async<kRowsB, kHeadDimV / 8, Tr>(sDO, do_row0, [&](int r) -> const uint16_t* {
      return r < rows ? do_row0 + static_cast<int64_t>(r) * kHeadDimV : nullptr;
    });
    if (tid < kBlockN) resolve_block(p.fwd, token, n, 0, smem.row[0], smem.valid[0]);
    __syncthreads();  // block 0's entries (and the row factors) are visible
    if (any_read(0)) copy_block(0);
    cp_async_fence();
  }

  for (int b = 0; b < blocks; ++b) {
    const int slot = b % kEntrySlots;
    // Block b + 1's entries, into the slot block b - 2 used: every thread is past block b - 2.
    if (b + 1 < blocks && tid < kBlockN) {
      const int next = (b + 1) % kEntrySlots;
      resolve_block(p.fwd, token, n, (b + 1) * kBlockN, smem.row[next], smem.valid[next]);
    }
    cp_async_wait<0>();  // this thread's copies of Q, dO and block b have landed
    // Block b visible to all; block b + 1's entries visible; every warp is done with block b - 1 (its
    // token buffer, which block b + 1 now takes, and the dS and sig P tiles).
    __syncthreads();
    const uint64_t valid = smem.valid[slot][0] | (static_cast<uint64_t>(smem.valid[slot][1]) << 32);
    if (b + 1 < blocks && any_read((b + 1) % kEntrySlots)) copy_block(b + 1);
    cp_async_fence();
    if (valid == 0) continue;  // the same for the whole CTA: nothing read, nothing to add

    Tensor sK = smem_tensor(smem.k[b % kStages], typename Tr::SmemLayoutK{});
    Tensor sV = smem_tensor(smem.k[b % kStages], typename Tr::SmemLayoutV{});
    Tensor sKt = smem_tensor(smem.k[b % kStages], typename Tr::SmemLayoutKt{});

    // S and dP of rows 16 rg.., entries 16 eg..; then dS and sig P into shared memory. Entries not
    // read and rows past h_q get exact zeros, whatever their scores (a NaN row read by no live head,
    // a NaN d_out on a row with no entry).
    {
      const int rg = warp % 2, eg = warp / 2;
      Tensor acc_s = partition_fragment_C(mma, Shape<_16, _16>{});
      Tensor acc_dp = partition_fragment_C(mma, Shape<_16, _16>{});
      clear(acc_s);
      clear(acc_dp);
      gemm_kmajor<Tr>(local_tile(sQ, Shape<_16, Int<kDqk>>{}, make_coord(rg, 0)),
                      local_tile(sK, Shape<_16, Int<kDqk>>{}, make_coord(eg, 0)), lane, acc_s);
      gemm_kmajor<Tr>(local_tile(sDO, Shape<_16, Int<kHeadDimV>>{}, make_coord(rg, 0)),
                      local_tile(sV, Shape<_16, Int<kHeadDimV>>{}, make_coord(eg, 0)), lane, acc_dp);
      Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<_16, _16>{}));
#pragma unroll
      for (int e = 0; e < size(acc_s); ++e) {
        const int r = rg * 16 + get<0>(cS(e)), c = eg * 16 + get<1>(cS(e));
        float ds = 0.f, ps = 0.f;
        if (r < rows && ((valid >> c) & 1u)) {
          const float pe = exp2f(acc_s(e) * scale_log2 - smem.lse_log2[r]);
          ds = pe * (smem.sig[r] * acc_dp(e) - smem.delta[r]) * scale;
          ps = smem.sig[r] * pe;
        }
        sDS(r, c) = static_cast<Elem>(ds);
        sPS(r, c) = static_cast<Elem>(ps);
      }
    }
    __syncthreads();  // dS and sig P of the whole block are visible

    // dQ += dS K over this warp's rows and channels: 16-channel tiles cg, cg + 4, ... (a 144-channel
    // range would straddle the 64-channel swizzle atoms). K^T fragments one (16 channels x 16 entries)
    // copy at a time, as the forward's P V.
    {
      const int rg = warp % 2, cg = warp / 2;
      Tensor rA = make_tensor<Elem>(partition_shape_A(mma, Shape<_16, Int<kBlockN>>{}));  // (V, 1, 4)
      auto copy_a = make_tiled_copy_A(typename Tr::CopyN{}, mma);
      auto thr_a = copy_a.get_slice(lane);
      copy(copy_a, thr_a.partition_S(local_tile(sDS, Shape<_16, Int<kBlockN>>{}, make_coord(rg, 0))),
           thr_a.retile_D(rA));
      Tensor rB = make_tensor<Elem>(partition_shape_B(mma, Shape<_16, _16>{}));  // (V, 2, 1)
      auto copy_b = make_tiled_copy_B(typename Tr::CopyT{}, mma);
      auto thr_b = copy_b.get_slice(lane);
      Tensor rB_copy = thr_b.retile_D(rB);
#pragma unroll
      for (int i = 0; i < Tr::kDqChannels / 16; ++i) {
        Tensor sB_parts = thr_b.partition_S(local_tile(sKt, Shape<_16, Int<kBlockN>>{}, make_coord(cg + 4 * i, 0)));
#pragma unroll
        for (int kk = 0; kk < size<2>(rA); ++kk) {
          copy(copy_b, sB_parts(_, 0, kk), rB_copy(_, 0, 0));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            gemm(mma, acc_dq(_, 0, 2 * i + h), rA(_, 0, kk), rB(_, h, 0), acc_dq(_, 0, 2 * i + h));
          }
        }
      }
    }

    // dK of entries 16 eg.. over this warp's half of the channels, kDkChunk at a time: dS^T Q, plus
    // (sig P)^T dO on the first 512 channels, added into dkv at the entry's kv row (masked entries add
    // nothing). Pairs of adjacent channels go as one vector reduction.
    {
      const int eg = warp % 4, hv = warp / 4;
      auto copy_at = make_tiled_copy_A(typename Tr::CopyT{}, mma);
      auto thr_at = copy_at.get_slice(lane);
      Tensor rDSt = make_tensor<Elem>(partition_shape_A(mma, Shape<_16, Int<kRowsB>>{}));  // (V, 1, 2)
      Tensor rPSt = make_tensor<Elem>(partition_shape_A(mma, Shape<_16, Int<kRowsB>>{}));
      copy(copy_at, thr_at.partition_S(local_tile(sDSt, Shape<_16, Int<kRowsB>>{}, make_coord(eg, 0))),
           thr_at.retile_D(rDSt));
      copy(copy_at, thr_at.partition_S(local_tile(sPSt, Shape<_16, Int<kRowsB>>{}, make_coord(eg, 0))),
           thr_at.retile_D(rPSt));
      auto copy_bt = make_tiled_copy_B(typename Tr::CopyT{}, mma);
      auto thr_bt = copy_bt.get_slice(lane);
      Tensor rB = make_tensor<Elem>(partition_shape_B(mma, Shape<Int<kDkChunk>, Int<kRowsB>>{}));  // (V, 4, 2)
      Tensor rB_copy = thr_bt.retile_D(rB);
      Tensor cC = thr_mma.partition_C(make_identity_tensor(Shape<_16, Int<kDkChunk>>{}));
      const int32_t* row = smem.row[slot];
      // The kv rows of this thread's two entries (C rows r and r + 8), -1 when masked.
      const int32_t ids[2] = {row[eg * 16 + get<0>(cC(0))], row[eg * 16 + get<0>(cC(0)) + 8]};
#pragma unroll 1
      for (int j = 0; j < Tr::kDkChunks; ++j) {
        const int t = hv * Tr::kDkChunks + j;  // chunk of channels kDkChunk t ..
        Tensor acc = partition_fragment_C(mma, Shape<_16, Int<kDkChunk>>{});
        clear(acc);
        copy(copy_bt,
             thr_bt.partition_S(local_tile(sQt, Shape<Int<kDkChunk>, Int<kRowsB>>{}, make_coord(t, 0))), rB_copy);
#pragma unroll
        for (int ks = 0; ks < size<2>(rDSt); ++ks) gemm(mma, rDSt(_, _, ks), rB(_, _, ks), acc);
        if (t * kDkChunk < kHeadDimV) {
          copy(copy_bt,
               thr_bt.partition_S(local_tile(sDOt, Shape<Int<kDkChunk>, Int<kRowsB>>{}, make_coord(t, 0))),
               rB_copy);
#pragma unroll
          for (int ks = 0; ks < size<2>(rPSt); ++ks) gemm(mma, rPSt(_, _, ks), rB(_, _, ks), acc);
        }
#pragma unroll
        for (int e = 0; e < size(acc); e += 2) {
          const int32_t id = ids[row_slot(cC, e)];
          if (id >= 0) {
            red_add_f32x2(p.dkv + static_cast<int64_t>(id) * kDqk + t * kDkChunk + get<1>(cC(e)), acc(e), acc(e + 1));
          }
        }
      }
    }
  }

  // dq in bfloat16; C fragment values 2k and 2k + 1 are adjacent channels of one row.
  const int rg = warp % 2, cg = warp / 2;
  Tensor cQ = thr_mma.partition_C(make_identity_tensor(Shape<_16, Int<Tr::kDqChannels>>{}));
#pragma unroll
  for (int e = 0; e < size(acc_dq); e += 2) {
    const int r = rg * 16 + get<0>(cQ(e));
    if (r >= rows) continue;
    const int v = get<1>(cQ(e));  // channel v of the warp's tiles: tile v / 16 is cg + 4 (v / 16)
    const int c = 16 * (cg + 4 * (v / 16)) + v % 16;
    *reinterpret_cast<__nv_bfloat162*>(p.dq + (row0 + r) * kDqk + c) = __floats2bfloat162_rn(acc_dq(e), acc_dq(e + 1));
  }
}

}  // namespace prefill_bwd
}  // namespace sparse_sm90
}  // namespace jax_flashmla
