// The sparse FP8 decode kernel (config.h describes the work unit and the warp roles).
#pragma once

#include "common/sparse_params.h"
#include "cuda/sparse_decode/epilogue.cuh"
#include "cuda/sparse_decode/loads.cuh"
#include "cuda/sparse_decode/softmax.cuh"
#include "cuda/sparse_decode/traits.h"

namespace jax_flashmla {
namespace sparse_sm90 {

// Grid: one CTA per (request, query token, head tile), head tiles innermost, then query tokens, so
// the CTAs that read the same request's tokens run side by side and share them through L2.
template <KvFormat kFormat>
__global__ void __launch_bounds__(kThreads, 1) sparse_decode_kernel(const __grid_constant__ SparseDecodeParams p) {
  using Tr = Traits<kFormat>;
  using TiledMma = typename Tr::TiledMma;
  extern __shared__ uint8_t smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<Tr::kDqk>*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 127) & ~static_cast<uintptr_t>(127));

  const int head_tiles = ceil_div(p.num_heads_q, kRows);
  const int head_tile = blockIdx.x % head_tiles;
  const int token = (blockIdx.x / head_tiles) % p.seqlen_q;
  const int req = blockIdx.x / head_tiles / p.seqlen_q;
  const int head0 = head_tile * kRows;
  const int rows = min(kRows, p.num_heads_q - head0);
  const int64_t qo_row0 = (static_cast<int64_t>(req) * p.seqlen_q + token) * p.num_heads_q + head0;

  const int tid = threadIdx.x;
  const int half = tid / 128;  // output channels 256 half ..
  const int ltid = tid % 128;  // thread within the four warps of a half
  // This warp's 16 rows hold at least one live head: only then does it run the math.
  const bool live = (ltid / 32) * 16 < rows;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem.q)), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem.k)), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem.k)), typename Tr::SmemLayoutVt{});

  load_q_tile<Tr>(sQ, p.q + qo_row0 * Tr::kDqk, rows);

  TiledMma mma;
  auto thr_mma = mma.get_slice(ltid);
  // S = Q K^T, one k-step (16 channels) of fragments at a time.
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<kRows>, Int<kBlockN>>{});  // (4, 1, 8)
  Tensor rQ = make_tensor<Elem>(partition_shape_A(mma, Shape<Int<kRows>, _16>{}));
  Tensor rK = make_tensor<Elem>(partition_shape_B(mma, Shape<Int<kBlockN>, _16>{}));
  auto copy_q = make_tiled_copy_A(typename Tr::CopyQK{}, mma);
  auto copy_k = make_tiled_copy_B(typename Tr::CopyQK{}, mma);
  auto thr_copy_q = copy_q.get_slice(ltid);
  auto thr_copy_k = copy_k.get_slice(ltid);
  Tensor sQ_parts = thr_copy_q.partition_S(sQ);  // (CPY, 1, kKSteps)
  Tensor sK_parts = thr_copy_k.partition_S(sK);  // (CPY, N, kKSteps)
  Tensor rQ_copy = thr_copy_q.retile_D(rQ);
  Tensor rK_copy = thr_copy_k.retile_D(rK);
  // O += P V over this half's 256 channels; V^T fragments one (16 channels x 16 tokens) copy at a time.
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kRows>, Int<kHalfV>>{});  // (4, 1, 32)
  Tensor rVt = make_tensor<Elem>(partition_shape_B(mma, Shape<Int<kHalfV>, _16>{}));
  auto copy_v = make_tiled_copy_B(typename Tr::CopyVt{}, mma);
  auto thr_copy_v = copy_v.get_slice(ltid);
  Tensor sVt_parts = thr_copy_v.partition_S(local_tile(sVt, Shape<Int<kHalfV>, Int<kBlockN>>{}, make_coord(half, 0)));
  Tensor rVt_copy = thr_copy_v.retile_D(rVt);
  // P as bfloat16 in the A layout of P V: the C fragment of two adjacent n8 tiles is the A fragment of
  // one k16 step, value for value, so the converted scores are reused with the A shape.
  Tensor rP = make_tensor<Elem>(partition_shape_A(mma, Shape<Int<kRows>, Int<kBlockN>>{}));  // ((2,2,2), 1, 4)
  static_assert(size(decltype(rP){}) == size(decltype(acc_s){}), "P has the scores' shape");
  // The (row, column) each accumulator value stands for.
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kBlockN>>{}));
  Tensor cO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kHalfV>>{}));
  clear(acc_o);

  RowState st{{-INFINITY, -INFINITY}, {0.f, 0.f}};
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const int n_main = entries_of(p.pool, req);
  const int n_extra = entries_of(p.extra, req);
  const int n_entries = n_main + n_extra;

  for (int e0 = 0; e0 < n_entries; e0 += kBlockN) {
    // 1. Resolve the block's entries (threads 0..63, one each).
    if (tid < kBlockN) {
      const uint8_t* record;
      const uint8_t* scales;
      resolve_entry<kFormat>(p, req, token, e0 + tid, n_main, n_extra, record, scales);
      smem.record[tid] = record;
      smem.scales[tid] = scales;
      const uint32_t bits = __ballot_sync(0xffffffffu, record != nullptr);
      if (tid % 32 == 0) smem.valid[tid / 32] = bits;
    }
    // The previous block's P V is done with sK, and the entries are visible.
    __syncthreads();
    // Read before the next barrier: past it, a warp that skips the math may overwrite the entries.
    const uint64_t valid = smem.valid[0] | (static_cast<uint64_t>(smem.valid[1]) << 32);
    // 2. Dequantise the named tokens (masked ones as zero rows).
    dequant_block<Tr>(sK, smem.record, smem.scales);
    __syncthreads();
    if (!live || valid == 0) continue;

    // 3. S = Q K^T.
    clear(acc_s);
#pragma unroll
    for (int ks = 0; ks < Tr::kKSteps; ++ks) {
      copy(copy_q, sQ_parts(_, _, ks), rQ_copy(_, _, 0));
      copy(copy_k, sK_parts(_, _, ks), rK_copy(_, _, 0));
      gemm(mma, rQ(_, _, 0), rK(_, _, 0), acc_s);
    }
    // 4. Online softmax; P = 2^(s - m) replaces the scores.
    online_softmax(acc_s, acc_o, cS, cO, valid, scale_log2, st);
#pragma unroll
    for (int e = 0; e < size(acc_s); ++e) rP(e) = static_cast<Elem>(acc_s(e));
    // 5. O += P V, one 16-channel pair of n8 tiles at a time.
#pragma unroll
    for (int kk = 0; kk < size<2>(rP); ++kk) {
#pragma unroll
      for (int nb = 0; nb < size<1>(rVt_copy); ++nb) {
        copy(copy_v, sVt_parts(_, nb, kk), rVt_copy(_, nb, 0));
#pragma unroll
        for (int n = 2 * nb; n < 2 * nb + 2; ++n) {
          gemm(mma, acc_o(_, 0, n), rP(_, 0, kk), rVt(_, n, 0), acc_o(_, 0, n));
        }
      }
    }
  }

  if (!live) return;
  const float* sink = p.attn_sink;
  store_tile(acc_o, cO, st, sink, head0, rows, half * kHalfV, p.seqlen_q, p.out + qo_row0 * kHeadDimV,
             p.lse + (static_cast<int64_t>(req) * p.num_heads_q + head0) * p.seqlen_q + token, half == 0);
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
