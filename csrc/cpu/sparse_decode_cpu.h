// The CPU implementation of the sparse decode contract over an FP8 token pool (kv_formats.h): every
// query token attends to the pool slots its row of indices names, from one pool or two.
#pragma once

#include <cstdint>
#include <string>

#include "common/kv_formats.h"
#include "common/sparse_params.h"

namespace jax_flashmla {

// Dequantises token `slot` of a pool into `dst` (d_qk floats, each rounded to bfloat16 as
// jax_flashmla.dequantize_kv_cache does).
void dequantize_token(const uint8_t* pool, KvFormat format, int page_size, int64_t slot, float* dst);

// Runs the sparse decode on the host. Returns an empty string on success, else the error (an index
// outside its pool, naming the request, query token and position).
std::string sparse_decode_cpu(const SparseDecodeParams& p);

}  // namespace jax_flashmla
