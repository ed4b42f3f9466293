// Launch of the seesaw sparse decode kernel for one cache format, with or without its producer
// warpgroup: the grid (times num_splits), the block size and the shared-memory attribute. sparse_decode_seesaw_v32.cu and sparse_decode_seesaw_model1.cu instantiate
// launch_sparse_decode_seesaw_kernel; launch_sparse_decode (sparse_decode/sparse_decode.cu) calls it
// when the build selects this kernel (config.h).
#pragma once

#include <cuda_runtime.h>

#include "cuda/sparse_decode_seesaw/kernel.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

template <KvFormat kFormat, bool kProducer>
cudaError_t launch_sparse_decode_seesaw_kernel(const SparseDecodeParams& p, cudaStream_t stream) {
  constexpr int kSmem = smem_bytes<kFormat>();
  // The attribute belongs to the current device; setting it again is cheap and keeps this stateless.
  if (cudaError_t err = cudaFuncSetAttribute(sparse_decode_seesaw_kernel<kFormat, kProducer>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      err != cudaSuccess) {
    return err;
  }
  if constexpr (kProducer) {
    constexpr auto kKernel = sparse_decode_seesaw_kernel<kFormat, kProducer>;
    if (cudaError_t err = prefill::check_launch_regs<kKernel>(); err != cudaSuccess) return err;
  }
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_splits * ceil_div(p.num_heads_q, kRows);
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  sparse_decode_seesaw_kernel<kFormat, kProducer>
      <<<static_cast<unsigned>(ctas), threads<kProducer>(), kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
