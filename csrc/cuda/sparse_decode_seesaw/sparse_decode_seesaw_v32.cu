// The seesaw sparse decode kernel for the V3.2 format (d_qk 576).
#include "cuda/sparse_decode_seesaw/launch.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kV32>(const SparseDecodeParams&, cudaStream_t);

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
