// The combine kernel: merges the fp32 partial outputs of a request that the decode kernel split
// over several parts, weighting each by its lse, and writes the request's out and lse.
#include <cmath>

#include "common/mla_contract.h"
#include "common/mla_params.h"
#include "cuda/decode/traits.h"
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace sm90 {

constexpr int kCombineWarps = 4;  // rows per CTA, one warp each
// CTAs per SM the register budget must allow (64 registers): the heavy cases have about 2000 CTAs,
// so this is two waves on 132 SMs instead of four.
constexpr int kCombineMinCtasPerSm = 8;
constexpr int kSplitsPerLoad = 2;  // partials whose loads are in flight together (most requests have 2)

// One CTA per (part, kv head, kCombineWarps rows). A split request is combined by the part that
// holds its last piece: that piece begins the part (begin_split = pieces - 1 > 0), so exactly one
// part per split request does it, and the grid is as large as the part count, not the batch.
template <typename Elem>
__global__ void __launch_bounds__(kCombineWarps * 32, kCombineMinCtasPerSm) combine_kernel(const __grid_constant__ DecodeParams p) {
  const int part = blockIdx.x, kv_head = blockIdx.y;
  const int row = blockIdx.z * kCombineWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  // The plan was written by the metadata kernel, which completed before the decode kernel began, so
  // it is read before the wait below: after it, only the partials are a memory round trip away.
  const int32_t* md = p.tile_md + static_cast<int64_t>(part) * kTileMetadataSize;
  const int req = md[kMdBeginReq], last_split = md[kMdBeginSplit];
  const bool valid_req = req >= 0 && req < p.batch && req <= md[kMdEndReq];
  const int n = valid_req ? p.num_splits[req + 1] - p.num_splits[req] : 0;
  // Launched while the decode kernel still runs (programmatic dependent launch): its partials are
  // complete from here. Every CTA waits, also those with nothing to combine, so this grid never
  // completes before the decode grid (later work in the stream is ordered after this grid).
  grid_dependency_wait();
  if (last_split < 1 || last_split != n - 1 || row >= p.rows_per_head_k) return;
  const long long first = accum_slot(p.num_splits, req, 0);
  if (first < 0 || first + n > max_accum_slots(p.num_sm_parts)) return;  // stale metadata
  auto acc_row = [&](int s) { return accum_row_index(p, first + s, kv_head, row); };

  // Online over groups of kSplitsPerLoad partials (usually one group): each group's lse and values
  // are loaded together, then the sums move to the group's max.
  float max_lse = -INFINITY, total = 0.f;
  bool nan = false;  // a NaN partial (fmaxf skips it) makes the row NaN, never empty
  float4 sum[4] = {};
  for (int s0 = 0; s0 < n; s0 += kSplitsPerLoad) {
    float lse[kSplitsPerLoad];
    float4 v[kSplitsPerLoad][4];
#pragma unroll
    for (int i = 0; i < kSplitsPerLoad; ++i) {
      const bool in = s0 + i < n;
      lse[i] = in ? p.lse_accum[acc_row(s0 + i)] : -INFINITY;
      const float4* src = reinterpret_cast<const float4*>(p.o_accum + (in ? acc_row(s0 + i) : 0) * kHeadDimV);
#pragma unroll
      for (int c = 0; c < 4; ++c) v[i][c] = in ? src[c * 32 + lane] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float new_max = max_lse;
#pragma unroll
    for (int i = 0; i < kSplitsPerLoad; ++i) {
      new_max = fmaxf(new_max, lse[i]);
      nan |= isnan(lse[i]);
    }
    if (new_max == -INFINITY) continue;  // only empty pieces so far
    const float f = expf(max_lse - new_max);  // 0 while max_lse is -inf
    total *= f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      sum[c].x *= f; sum[c].y *= f; sum[c].z *= f; sum[c].w *= f;
    }
#pragma unroll
    for (int i = 0; i < kSplitsPerLoad; ++i) {
      const float w = expf(lse[i] - new_max);
      if (w == 0.f) continue;  // an empty piece (or none): its partial adds nothing
      total += w;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        sum[c].x += w * v[i][c].x; sum[c].y += w * v[i][c].y; sum[c].z += w * v[i][c].z; sum[c].w += w * v[i][c].w;
      }
    }
    max_lse = new_max;
  }
  if (nan) total = NAN;
  const bool empty = total == 0.f;
  const float inv = empty ? 0.f : 1.f / total;
  const QueryRow qr = query_row(p, kv_head, row);
  Elem* out = static_cast<Elem*>(p.out) + qo_row_index(p, req, qr) * kHeadDimV;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    uint2 packed;
    packed.x = pack2<Elem>(sum[c].x * inv, sum[c].y * inv);
    packed.y = pack2<Elem>(sum[c].z * inv, sum[c].w * inv);
    *reinterpret_cast<uint2*>(out + (c * 32 + lane) * 4) = packed;
  }
  if (lane == 0) {
    p.lse[lse_index(p, req, qr)] = empty ? INFINITY : logf(total) + max_lse;
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
  config.gridDim = dim3(p.num_sm_parts, p.num_heads_k, ceil_div(p.rows_per_head_k, sm90::kCombineWarps));
  config.blockDim = dim3(sm90::kCombineWarps * 32);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return p.dtype == ElementType::kBF16 ? cudaLaunchKernelEx(&config, sm90::combine_kernel<__nv_bfloat16>, p)
                                       : cudaLaunchKernelEx(&config, sm90::combine_kernel<__half>, p);
}

}  // namespace jax_flashmla
