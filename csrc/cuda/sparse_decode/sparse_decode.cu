// launch_sparse_decode: the sparse decode kernel of the pools' format, then, when it split the
// entries, the combine (combine.cu).
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace sparse_sm90 {

// Instantiated in sparse_decode_v32.cu and sparse_decode_model1.cu (launch.cuh).
template <KvFormat kFormat>
cudaError_t launch_sparse_decode_kernel(const SparseDecodeParams& p, cudaStream_t stream);
extern template cudaError_t launch_sparse_decode_kernel<KvFormat::kV32>(const SparseDecodeParams&, cudaStream_t);
extern template cudaError_t launch_sparse_decode_kernel<KvFormat::kModel1>(const SparseDecodeParams&, cudaStream_t);

}  // namespace sparse_sm90

cudaError_t launch_sparse_decode(const SparseDecodeParams& p, cudaStream_t stream) {
  if (p.num_splits < 1 || (p.num_splits > 1 && (p.o_accum == nullptr || p.lse_accum == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const cudaError_t err = p.pool.format == KvFormat::kV32
                              ? sparse_sm90::launch_sparse_decode_kernel<KvFormat::kV32>(p, stream)
                              : sparse_sm90::launch_sparse_decode_kernel<KvFormat::kModel1>(p, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return launch_sparse_combine(p, stream);
}

}  // namespace jax_flashmla
