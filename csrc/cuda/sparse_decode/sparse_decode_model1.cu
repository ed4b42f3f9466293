// The sparse decode kernel over MODEL1 pools (d_qk 512, 584-byte tokens).
#include "cuda/sparse_decode/launch.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {

template cudaError_t launch_sparse_decode_kernel<KvFormat::kModel1>(const SparseDecodeParams&, cudaStream_t);

}  // namespace sparse_sm90
}  // namespace jax_flashmla
