// The SM90 MLA decode kernels: tile-scheduler metadata, split-KV decode (TMA + wgmma), combine.
//
// Decode work unit: one CTA per (sm part, kv head, 64-row tile) runs the pieces of its part
// (tile_md row) one after the other. A piece is a page range of one request. Per 64-token page:
//   S = Q K^T      each of the two consumer warpgroups computes the scores of 32 of the 64 tokens
//                  (wgmma m64n32k16, Q and K from shared memory);
//   softmax        the warpgroups swap row maxima through shared memory so both rescale with the
//                  same running max, and write P (bf16/fp16) to shared memory;
//   O += P V       each warpgroup owns half of the 64x512 fp32 output (128 registers a thread) and
//                  multiplies all 64 tokens of P with its 256 channels of V (wgmma m64n256k16).
// K pages arrive by TMA (9 boxes of 64 tokens x 64 channels, 128-byte swizzle) into two stages, so
// the next page loads while this one is computed. Pieces that are a whole request write out/lse;
// split requests write fp32 partials to the accumulator workspace and the combine kernel merges them.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/decode_common.cuh"
#include "cuda/mla_kernels.h"
#include "cuda/wgmma_ops.cuh"

namespace jax_flashmla {
namespace sm90 {

constexpr int kStages = 2;
constexpr int kPageParts = 3;  // with kBoxWait

struct SharedStorage {
  alignas(1024) uint8_t q[kBlockBytes];           // Q tile, 9 swizzled tiles of 64 rows x 64 channels
  alignas(1024) uint8_t k[kStages][kBlockBytes];  // K pages, same layout; V is tiles 0..7
  alignas(1024) uint8_t p[kTileBytes];            // P of the current page, 64 rows x 64 tokens
  float row_max[2][kRowsPerTile];                 // per-warpgroup row maxima of the current page
  float row_sum[2][kRowsPerTile];                 // per-warpgroup row sums, at the end of a piece
  uint64_t k_full[kStages][kPageParts];           // TMA completion of each stage: [0] for the whole
                                                  // page, or one per part of it with kBoxWait
};

constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;  // + room to align the dynamic base
static_assert(kSmemBytes <= 227 * 1024, "over the SM90 per-block limit (and desc_advance needs addresses < 2^18)");

template <typename Elem>
struct Wgmma;
template <>
struct Wgmma<__nv_bfloat16> {
  __device__ static void scores(float* d, uint64_t a, uint64_t b, int acc) { wgmma_m64n32k16_ss_Bf16<0>(d, a, b, acc); }
  __device__ static void values(float* d, uint64_t a, uint64_t b) { wgmma_m64n256k16_ss_Bf16<1>(d, a, b, 1); }
};
template <>
struct Wgmma<__half> {
  __device__ static void scores(float* d, uint64_t a, uint64_t b, int acc) { wgmma_m64n32k16_ss_F16<0>(d, a, b, acc); }
  __device__ static void values(float* d, uint64_t a, uint64_t b) { wgmma_m64n256k16_ss_F16<1>(d, a, b, 1); }
};

// kBoxWait (EXPERIMENTAL, opt-in, not yet run on a GPU): a page arrives in three parts of three
// 64-channel boxes, each on its own mbarrier, and the scores wait part by part, so they start while
// the rest of the page is in flight. (Three parts, not nine boxes: ptxas closes the wgmma group at
// every wait, and each close may drain the tensor pipe.)
template <typename Elem, bool kBoxWait>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ CUtensorMap k_map, const __grid_constant__ DecodeParams p) {
  constexpr int kParts = kBoxWait ? kPageParts : 1;  // mbarriers per stage
  extern __shared__ uint8_t smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int part = blockIdx.x, kv_head = blockIdx.y, row0 = blockIdx.z * kRowsPerTile;
  const int tid = threadIdx.x, lane = tid % 32;
  // The warpgroup index through a shuffle, so the compiler knows it is warp-uniform and keeps the
  // wgmma descriptors built from it in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int r_lo = (tid % 128) / 32 * 16 + lane / 4;  // this thread's two accumulator rows: r_lo, r_lo + 8
  const int col_q = 2 * (lane % 4);                   // first of its two columns in each 8-column chunk
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) {
      for (int j = 0; j < kParts; ++j) mbar_init(&s.k_full[i][j], 1);
    }
    fence_mbar_init();
  }
  __syncthreads();
  const uint64_t policy = evict_first_policy();
  auto issue = [&](int stage, int row_coord) {
    issue_page<kParts>(s.k[stage], s.k_full[stage], &k_map, row_coord, kv_head, policy);
  };

  const int32_t* md = p.tile_md + static_cast<int64_t>(part) * kTileMetadataSize;
  uint32_t pages_done = 0;  // pages this CTA consumed: selects the stage and the mbarrier phase

  for (int req = max(md[kMdBeginReq], 0); req <= min(md[kMdEndReq], p.batch - 1); ++req) {
    const PieceRange piece = piece_range(md, p, req);
    const int len = piece.len, page_begin = piece.page_begin, n_pages = piece.n_pages;

    // Thread 0 keeps the page id of the next reload one page ahead, so the block-table read (a
    // dependent global load) is not on the path from a stage freeing up to its reload.
    int next_row_coord = 0;
    if (tid == 0) {
      for (int i = 0; i < min(kStages, n_pages); ++i) {
        const int stage = (pages_done + i) % kStages;
        issue(stage, page_row_coord(p, req, page_begin + i));
      }
      if (kStages < n_pages) next_row_coord = page_row_coord(p, req, page_begin + kStages);
    }
    load_q_tile(s.q, p, req, kv_head, row0);
    fence_proxy_async();
    __syncthreads();

    const int limit_lo = key_limit(p, len, row0 + r_lo), limit_hi = key_limit(p, len, row0 + r_lo + 8);
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    for (int b = 0; b < n_pages; ++b, ++pages_done) {
      const int stage = pages_done % kStages;
      const uint32_t parity = (pages_done / kStages) & 1;
      const int key0 = (page_begin + b) * kPageSize;
      const bool tail = len - key0 < kPageSize;
      // The whole page: always without kBoxWait; with it only for a tail page, whose rows past the
      // length are zeroed before anything reads them. Otherwise the scores wait part by part.
      if (!kBoxWait || tail) {
        for (int j = 0; j < kParts; ++j) mbar_wait(&s.k_full[stage][j], parity);
      }
      if (tail) {
        zero_tail_rows(s.k[stage], len - key0, tid, kThreads);
        fence_proxy_async();
        __syncthreads();
      }
      const uint8_t* k_stage = s.k[stage];

      // S = Q K^T for tokens [32 wg, 32 wg + 32) of the page.
      float sc[16];
      const uint64_t k_desc = smem_desc_sw128(k_stage + wg * 32 * 128, 16, 1024);  // this half's 32 tokens
      score_page<Wgmma<Elem>, 16>(smem_desc_sw128(s.q, 16, 1024), k_desc, sc, [&](int t) {
        if constexpr (kBoxWait) {
          if (t % (kChannelTiles / kParts) == 0) mbar_wait(&s.k_full[stage][t / (kChannelTiles / kParts)], parity);
        }
      });

      // Scale to log2 units and mask keys past each row's limit; this warpgroup's row maxima.
      float mx_lo, mx_hi;
      mask_scores<16>(sc, key0 + wg * 32, col_q, limit_lo, limit_hi, scale_log2, mx_lo, mx_hi);
      if (lane % 4 == 0) {
        s.row_max[wg][r_lo] = mx_lo;
        s.row_max[wg][r_lo + 8] = mx_hi;
      }
      __syncthreads();  // both halves' maxima visible; the previous page's P and V reads are done

      const float new_lo = fmaxf(m_lo, fmaxf(s.row_max[0][r_lo], s.row_max[1][r_lo]));
      const float new_hi = fmaxf(m_hi, fmaxf(s.row_max[0][r_lo + 8], s.row_max[1][r_lo + 8]));
      const float base_lo = exp_base(new_lo), base_hi = exp_base(new_hi);
      const float alpha_lo = exp2f(m_lo - base_lo), alpha_hi = exp2f(m_hi - base_hi);
      m_lo = new_lo;
      m_hi = new_hi;
      l_lo *= alpha_lo;
      l_hi *= alpha_hi;
#pragma unroll
      for (int i = 0; i < 16; i += 2) {
        const bool hi = (i >> 1) & 1;
        const float base = hi ? base_hi : base_lo;
        const float p0 = exp2f(sc[i] - base), p1 = exp2f(sc[i + 1] - base);
        if (hi) l_hi += p0 + p1; else l_lo += p0 + p1;
        const int row = r_lo + (hi ? 8 : 0);
        const int col = wg * 32 + (i / 4) * 8 + col_q;  // token within the page
        *reinterpret_cast<uint32_t*>(s.p + swizzled_offset(row, col / 8) + (col % 8) * 2) = pack2<Elem>(p0, p1);
      }
      rescale_rows(o, alpha_lo, alpha_hi);  // usually skipped: it stands between P and the PV wgmma
      fence_proxy_async();
      __syncthreads();  // all of P written

      // O[:, 256 wg : 256 wg + 256] += P V.
      const uint64_t p_desc = smem_desc_sw128(s.p, 16, 1024);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        Wgmma<Elem>::values(o, desc_advance(p_desc, kk * 32), v_desc(k_stage, wg, kk));
      }
      wgmma_commit();
      wgmma_wait<0>();
      pin_registers<128>(o);
      __syncthreads();  // the stage and P are free again
      if (tid == 0 && b + kStages < n_pages) {
        issue(stage, next_row_coord);
        if (b + kStages + 1 < n_pages) next_row_coord = page_row_coord(p, req, page_begin + b + kStages + 1);
      }
    }

    finish_piece<Elem>(p, o, s.row_sum, req, piece.split, kv_head, row0, r_lo, wg, lane, l_lo, l_hi, m_lo, m_hi);
  }
}

// One warp per (request, kv head, row): merges the request's split partials by their lse weights.
template <typename Elem>
__global__ void __launch_bounds__(128) combine_kernel(const __grid_constant__ DecodeParams p) {
  const int req = blockIdx.x, kv_head = blockIdx.y;
  const int row = blockIdx.z * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  if (n <= 1 || row >= p.rows_per_head_k) return;
  if (first < 0 || first + n > max_accum_slots(p.batch, p.num_sm_parts)) return;  // stale metadata
  auto acc_row = [&](int s) { return (static_cast<int64_t>(first + s) * p.num_heads_k + kv_head) * p.rows_per_head_k + row; };

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

// The scheduler is sequential; the block first stages the lengths in shared memory so the one
// thread that plans reads them at shared-memory latency.
constexpr int kMetadataStagedLengths = 8192;

__global__ void metadata_kernel(const int32_t* seqlens, int batch, int num_sm_parts, int32_t* tile_md,
                                int32_t* num_splits) {
  __shared__ int32_t staged[kMetadataStagedLengths];
  const bool fits = batch <= kMetadataStagedLengths;
  if (fits) {
    for (int i = threadIdx.x; i < batch; i += blockDim.x) staged[i] = seqlens[i];
    __syncthreads();
  }
  if (threadIdx.x == 0) schedule_tiles(fits ? staged : seqlens, batch, num_sm_parts, tile_md, num_splits);
}

}  // namespace sm90

cudaError_t launch_metadata(const int32_t* seqlens, int batch, int num_sm_parts, int32_t* tile_md,
                            int32_t* num_splits, cudaStream_t stream) {
  sm90::metadata_kernel<<<1, 256, 0, stream>>>(seqlens, batch, num_sm_parts, tile_md, num_splits);
  return cudaGetLastError();
}

// JAX_FLASHMLA_DECODE_SCHEDULE (read once per process) picks an experimental schedule, neither run on
// a GPU yet: "seesaw" the kernel of mla_decode_seesaw.cu, "boxes" the kernel above with kBoxWait.
// Unset or "default": the verified kernel above (another value says so on stderr, then uses it).
enum class DecodeSchedule { kDefault, kBoxes, kSeesaw };

static DecodeSchedule decode_schedule() {
  static const DecodeSchedule schedule = [] {
    const char* env = std::getenv("JAX_FLASHMLA_DECODE_SCHEDULE");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "default") == 0) return DecodeSchedule::kDefault;
    if (std::strcmp(env, "seesaw") == 0) return DecodeSchedule::kSeesaw;
    if (std::strcmp(env, "boxes") == 0) return DecodeSchedule::kBoxes;
    std::fprintf(stderr, "jax_flashmla: JAX_FLASHMLA_DECODE_SCHEDULE=%s is not one of default, boxes, seesaw; "
                 "using default\n", env);
    return DecodeSchedule::kDefault;
  }();
  return schedule;
}

template <typename Elem, bool kBoxWait>
static cudaError_t launch_split_kv(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  constexpr auto kernel = sm90::decode_kernel<Elem, kBoxWait>;
  if (cudaError_t err = sm90::allow_dynamic_smem<kernel>(sm90::kSmemBytes); err != cudaSuccess) return err;
  const dim3 grid(p.num_sm_parts, p.num_heads_k, ceil_div(p.rows_per_head_k, kRowsPerTile));
  kernel<<<grid, sm90::kThreads, sm90::kSmemBytes, stream>>>(k_map, p);
  return cudaGetLastError();
}

template <typename Elem>
static cudaError_t launch_decode_typed(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  switch (decode_schedule()) {
    case DecodeSchedule::kSeesaw: err = launch_seesaw_decode(p, k_map, stream); break;
    case DecodeSchedule::kBoxes: err = launch_split_kv<Elem, true>(p, k_map, stream); break;
    case DecodeSchedule::kDefault: err = launch_split_kv<Elem, false>(p, k_map, stream); break;
  }
  if (err != cudaSuccess) return err;
  const dim3 combine_grid(p.batch, p.num_heads_k, ceil_div(p.rows_per_head_k, 4));
  sm90::combine_kernel<Elem><<<combine_grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_decode(const DecodeParams& p, const CUtensorMap& k_map, cudaStream_t stream) {
  return p.dtype == ElementType::kBF16 ? launch_decode_typed<__nv_bfloat16>(p, k_map, stream)
                                       : launch_decode_typed<__half>(p, k_map, stream);
}

}  // namespace jax_flashmla
