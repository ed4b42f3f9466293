// The tile-scheduler metadata kernel: the plan of mla_contract.h (schedule_tiles on the host) computed
// on the device from the device-resident sequence lengths, so planning needs no host round trip.
// One block; each thread plans a contiguous run of requests (plan_requests). Two block-wide scans
// give each run its first cost unit and its first accumulator slot; everything else is per request,
// so the plan costs a few microseconds, not a sequential walk over the batch.
#include "common/mla_contract.h"
#include "cuda/mla_kernels.h"

namespace jax_flashmla {
namespace sm90 {

constexpr int kMetadataThreads = 512;

// Exclusive prefix sum of `value` over the block's threads (in thread order); `total` gets the sum
// of all. `warp_sums` holds kMetadataThreads / 32 values. All threads call it.
template <typename T>
__device__ T block_exclusive_scan(T value, T* warp_sums, T& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T inclusive = value;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  T before = 0;
  total = 0;
  for (int w = 0; w < kMetadataThreads / 32; ++w) {
    if (w < warp) before += warp_sums[w];
    total += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused
  return before + inclusive - value;
}

__global__ void __launch_bounds__(kMetadataThreads) metadata_kernel(const int32_t* seqlens, int batch, int num_parts,
                                                                    int32_t* tile_md, int32_t* num_splits) {
  __shared__ long long cost_sums[kMetadataThreads / 32];
  __shared__ int piece_sums[kMetadataThreads / 32];
  for (int f = threadIdx.x; f < num_parts * kTileMetadataSize; f += kMetadataThreads) {
    tile_md[f] = empty_part_field(f % kTileMetadataSize, batch);
  }
  const int per_thread = ceil_div(batch, kMetadataThreads);
  const int begin = min(static_cast<int>(threadIdx.x) * per_thread, batch), end = min(begin + per_thread, batch);

  long long my_cost = 0;
  for (int i = begin; i < end; ++i) my_cost += request_cost(seqlens[i]);
  long long total = 0;
  const long long start = block_exclusive_scan(my_cost, cost_sums, total);  // also orders the empty rows first
  const long long width = part_width(total, num_parts);
  // Each request's pieces go to num_splits[i + 1], made a prefix sum below.
  const int my_pieces = begin < end ? plan_requests(seqlens, batch, begin, end, start, width, num_parts, tile_md,
                                                    num_splits + 1)
                                    : 0;
  int all_pieces = 0;
  int running = block_exclusive_scan(my_pieces, piece_sums, all_pieces);
  for (int i = begin; i < end; ++i) {
    running += num_splits[i + 1];  // this thread's own write above
    num_splits[i + 1] = running;
  }
  if (threadIdx.x == 0) num_splits[0] = 0;
}

}  // namespace sm90

cudaError_t launch_metadata(const int32_t* seqlens, int batch, int num_sm_parts, int32_t* tile_md,
                            int32_t* num_splits, cudaStream_t stream) {
  sm90::metadata_kernel<<<1, sm90::kMetadataThreads, 0, stream>>>(seqlens, batch, num_sm_parts, tile_md, num_splits);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
