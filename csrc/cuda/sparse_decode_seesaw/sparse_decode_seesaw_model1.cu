// The seesaw sparse decode kernel for the MODEL1 format (d_qk 512), without and with its producer warpgroup.
#include "cuda/sparse_decode_seesaw/launch.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kModel1, false>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kModel1, true>(const SparseDecodeParams&, cudaStream_t);

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
