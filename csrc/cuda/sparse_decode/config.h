// The sparse FP8 decode kernel's shared-memory plan and dequantisation split.
//
// Work unit: one CTA per (request, query token, split, tile of up to 64 heads). The CTA walks its
// split of its query token's entries (the main pool's, then the extra pool's, as one sequence; all
// of them with one split) in blocks of 64: it resolves each entry to a pool slot (or masks it),
// dequantises the named tokens into shared memory as bfloat16, then runs the tile math shared with
// the prefill kernel (sparse_common/: warp roles in tile.h). With the gather pipeline (below), the
// next block's raw records are copied into a staging buffer while this block computes, and the
// dequantisation reads them from there.
#pragma once

#include <cstdint>

#include "common/kv_formats.h"
#include "common/mla_contract.h"
#include "common/sparse_params.h"
#include "cuda/sparse_common/tile.h"

// 1 (default): block b + 1's token records are copied into a staging buffer (cp.async) while block b
// computes, then dequantised from shared memory. 0: every block loads and dequantises straight from
// global memory, then computes (the kernel before the pipeline, kept for A/B timing).
#ifndef JAX_FLASHMLA_SPARSE_DECODE_PIPELINE
#define JAX_FLASHMLA_SPARSE_DECODE_PIPELINE 1
#endif

namespace jax_flashmla {
namespace sparse_sm90 {

constexpr bool kPipeline = JAX_FLASHMLA_SPARSE_DECODE_PIPELINE != 0;

constexpr int kThreadsPerToken = kThreads / kBlockN;  // 4 threads dequantise one token
constexpr int kChunk = 16;          // bytes per vector load of the token data

static_assert(kThreadsPerToken == 4, "the dequantisation assumes 4 threads a token");
static_assert(kRows == kSparseDecodeHeadsPerCta, "the handler sizes the grid with kSparseDecodeHeadsPerCta");

// The token data of one block and the Q tile, as bfloat16 in the swizzled layout of sparse_common/tile.h, and the
// block's resolved entries.
template <int kDqk>
struct SharedStorage {
  alignas(128) uint16_t q[kRows * kDqk];
  alignas(128) uint16_t k[kBlockN * kDqk];  // the dequantised tokens; V is channels 0..511 of it
  const uint8_t* record[kBlockN];           // the entry's token record, or null when masked
  const uint8_t* scales[kBlockN];           // its scales (V3.2: inside the record)
  uint32_t valid[kBlockN / 32];             // bit j % 32 of word j / 32: entry j is read
};

template <int kDqk>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<kDqk>)) + 128;  // + room to align the dynamic base
}

static_assert(smem_bytes<576>() <= 227 * 1024, "the V3.2 tile must fit one SM's shared memory");

// The pipelined kernel's staging of one block: each token's record (V3.2: its scales inside) at a
// stride of 64 mod 128 bytes, so the four threads of one token and those of the next cover all 32
// banks in one 16-byte access phase; MODEL1's 8-byte scale records beside them.
template <KvFormat kFormat>
struct StageLayout {
  static constexpr KvFormatLayout kLayout = kv_format_layout(kFormat);
  static constexpr int kRecordBytes = kLayout.record_bytes;                                  // 656 or 576
  static constexpr int kStride = (kRecordBytes + 64 + 127) / 128 * 128 - 64;                  // 704 or 576
  static constexpr int kScaleBytes = kLayout.scale_record_bytes == 0 ? 1 : kLayout.scale_record_bytes;  // V3.2: unused
  static_assert(kRecordBytes % kChunk == 0 && kStride % 128 == 64 && kStride >= kRecordBytes, "stage stride");
};

// The pipelined kernel's shared memory: the Q tile and the bfloat16 tokens as above, the raw records
// of the next block, and the index ring: the ids of block b + 1 (read to resolve its entries) and of
// block b + 2 (in flight), by block parity.
template <KvFormat kFormat>
struct StagedStorage {
  using SL = StageLayout<kFormat>;
  static constexpr int kDqk = SL::kLayout.d_qk;
  alignas(128) uint16_t q[kRows * kDqk];
  alignas(128) uint16_t k[kBlockN * kDqk];
  alignas(128) uint8_t stage[kBlockN * SL::kStride];
  alignas(16) uint8_t stage_scales[kBlockN * SL::kScaleBytes];  // MODEL1's scale records
  int32_t ids[2][kBlockN];
  uint32_t valid[kBlockN / 32];  // of the staged block, as SharedStorage::valid
};

template <KvFormat kFormat>
constexpr int staged_smem_bytes() {
  return static_cast<int>(sizeof(StagedStorage<kFormat>)) + 128;
}

static_assert(staged_smem_bytes<KvFormat::kV32>() <= 227 * 1024 && staged_smem_bytes<KvFormat::kModel1>() <= 227 * 1024,
              "the pipelined tile must fit one SM's shared memory");

}  // namespace sparse_sm90
}  // namespace jax_flashmla
