// launch_sparse_prefill: the sparse prefill kernel of the call's d_qk, with a producer warpgroup where the
// build selects it (config.h).
#include "cuda/mla_kernels.h"
#include "cuda/sparse_prefill/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

// Instantiated in sparse_prefill_576.cu and sparse_prefill_512.cu (launch.cuh).
template <int kDqk, bool kProducer>
cudaError_t launch_sparse_prefill_kernel(const SparsePrefillParams& p, cudaStream_t stream);
extern template cudaError_t launch_sparse_prefill_kernel<576, false>(const SparsePrefillParams&, cudaStream_t);
extern template cudaError_t launch_sparse_prefill_kernel<576, true>(const SparsePrefillParams&, cudaStream_t);
extern template cudaError_t launch_sparse_prefill_kernel<512, false>(const SparsePrefillParams&, cudaStream_t);
extern template cudaError_t launch_sparse_prefill_kernel<512, true>(const SparsePrefillParams&, cudaStream_t);

}  // namespace prefill
}  // namespace sparse_sm90

cudaError_t launch_sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream) {
  namespace pf = sparse_sm90::prefill;
  constexpr bool kProducer = pf::kSelectedProducer;
  return p.head_dim == 576 ? pf::launch_sparse_prefill_kernel<576, kProducer>(p, stream)
                           : pf::launch_sparse_prefill_kernel<512, kProducer>(p, stream);
}

}  // namespace jax_flashmla
