// launch_indexer_logits: the instance of the call's next_n (two query tokens a CTA when next_n is
// even, else one), the pages a CTA walks, the grid and the shared-memory attribute.
#include "cuda/indexer_logits/kernel.cuh"
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace indexer_sm90 {
namespace {

// Enough CTAs for eight per SM (latency is hidden by the CTAs beside each other as well as by the
// copy of the next page), few enough that a CTA's start and its query tiles' load stay small next to
// its pages: 2 to 32 page columns a CTA.
int pages_per_cta(int64_t token_groups, int64_t page_columns, int sm_count) {
  const int64_t target_ctas = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * 8;
  const int64_t per = (token_groups * page_columns + target_ctas - 1) / target_ctas;
  return static_cast<int>(per < 2 ? 2 : per > 32 ? 32 : per);
}

template <int kTokens>
cudaError_t launch(IndexerLogitsParams p, int sm_count, cudaStream_t stream) {
  const int64_t page_columns = (p.logits_width + kPage - 1) / kPage;
  const int64_t token_groups = static_cast<int64_t>(p.batch) * (p.next_n / kTokens);
  p.pages_per_cta = pages_per_cta(token_groups, page_columns, sm_count);
  const int64_t runs = (page_columns + p.pages_per_cta - 1) / p.pages_per_cta;
  const int64_t ctas = token_groups * runs;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  constexpr int kSmem = smem_bytes<kTokens>();
  if (cudaError_t err = cudaFuncSetAttribute(indexer_logits_kernel<kTokens>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      err != cudaSuccess) {
    return err;
  }
  indexer_logits_kernel<kTokens><<<static_cast<unsigned>(ctas), kTokens * kWarpgroupThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace indexer_sm90

cudaError_t launch_indexer_logits(const IndexerLogitsParams& p, int sm_count, cudaStream_t stream) {
  if (p.batch == 0 || p.next_n == 0 || p.logits_width == 0) return cudaSuccess;
  if (p.num_heads < 1 || p.num_heads > indexer_sm90::kHeads || p.num_pages < 1) return cudaErrorInvalidValue;
  return p.next_n % 2 == 0 ? indexer_sm90::launch<2>(p, sm_count, stream)
                           : indexer_sm90::launch<1>(p, sm_count, stream);
}

}  // namespace jax_flashmla
