// Launch of the sparse prefill kernel for one d_qk, with or without its producer warpgroup: the grid,
// the block size and the shared-memory attribute. sparse_prefill_576.cu and sparse_prefill_512.cu
// instantiate launch_sparse_prefill_kernel; launch_sparse_prefill (sparse_prefill.cu) picks by d_qk and
// by the build (config.h).
#pragma once

#include <cuda_runtime.h>

#include "cuda/sparse_prefill/kernel.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

template <int kDqk, bool kProducer>
cudaError_t launch_sparse_prefill_kernel(const SparsePrefillParams& p, cudaStream_t stream) {
  constexpr int kSmem = kProducer ? producer_smem_bytes<kDqk>() : smem_bytes<kDqk>();
  // The attribute belongs to the current device; setting it again is cheap and keeps this stateless.
  if (cudaError_t err = cudaFuncSetAttribute(sparse_prefill_kernel<kDqk, kProducer>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      err != cudaSuccess) {
    return err;
  }
  if constexpr (kProducer) {
    constexpr auto kKernel = sparse_prefill_kernel<kDqk, kProducer>;
    if (cudaError_t err = check_launch_regs<kKernel>(); err != cudaSuccess) return err;
  }
  const int64_t ctas = p.seqlen_q * ceil_div(p.num_heads_q, kRows);
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  sparse_prefill_kernel<kDqk, kProducer><<<static_cast<unsigned>(ctas), cta_threads<kProducer>(), kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
