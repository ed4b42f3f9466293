// launch_decode: the decode kernel of the call's element type, then the combine of split requests.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace sm90 {

// Instantiated in decode_bf16.cu and decode_fp16.cu (launch.cuh).
template <typename Elem>
cudaError_t launch_decode_kernel(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream);
extern template cudaError_t launch_decode_kernel<__nv_bfloat16>(const DecodeParams&, const CUtensorMap&, cudaStream_t);
extern template cudaError_t launch_decode_kernel<__half>(const DecodeParams&, const CUtensorMap&, cudaStream_t);

}  // namespace sm90

cudaError_t launch_decode(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  const cudaError_t err = p.dtype == ElementType::kBF16 ? sm90::launch_decode_kernel<__nv_bfloat16>(p, k_map, stream)
                                                        : sm90::launch_decode_kernel<__half>(p, k_map, stream);
  if (err != cudaSuccess) return err;
  return launch_combine(p, stream);
}

}  // namespace jax_flashmla
