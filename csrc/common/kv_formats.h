// The two FP8 KV-cache formats of DeepSeek's sparse-attention models, byte for byte as FlashMLA's
// quantiser writes them. Every size and offset of a pool is computed here: the Python quantiser
// (jax_flashmla/kv_formats.py, through the extension's contract constants), the CPU handler and the
// kernels read the same numbers.
//
// V3.2 (DeepSeek-V3.2, d_qk 576): every token is one 656-byte record, tokens back to back in a page:
//   [0, 512)    512 float8_e4m3fn latent values, quantised in 4 groups of 128 channels
//   [512, 528)  4 float32 scales, one per group (little-endian), powers of two
//   [528, 656)  64 bfloat16 RoPE values, unquantised
// MODEL1 (DeepSeek-V4, d_qk 512): the page holds first the 576-byte records of all its tokens, then
// the 8-byte scale records of all its tokens, then zero padding up to a multiple of 576 bytes:
//   record     [0, 448) 448 float8_e4m3fn latent values in 7 groups of 64; [448, 576) 64 bf16 RoPE
//   scales     7 ue8m0 bytes (the scale 2^(byte - 127)), one per group, then 1 pad byte
// A scale is the smallest power of two >= max(amax / 448, 1e-4), amax the group's largest |value|.
#pragma once

#include <cstdint>
#include <limits>

#include "common/mla_contract.h"

namespace jax_flashmla {

enum class KvFormat : int { kV32 = 0, kModel1 = 1 };
constexpr int kNumKvFormats = 2;

// Largest finite float8_e4m3fn value: a group's amax is mapped to at most this.
constexpr float kFp8E4m3Max = 448.0f;
// Lower bound of amax / 448 before rounding up to a power of two: an all-zero (or tiny) group gets
// the scale 2^-13, the smallest power of two above 1e-4.
constexpr float kFp8MinScale = 1e-4f;

struct KvFormatLayout {
  int d_qk;             // channels of a token: d_nope quantised + d_rope kept in bf16
  int d_nope;           // quantised channels (the first d_nope)
  int d_rope;           // bf16 channels (the last d_rope)
  int head_dim_v;       // V is the first head_dim_v channels of the dequantised token
  int group_size;       // channels sharing one scale
  int num_groups;       // d_nope / group_size
  int scale_bytes;      // bytes of one scale: 4 (float32) or 1 (ue8m0)
  int record_bytes;     // the token's record in the page's first area (V3.2: its scales included)
  int scale_record_bytes;  // the token's record in the page's scale area (0: no such area)
  int page_align;       // a page's bytes are padded to a multiple of this
};

JFM_HOST_DEVICE constexpr KvFormatLayout kv_format_layout(KvFormat format) {
  return format == KvFormat::kV32
             // 512 e4m3 + 4 float32 scales + 64 bf16 = 656 bytes, no scale area, no padding.
             ? KvFormatLayout{576, 512, 64, 512, 128, 4, 4, 512 + 4 * 4 + 64 * 2, 0, 1}
             // 448 e4m3 + 64 bf16 = 576 bytes; 7 ue8m0 + 1 pad = 8 bytes; pages padded to 576 bytes.
             : KvFormatLayout{512, 448, 64, 512, 64, 7, 1, 448 + 64 * 2, 7 + 1, 448 + 64 * 2};
}

// Bytes a token takes in the page before padding (V3.2 656, MODEL1 584).
JFM_HOST_DEVICE constexpr int kv_token_bytes(KvFormat format) {
  return kv_format_layout(format).record_bytes + kv_format_layout(format).scale_record_bytes;
}

// Bytes of one page of `page_size` tokens, padding included: the stride between pages of a pool.
JFM_HOST_DEVICE constexpr long long kv_page_bytes(KvFormat format, int page_size) {
  const long long align = kv_format_layout(format).page_align;
  return (static_cast<long long>(page_size) * kv_token_bytes(format) + align - 1) / align * align;
}

// Offset, within its page, of token `token`'s record (its latent values, then V3.2's scales, then RoPE).
JFM_HOST_DEVICE constexpr long long kv_record_offset(KvFormat format, int token) {
  return static_cast<long long>(token) * kv_format_layout(format).record_bytes;
}

// Offset, within its page, of token `token`'s first scale.
JFM_HOST_DEVICE constexpr long long kv_scale_offset(KvFormat format, int page_size, int token) {
  const KvFormatLayout l = kv_format_layout(format);
  return l.scale_record_bytes == 0
             ? kv_record_offset(format, token) + l.d_nope
             : static_cast<long long>(page_size) * l.record_bytes + static_cast<long long>(token) * l.scale_record_bytes;
}

// Offset, within its page, of token `token`'s first bf16 RoPE value.
JFM_HOST_DEVICE constexpr long long kv_rope_offset(KvFormat format, int token) {
  const KvFormatLayout l = kv_format_layout(format);
  return kv_record_offset(format, token) + l.record_bytes - 2LL * l.d_rope;
}

// The page size of a pool whose pages are `rows_per_page` rows of the format's record, or 0 when no
// page size gives that many rows.
inline int sparse_page_size(KvFormat format, int64_t rows_per_page) {
  const KvFormatLayout l = kv_format_layout(format);
  if (rows_per_page < 1 || rows_per_page > std::numeric_limits<int32_t>::max()) return 0;
  const int64_t page_bytes = rows_per_page * l.record_bytes;
  const int64_t page_size = page_bytes / kv_token_bytes(format);  // the only candidate (padding < a row)
  if (page_size < 1 || kv_page_bytes(format, static_cast<int>(page_size)) != page_bytes) return 0;
  return static_cast<int>(page_size);
}

static_assert(kv_token_bytes(KvFormat::kV32) == 656, "V3.2: 656 bytes a token");
static_assert(kv_token_bytes(KvFormat::kModel1) == 584, "MODEL1: 584 bytes a token");
static_assert(kv_page_bytes(KvFormat::kModel1, 64) == 65 * 576, "MODEL1: a page of 64 tokens is 65 rows of 576 bytes");
static_assert(kv_page_bytes(KvFormat::kModel1, 72) == 73 * 576, "MODEL1: 72 tokens fill 73 rows exactly");
static_assert(kv_rope_offset(KvFormat::kV32, 0) == 528 && kv_rope_offset(KvFormat::kModel1, 0) == 448,
              "RoPE follows the scales (V3.2) or the latent values (MODEL1)");

}  // namespace jax_flashmla
