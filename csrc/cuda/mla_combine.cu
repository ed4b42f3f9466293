// The combine kernel: merges the fp32 partial outputs of a request that the decode kernel split
// over several parts, weighting each by its lse, and writes the request's out and lse.
#include "cuda/decode_common.cuh"
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace sm90 {

// One warp per (request, kv head, row): merges the request's split partials by their lse weights.
template <typename Elem>
__global__ void __launch_bounds__(128) combine_kernel(const __grid_constant__ DecodeParams p) {
  // Launched while the decode kernel still runs (programmatic dependent launch): its partials are
  // complete from here. Every CTA waits, also those with nothing to combine, so this grid never
  // completes before the decode grid (later work in the stream is ordered after this grid).
  grid_dependency_wait();
  const int req = blockIdx.x, kv_head = blockIdx.y;
  const int row = blockIdx.z * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = p.num_splits[req + 1] - p.num_splits[req];
  if (n <= 1 || row >= p.rows_per_head_k) return;
  const long long first = accum_slot(p.num_splits, req, 0);
  if (first < 0 || first + n > max_accum_slots(p.num_sm_parts)) return;  // stale metadata
  auto acc_row = [&](int s) { return ((first + s) * p.num_heads_k + kv_head) * p.rows_per_head_k + row; };

  float max_lse = -INFINITY;
  for (int s = 0; s < n; ++s) max_lse = fmaxf(max_lse, p.lse_accum[acc_row(s)]);
  float4 sum[4] = {};
  float total = 0.f;
  if (max_lse != -INFINITY) {
    for (int s = 0; s < n; ++s) {
      const float w = expf(p.lse_accum[acc_row(s)] - max_lse);
      if (w == 0.f) continue;  // an empty piece: its (zero) partial adds nothing
      total += w;
      const float4* src = reinterpret_cast<const float4*>(p.o_accum + acc_row(s) * kHeadDimV);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float4 v = src[c * 32 + lane];
        sum[c].x += w * v.x; sum[c].y += w * v.y; sum[c].z += w * v.z; sum[c].w += w * v.w;
      }
    }
  }
  const bool empty = total == 0.f;
  const float inv = empty ? 0.f : 1.f / total;
  const int token = row / p.q_heads_per_k;
  const int head = kv_head * p.q_heads_per_k + row % p.q_heads_per_k;
  Elem* out = static_cast<Elem*>(p.out) + ((static_cast<int64_t>(req) * p.seqlen_q + token) * p.num_heads_q + head) * kHeadDimV;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    uint2 packed;
    packed.x = pack2<Elem>(sum[c].x * inv, sum[c].y * inv);
    packed.y = pack2<Elem>(sum[c].z * inv, sum[c].w * inv);
    *reinterpret_cast<uint2*>(out + (c * 32 + lane) * 4) = packed;
  }
  if (lane == 0) {
    p.lse[(static_cast<int64_t>(req) * p.num_heads_q + head) * p.seqlen_q + token] =
        empty ? INFINITY : logf(total) + max_lse;
  }
}

}  // namespace sm90

cudaError_t launch_combine(const DecodeParams& p, cudaStream_t stream) {
  // Programmatic stream serialization: the combine grid is launched once every decode CTA has
  // signalled (allow_dependent_launch, at its start), so its CTAs take the SMs as decode CTAs
  // finish and wait there (grid_dependency_wait), instead of launching after the decode grid ends.
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(p.batch, p.num_heads_k, ceil_div(p.rows_per_head_k, 4));
  config.blockDim = dim3(128);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return p.dtype == ElementType::kBF16 ? cudaLaunchKernelEx(&config, sm90::combine_kernel<__nv_bfloat16>, p)
                                       : cudaLaunchKernelEx(&config, sm90::combine_kernel<__half>, p);
}

}  // namespace jax_flashmla
