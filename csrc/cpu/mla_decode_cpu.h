// The CPU implementation of the decode contract. It follows the GPU kernel's plan exactly: every
// tile_md part computes its (request, page-range) pieces, split pieces go to the fp32 accumulators,
// and a combine pass merges them, so CI checks the scheduler and the split/combine arithmetic.
#pragma once

#include <string>

#include "common/mla_params.h"

namespace jax_flashmla {

// Checks that tile_md/num_splits are a plan for p.seqlens (same coverage the scheduler promises).
// Returns an empty string when they are, else what is wrong.
std::string validate_plan(const DecodeParams& p);

// Runs the decode on the host. Returns an empty string on success, else the error (for example a
// page id outside the pool inside a request's length).
std::string mla_decode_cpu(const DecodeParams& p);

}  // namespace jax_flashmla
