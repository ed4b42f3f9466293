// Launch of the sparse decode kernel for one cache format: the grid (times num_splits) and the
// shared-memory attribute.
// sparse_decode_v32.cu and sparse_decode_model1.cu instantiate launch_sparse_decode_kernel;
// launch_sparse_decode (sparse_decode.cu) picks by format.
#pragma once

#include <cuda_runtime.h>

#include "cuda/sparse_decode/kernel.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {

template <KvFormat kFormat>
cudaError_t launch_sparse_decode_kernel(const SparseDecodeParams& p, cudaStream_t stream) {
  constexpr int kSmem = kPipeline ? staged_smem_bytes<kFormat>() : smem_bytes<Traits<kFormat>::kDqk>();
  // The attribute belongs to the current device; setting it again is cheap and keeps this stateless.
  if (cudaError_t err = cudaFuncSetAttribute(sparse_decode_kernel<kFormat>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      err != cudaSuccess) {
    return err;
  }
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_splits * ceil_div(p.num_heads_q, kRows);
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  sparse_decode_kernel<kFormat><<<static_cast<unsigned>(ctas), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sparse_sm90
}  // namespace jax_flashmla
