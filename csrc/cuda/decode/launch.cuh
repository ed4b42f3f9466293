// Launch of the decode kernel for one element type: the grid, the shared-memory attribute and the
// choice between scoring part by part or per stage (kMaxTilesByPart). decode_bf16.cu and
// decode_fp16.cu instantiate launch_decode_kernel; launch_decode (decode.cu) picks by dtype.
#pragma once

#include <cuda_runtime.h>

#include "common/mla_contract.h"
#include "common/mla_params.h"
#include "cuda/decode/config.h"
#include "cuda/decode/schedule.cuh"

namespace jax_flashmla {
namespace sm90 {

// Raises `kKernel`'s dynamic shared-memory limit to `bytes`. The attribute belongs to the current
// device, so it is set once per device (a template argument per kernel keeps their flags apart).
template <auto kKernel>
inline cudaError_t allow_dynamic_smem(int bytes) {
  static bool configured[64] = {};
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const bool tracked = device >= 0 && device < 64;
  if (tracked && configured[device]) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && tracked) configured[device] = true;
  return err;
}

template <typename Elem, bool kByPart>
cudaError_t launch_instance(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  if (cudaError_t err = allow_dynamic_smem<decode_kernel<Elem, kByPart>>(kSmemBytes); err != cudaSuccess) return err;
  // Row tiles innermost: the CTAs that read the same pages (one per row tile) get adjacent ids.
  // 2.6-3.4% faster on the multi-tile cases than parts innermost (H200, docs/performance.md).
  // With kDependentLaunch, programmatic stream serialization: the grid may launch before the previous
  // kernel in the stream has completed (its CTAs take SMs as that kernel's CTAs leave, instead of after
  // the grid's end and a launch latency); the kernel waits for it (grid_dependency_wait) before
  // reading any input.
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(ceil_div(p.rows_per_head_k, kRowsPerTile), p.num_heads_k, p.num_sm_parts);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = kDependentLaunch ? 1 : 0;
  return cudaLaunchKernelEx(&config, decode_kernel<Elem, kByPart>, k_map, p);
}

// The decode kernel of element type Elem (without the combine).
template <typename Elem>
cudaError_t launch_decode_kernel(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  return ceil_div(p.rows_per_head_k, kRowsPerTile) <= kMaxTilesByPart
             ? launch_instance<Elem, true>(p, k_map, stream)
             : launch_instance<Elem, false>(p, k_map, stream);
}

}  // namespace sm90
}  // namespace jax_flashmla
