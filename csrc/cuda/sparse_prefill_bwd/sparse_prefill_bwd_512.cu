// The sparse prefill backward kernel at d_qk 512 (V4).
#include "cuda/sparse_prefill_bwd/launch.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill_bwd {

template cudaError_t launch_sparse_prefill_bwd_kernel<512>(const SparsePrefillBwdParams&, cudaStream_t);

}  // namespace prefill_bwd
}  // namespace sparse_sm90
}  // namespace jax_flashmla
