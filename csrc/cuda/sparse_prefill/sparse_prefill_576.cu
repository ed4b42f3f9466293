// The sparse prefill kernel, without and with its producer warpgroup, at d_qk 576 (DeepSeek-V3.2: 512 latent + 64 RoPE channels).
#include "cuda/sparse_prefill/launch.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

template cudaError_t launch_sparse_prefill_kernel<576, false>(const SparsePrefillParams&, cudaStream_t);
template cudaError_t launch_sparse_prefill_kernel<576, true>(const SparsePrefillParams&, cudaStream_t);

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
