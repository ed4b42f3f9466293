// launch_sparse_prefill: the sparse prefill kernel of the call's d_qk.
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

// Instantiated in sparse_prefill_576.cu and sparse_prefill_512.cu (launch.cuh).
template <int kDqk>
cudaError_t launch_sparse_prefill_kernel(const SparsePrefillParams& p, cudaStream_t stream);
extern template cudaError_t launch_sparse_prefill_kernel<576>(const SparsePrefillParams&, cudaStream_t);
extern template cudaError_t launch_sparse_prefill_kernel<512>(const SparsePrefillParams&, cudaStream_t);

}  // namespace prefill
}  // namespace sparse_sm90

cudaError_t launch_sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream) {
  return p.head_dim == 576 ? sparse_sm90::prefill::launch_sparse_prefill_kernel<576>(p, stream)
                           : sparse_sm90::prefill::launch_sparse_prefill_kernel<512>(p, stream);
}

}  // namespace jax_flashmla
