// The sparse prefill kernel's work unit and shared-memory plan.
//
// Work unit: one CTA per (query token, tile of up to 64 heads). The CTA walks the token's entries
// (its first topk_length, or all topk) in blocks of 64; an entry is read when its id lies in
// [0, s_kv). The named kv rows (d_qk bfloat16, contiguous) are gathered into shared memory by cp.async
// and the dense decode kernel's two-warpgroup schedule runs on them (kernel.cuh), the blocks taking
// the place of its pages.
//
// Rows: the tile holds heads head0 .. head0 + 63 of one query token (tokens differ in the rows they
// read, so no other packing shares a block). With h_q not a multiple of 64 the last tile is padded:
// its rows past h_q hold zero queries and are never written. h_q 1..128 is one or two tiles.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/mla_contract.h"
#include "cuda/sparse_common/tile.h"

// 1: the sparse prefill runs with a producer warpgroup gathering the blocks (below); 0 (default until
// it has passed the GPU tests and been timed against the kernel without): the consumer warpgroups
// gather them. Both are compiled in every build.
#ifndef JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER
#define JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER 0
#endif
static_assert(JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER == 0 || JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER == 1,
              "JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER is 0 or 1");

namespace jax_flashmla {
namespace sparse_sm90 {
namespace prefill {

constexpr bool kSelectedProducer = JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER != 0;

constexpr int kWarps = kThreads / 32;     // the row copies of loads.cuh (shared with the backward)
constexpr int kWarpgroupThreads = 128;
constexpr int kTileBytes = 64 * 64 * 2;   // 64 rows x 64 bf16 channels, 128-byte swizzled
constexpr int kMaskSlots = 4;             // read-entry masks of blocks b % 4 (loads.cuh)
constexpr int kBarConsumers = 5;          // named barrier of the two consumer warpgroups of a producer-fed walk

template <int kDqk>
struct SharedStorage {
  static constexpr int kTiles = kDqk / 64;  // 9 (tiles 0..7: V, tile 8: RoPE) or 8
  // With d_qk 576 a block's P goes into its RoPE tile once its scores are done (as in the decode
  // kernel); with 512 there is no such tile, and P gets one of its own per stage.
  static constexpr bool kSeparateP = kDqk == 512;
  alignas(1024) uint8_t q[kTiles * kTileBytes];     // Q tile
  alignas(1024) uint8_t k[2][kTiles * kTileBytes];  // stage 0: even blocks (A), stage 1: odd blocks (B)
  float max_a[kRows];                               // running max after block A (published by warpgroup 0)
  float max_b[kRows];                               // running max after block B (published by warpgroup 1)
  float row_sum[2][kRows];                          // per-warpgroup row sums, at the end
  float row_max[2][kRows];                          // per-warpgroup exact row maxima, at the end
  uint16_t mask[kMaskSlots][4];                     // bit r of word w: entry 16 w + r of the block is read
  uint64_t k_full[2][2];                            // [stage][part] copies landed (128 arrivals each)
  alignas(1024) uint8_t p[kSeparateP ? 2 : 1][kSeparateP ? kTileBytes : 16];
};

template <int kDqk>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<kDqk>)) + 1024;  // + room to align the dynamic base
}

// A producer warpgroup (threads 256..383) can load the blocks instead of the two consumer warpgroups
// (schedule.cuh: producer_loop, ReleaseSource): a consumer that is done with a part arrives on the
// part's k_free mbarrier, and the producer refills it once all its readers have. Registers: the CTA's
// pool holds kLaunchRegs a thread at launch (384 threads: 168); the producer lowers itself to
// kProducerRegs and the consumers raise themselves to kConsumerRegs, which the pool can pay for:
// 128 * (168 - 56) = 256 * (224 - 168). A consumer's raise waits until the pool holds the registers, so
// a launch count below kLaunchRegs would hang it: the launches check the count ptxas gave.
template <bool kProducer>
constexpr int cta_threads() {
  return kProducer ? kThreads + kWarpgroupThreads : kThreads;
}
constexpr int kLaunchRegs = (65536 / cta_threads<true>()) & ~7;
constexpr int kProducerRegs = 56;
constexpr int kConsumerRegs = 224;
static_assert(kWarpgroupThreads * (kLaunchRegs - kProducerRegs) >= kThreads * (kConsumerRegs - kLaunchRegs),
              "the register split must fit the pool");

// cudaSuccess when the producer-fed kernel kKernel got kLaunchRegs registers a thread from ptxas (the
// register split assumes it), else cudaErrorInvalidConfiguration; checked once per process.
template <auto kKernel>
inline cudaError_t check_launch_regs() {
  static const cudaError_t result = [] {
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, kKernel);
    if (err != cudaSuccess) return err;
    return attr.numRegs == kLaunchRegs ? cudaSuccess : cudaErrorInvalidConfiguration;
  }();
  return result;
}

// The plan plus the producer's k_free mbarriers (unused without a producer).
template <int kDqk>
struct ProducerStorage : SharedStorage<kDqk> {
  uint64_t k_free[2][2];  // [stage][part] the consumers are done with the part (128 arrivals)
};

template <int kDqk>
constexpr int producer_smem_bytes() {
  return static_cast<int>(sizeof(ProducerStorage<kDqk>)) + 1024;
}

static_assert(producer_smem_bytes<576>() <= 227 * 1024 && producer_smem_bytes<512>() <= 227 * 1024,
              "the producer's plan must fit one SM's shared memory");

static_assert(smem_bytes<576>() <= 227 * 1024, "the d_qk 576 stages must fit one SM's shared memory");
static_assert(smem_bytes<512>() <= 227 * 1024, "the d_qk 512 stages must fit one SM's shared memory");

}  // namespace prefill
}  // namespace sparse_sm90
}  // namespace jax_flashmla
