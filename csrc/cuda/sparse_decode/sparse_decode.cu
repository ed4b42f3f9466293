// launch_sparse_decode: the sparse decode kernel of the pools' format (the mma.sync kernel, or the
// seesaw kernel where the build selects it: sparse_decode_seesaw/config.h), then, when it split the
// entries, the combine (combine.cu). Both kernels write the same partials.
#include "cuda/mla_kernels.h"
#include "cuda/sparse_decode_seesaw/config.h"

namespace jax_flashmla {
namespace sparse_sm90 {

// Instantiated in sparse_decode_v32.cu and sparse_decode_model1.cu (launch.cuh).
template <KvFormat kFormat>
cudaError_t launch_sparse_decode_kernel(const SparseDecodeParams& p, cudaStream_t stream);
extern template cudaError_t launch_sparse_decode_kernel<KvFormat::kV32>(const SparseDecodeParams&, cudaStream_t);
extern template cudaError_t launch_sparse_decode_kernel<KvFormat::kModel1>(const SparseDecodeParams&, cudaStream_t);

namespace seesaw {
// Instantiated in sparse_decode_seesaw_v32.cu and sparse_decode_seesaw_model1.cu.
template <KvFormat kFormat, bool kProducer>
cudaError_t launch_sparse_decode_seesaw_kernel(const SparseDecodeParams& p, cudaStream_t stream);
extern template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kV32, false>(const SparseDecodeParams&,
                                                                                      cudaStream_t);
extern template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kV32, true>(const SparseDecodeParams&,
                                                                                     cudaStream_t);
extern template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kModel1, false>(const SparseDecodeParams&,
                                                                                        cudaStream_t);
extern template cudaError_t launch_sparse_decode_seesaw_kernel<KvFormat::kModel1, true>(const SparseDecodeParams&,
                                                                                       cudaStream_t);
}  // namespace seesaw

}  // namespace sparse_sm90

cudaError_t launch_sparse_decode(const SparseDecodeParams& p, cudaStream_t stream) {
  if (p.num_splits < 1 || (p.num_splits > 1 && (p.o_accum == nullptr || p.lse_accum == nullptr))) {
    return cudaErrorInvalidValue;
  }
  namespace ss = sparse_sm90;
  const bool v32 = p.pool.format == KvFormat::kV32;
  cudaError_t err;
  if constexpr (ss::seesaw::kSelected) {
    constexpr bool kProducer = ss::seesaw::kSelectedProducer;
    err = v32 ? ss::seesaw::launch_sparse_decode_seesaw_kernel<KvFormat::kV32, kProducer>(p, stream)
              : ss::seesaw::launch_sparse_decode_seesaw_kernel<KvFormat::kModel1, kProducer>(p, stream);
  } else {
    err = v32 ? ss::launch_sparse_decode_kernel<KvFormat::kV32>(p, stream)
              : ss::launch_sparse_decode_kernel<KvFormat::kModel1>(p, stream);
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return launch_sparse_combine(p, stream);
}

}  // namespace jax_flashmla
