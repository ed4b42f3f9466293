// The CPU implementation of the decode contract. It follows the GPU kernel's plan exactly: every
// tile_md part computes its (request, page-range) pieces, split pieces go to the fp32 accumulators,
// and a combine pass merges them, so CI checks the scheduler and the split/combine arithmetic.
#pragma once

#include <cstdint>
#include <string>

#include "common/mla_params.h"

namespace jax_flashmla {

// Returns an error naming the first request with a negative length, else an empty string. (The GPU
// kernels, which cannot report one, take a negative length as 0.)
std::string check_seqlens(const int32_t* seqlens, int batch);

// Checks that tile_md/num_splits are a plan for p.seqlens (same coverage the scheduler promises).
// Returns an empty string when they are, else what is wrong.
std::string validate_plan(const DecodeParams& p);

// Runs the decode on the host. Returns an empty string on success, else the error (for example a
// page id outside the pool inside a request's length).
std::string mla_decode_cpu(const DecodeParams& p);

}  // namespace jax_flashmla
