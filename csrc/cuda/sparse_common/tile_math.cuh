// The math of one token block of a sparse tile (tile.h): S = Q K^T, the online softmax and O += P V,
// and the tile's epilogue. The kernel brings its own loads (the FP8 decode dequantises its tokens);
// from shared memory on, it runs this.
#pragma once

#include "cuda/sparse_common/epilogue.cuh"
#include "cuda/sparse_common/softmax.cuh"
#include "cuda/sparse_common/tile.h"

namespace jax_flashmla {
namespace sparse_sm90 {

// What a thread carries from block to block: its fp32 part of O (16 rows x 256 channels a warp) and
// the running max and sum of its two rows.
template <class Tr>
struct TileAccumulator {
  using AccO = decltype(partition_fragment_C(typename Tr::TiledMma{}, Shape<Int<kRows>, Int<kHalfV>>{}));
  AccO o;
  RowState st;

  __device__ __forceinline__ void init() {
    clear(o);
    st = RowState{{-INFINITY, -INFINITY}, {0.f, 0.f}};
  }
};

// The (row, channel) of the tile that each of this thread's O values stands for. `ltid` is the
// thread's index within the four warps of its half of the channels.
template <class Tr>
__device__ __forceinline__ auto output_coords(int ltid) {
  typename Tr::TiledMma mma;
  return mma.get_slice(ltid).partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kHalfV>>{}));
}

// One block of kBlockN tokens in `sK` (swizzled, SmemLayoutK) against the Q tile in `sQ`: the
// scores of this warp's 16 rows, the softmax over the block's read tokens (bit j of `valid`: token j
// is read; the others score -inf whatever their row holds), and P V into this half's channels.
// The rows of a token that is not read must hold finite values (the loads zero them): P is 0 there.
template <class Tr, class TensorQ, class TensorK>
__device__ __forceinline__ void attend_block(const TensorQ& sQ, const TensorK& sK, int ltid, int half, uint64_t valid,
                                             float scale_log2, TileAccumulator<Tr>& acc) {
  using TiledMma = typename Tr::TiledMma;
  TiledMma mma;
  auto thr_mma = mma.get_slice(ltid);
  Tensor sVt = make_tensor(sK.data(), typename Tr::SmemLayoutVt{});

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
  clear(acc_s);
#pragma unroll
  for (int ks = 0; ks < Tr::kKSteps; ++ks) {
    copy(copy_q, sQ_parts(_, _, ks), rQ_copy(_, _, 0));
    copy(copy_k, sK_parts(_, _, ks), rK_copy(_, _, 0));
    gemm(mma, rQ(_, _, 0), rK(_, _, 0), acc_s);
  }

  // Online softmax; P = 2^(s - m) replaces the scores.
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kBlockN>>{}));
  online_softmax(acc_s, acc.o, cS, output_coords<Tr>(ltid), valid, scale_log2, acc.st);
  // P as bfloat16 in the A layout of P V: the C fragment of two adjacent n8 tiles is the A fragment of
  // one k16 step, value for value, so the converted scores are reused with the A shape.
  Tensor rP = make_tensor<Elem>(partition_shape_A(mma, Shape<Int<kRows>, Int<kBlockN>>{}));  // ((2,2,2), 1, 4)
  static_assert(size(decltype(rP){}) == size(decltype(acc_s){}), "P has the scores' shape");
#pragma unroll
  for (int e = 0; e < size(acc_s); ++e) rP(e) = static_cast<Elem>(acc_s(e));

  // O += P V over this half's 256 channels; V^T fragments one (16 channels x 16 tokens) copy at a time.
  Tensor rVt = make_tensor<Elem>(partition_shape_B(mma, Shape<Int<kHalfV>, _16>{}));
  auto copy_v = make_tiled_copy_B(typename Tr::CopyVt{}, mma);
  auto thr_copy_v = copy_v.get_slice(ltid);
  Tensor sVt_parts =
      thr_copy_v.partition_S(local_tile(sVt, Shape<Int<kHalfV>, Int<kBlockN>>{}, make_coord(half, 0)));
  Tensor rVt_copy = thr_copy_v.retile_D(rVt);
#pragma unroll
  for (int kk = 0; kk < size<2>(rP); ++kk) {
#pragma unroll
    for (int nb = 0; nb < size<1>(rVt_copy); ++nb) {
      copy(copy_v, sVt_parts(_, nb, kk), rVt_copy(_, nb, 0));
#pragma unroll
      for (int n = 2 * nb; n < 2 * nb + 2; ++n) {
        gemm(mma, acc.o(_, 0, n), rP(_, 0, kk), rVt(_, n, 0), acc.o(_, 0, n));
      }
    }
  }
}

// The tile's epilogue (epilogue.cuh) at the thread's own coordinates.
template <class Tr>
__device__ __forceinline__ void finish_tile(TileAccumulator<Tr>& acc, int ltid, const TileOutput& to) {
  store_tile(acc.o, output_coords<Tr>(ltid), acc.st, to);
}

// One split's partial epilogue (epilogue.cuh) at the thread's own coordinates.
template <class Tr>
__device__ __forceinline__ void finish_partial(TileAccumulator<Tr>& acc, int ltid, const PartialOutput& po) {
  store_partial(acc.o, output_coords<Tr>(ltid), acc.st, po);
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
