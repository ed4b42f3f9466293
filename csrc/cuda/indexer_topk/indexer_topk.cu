// launch_indexer_topk: one CTA per row (kernel.cuh).
#include "cuda/indexer_topk/kernel.cuh"
#include "cuda/mla_kernels.h"

namespace jax_flashmla {

cudaError_t launch_indexer_topk(const IndexerTopkParams& p, cudaStream_t stream) {
  using namespace indexer_topk_sm90;
  if (p.rows == 0) return cudaSuccess;
  if (p.topk < 1 || p.topk > kMaxTopk || p.width > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  indexer_topk_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
