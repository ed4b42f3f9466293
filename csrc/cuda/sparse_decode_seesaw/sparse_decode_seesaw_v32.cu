// The seesaw sparse decode kernel for the V3.2 format (d_qk 576), without and with its producer warpgroup.
#include "cuda/sparse_decode_seesaw/launch.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kV32, false>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kV32, true>(const SparseDecodeParams&, cudaStream_t);

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
