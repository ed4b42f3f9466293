// The decode kernel for bfloat16 q and k_cache.
#include "cuda/decode/launch.cuh"

namespace jax_flashmla {
namespace sm90 {

template cudaError_t launch_decode_kernel<__nv_bfloat16>(const DecodeParams&, const CUtensorMap&, cudaStream_t);

}  // namespace sm90
}  // namespace jax_flashmla
