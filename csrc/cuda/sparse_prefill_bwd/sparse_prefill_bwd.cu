// launch_sparse_prefill_bwd: zeroes the float32 dkv accumulator, then the backward kernel of the call's
// d_qk.
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

// Instantiated in sparse_prefill_bwd_576.cu and sparse_prefill_bwd_512.cu (launch.cuh).
template <int kDqk>
cudaError_t launch_sparse_prefill_bwd_kernel(const SparsePrefillBwdParams& p, cudaStream_t stream);
extern template cudaError_t launch_sparse_prefill_bwd_kernel<576>(const SparsePrefillBwdParams&, cudaStream_t);
extern template cudaError_t launch_sparse_prefill_bwd_kernel<512>(const SparsePrefillBwdParams&, cudaStream_t);

}  // namespace prefill_bwd
}  // namespace sparse_sm90

cudaError_t launch_sparse_prefill_bwd(const SparsePrefillBwdParams& p, cudaStream_t stream) {
  const size_t dkv_bytes = static_cast<size_t>(p.fwd.seqlen_kv) * p.fwd.head_dim * sizeof(float);
  if (dkv_bytes > 0) {
    if (cudaError_t err = cudaMemsetAsync(p.dkv, 0, dkv_bytes, stream); err != cudaSuccess) return err;
  }
  return p.fwd.head_dim == 576 ? sparse_sm90::prefill_bwd::launch_sparse_prefill_bwd_kernel<576>(p, stream)
                               : sparse_sm90::prefill_bwd::launch_sparse_prefill_bwd_kernel<512>(p, stream);
}

}  // namespace jax_flashmla
