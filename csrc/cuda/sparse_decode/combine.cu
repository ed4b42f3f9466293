// The sparse decode's combine: when the kernel split each query token's entries (num_splits > 1),
// merges the splits' fp32 partial outputs of every (request, token, head) row, weighting each by its
// lse, applies attn_sink once to the merged row, and writes out and lse. The dense decode's combine
// (combine/) walks the tile scheduler's plan; this one has a fixed number of splits per row.
#include <cuda_bf16.h>

#include <cmath>

#include "common/mla_contract.h"
#include "cuda/mla_kernels.h"
#include "cuda/ptx/sm90_ptx.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {

constexpr int kCombineWarps = 4;  // rows per CTA, one warp each
constexpr int kCombineSplitsPerLoad = 2;  // partials whose loads are in flight together

// One warp per row: lane i holds channels 4 (32 c + i) .. 4 (32 c + i) + 3 for c = 0..3. A split
// with lse -inf read nothing and weighs 0; NaN in any split's lse makes the row NaN (fmaxf skips
// it, so it is told apart); a row that no split read gets out 0 and lse +inf, whatever the sink.
__global__ void __launch_bounds__(kCombineWarps * 32) sparse_combine_kernel(const __grid_constant__ SparseDecodeParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n = p.num_splits;
  // Launched while the decode kernel still runs (programmatic dependent launch): its partials are
  // complete from here.
  sm90::grid_dependency_wait();
  if (row >= rows) return;

  // The row's largest split lse, and whether any is NaN: lanes read splits lane, lane + 32, ...
  float max_lse = -INFINITY;
  bool nan = false;
  for (int s = lane; s < n; s += 32) {
    const float v = p.lse_accum[s * rows + row];
    max_lse = fmaxf(max_lse, v);
    nan |= isnan(v);
  }
#pragma unroll
  for (int d = 16; d >= 1; d >>= 1) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, d));
  nan = __any_sync(0xffffffffu, nan);

  float total = 0.f;
  float4 sum[4] = {};
  if (max_lse != -INFINITY && !nan) {
    for (int s0 = 0; s0 < n; s0 += kCombineSplitsPerLoad) {
      float w[kCombineSplitsPerLoad];
      float4 v[kCombineSplitsPerLoad][4];
#pragma unroll
      for (int i = 0; i < kCombineSplitsPerLoad; ++i) {
        const int64_t at = (s0 + i) * rows + row;
        w[i] = s0 + i < n ? expf(p.lse_accum[at] - max_lse) : 0.f;  // 0 for an empty split
        const float4* src = reinterpret_cast<const float4*>(p.o_accum + at * kHeadDimV);
#pragma unroll
        for (int c = 0; c < 4; ++c) v[i][c] = w[i] != 0.f ? src[c * 32 + lane] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int i = 0; i < kCombineSplitsPerLoad; ++i) {
        total += w[i];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          sum[c].x += w[i] * v[i][c].x; sum[c].y += w[i] * v[i][c].y;
          sum[c].z += w[i] * v[i][c].z; sum[c].w += w[i] * v[i][c].w;
        }
      }
    }
  }
  // total >= 1 when some split read an entry (the largest weighs 1), 0 when none did; NaN only when
  // a split's lse overflowed to +inf.
  float lse = INFINITY, inv = 0.f;
  if (nan || isnan(total)) {
    lse = inv = NAN;
  } else if (total > 0.f) {
    lse = logf(total) + max_lse;
    inv = 1.f / total;
    const int head = static_cast<int>(row % p.num_heads_q);
    // exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)); sink +inf gives 0, -inf 1.
    if (p.attn_sink != nullptr) inv *= 1.f / (1.f + expf(p.attn_sink[head] - lse));
  }
  __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(sum[c].x * inv, sum[c].y * inv);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(sum[c].z * inv, sum[c].w * inv);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&lo);
    packed.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out + (c * 32 + lane) * 4) = packed;
  }
  if (lane == 0) {
    // out rows are (request, token, head); lse is [b, h_q, s_q].
    const int64_t head = row % p.num_heads_q, token_row = row / p.num_heads_q;
    const int64_t req = token_row / p.seqlen_q, token = token_row % p.seqlen_q;
    p.lse[(req * p.num_heads_q + head) * p.seqlen_q + token] = lse;
  }
}

}  // namespace sparse_sm90

cudaError_t launch_sparse_combine(const SparseDecodeParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads_q;
  if (rows == 0) return cudaSuccess;
  const int64_t ctas = (rows + sparse_sm90::kCombineWarps - 1) / sparse_sm90::kCombineWarps;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  // Programmatic stream serialization, as the dense combine: the grid launches once every decode CTA
  // has signalled (at its start) and waits in grid_dependency_wait for the decode grid to complete.
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(ctas));
  config.blockDim = dim3(sparse_sm90::kCombineWarps * 32);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, sparse_sm90::sparse_combine_kernel, p);
}

}  // namespace jax_flashmla
