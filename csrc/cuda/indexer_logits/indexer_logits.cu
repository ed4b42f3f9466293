// launch_indexer_logits: the grid of indexer_logits_kernel (kernel.cuh) and its shared-memory attribute.
#include "cuda/indexer_logits/kernel.cuh"
#include "cuda/mla_kernels.h"

namespace jax_flashmla {

// Enough CTAs for eight per SM (latency is hidden by the CTAs beside each other as well as by the
// copy of the next page), few enough that a CTA's start and its query tile's load stay small next to
// its pages: 2 to 32 page columns a CTA.
int choose_indexer_pages_per_cta(int64_t rows, int64_t page_columns, int sm_count) {
  const int64_t target_ctas = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * 8;
  const int64_t per = (rows * page_columns + target_ctas - 1) / target_ctas;
  return static_cast<int>(per < 2 ? 2 : per > 32 ? 32 : per);
}

cudaError_t launch_indexer_logits(const IndexerLogitsParams& p, cudaStream_t stream) {
  using namespace indexer_sm90;
  if (p.batch == 0 || p.next_n == 0 || p.logits_width == 0) return cudaSuccess;
  if (p.num_heads < 1 || p.num_heads > kHeads || p.num_pages < 1 || p.pages_per_cta < 1) {
    return cudaErrorInvalidValue;
  }
  const int64_t page_columns = (p.logits_width + kPage - 1) / kPage;
  const int64_t runs = (page_columns + p.pages_per_cta - 1) / p.pages_per_cta;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.next_n * runs;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (cudaError_t err =
          cudaFuncSetAttribute(indexer_logits_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
      err != cudaSuccess) {
    return err;
  }
  indexer_logits_kernel<<<static_cast<unsigned>(ctas), kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
