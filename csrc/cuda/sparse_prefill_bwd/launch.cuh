// Launch of the sparse prefill backward kernel for one d_qk: the grid and the shared-memory attribute.
// sparse_prefill_bwd_576.cu and sparse_prefill_bwd_512.cu instantiate launch_sparse_prefill_bwd_kernel;
// launch_sparse_prefill_bwd (sparse_prefill_bwd.cu) zeroes dkv and picks by d_qk.
#pragma once

#include <cuda_runtime.h>

#include "cuda/sparse_prefill_bwd/kernel.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

template <int kDqk>
cudaError_t launch_sparse_prefill_bwd_kernel(const SparsePrefillBwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = smem_bytes<kDqk>();
  if (cudaError_t err = cudaFuncSetAttribute(sparse_prefill_bwd_kernel<kDqk>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      err != cudaSuccess) {
    return err;
  }
  const int64_t ctas = p.fwd.seqlen_q * ceil_div(p.fwd.num_heads_q, kRowsB);
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  sparse_prefill_bwd_kernel<kDqk><<<static_cast<unsigned>(ctas), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace prefill_bwd
}  // namespace sparse_sm90
}  // namespace jax_flashmla
