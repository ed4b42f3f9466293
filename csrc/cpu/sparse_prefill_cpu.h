// The CPU implementation of the sparse prefill contract (FlashMLA's flash_mla_sparse_fwd): every query
// token attends, with every head, to the kv rows its row of indices names.
#pragma once

#include "common/sparse_params.h"

namespace jax_flashmla {

// Runs the sparse prefill on the host, spread over the machine's threads. Never fails: an id outside
// the kv rows is an unused entry, as in FlashMLA.
void sparse_prefill_cpu(const SparsePrefillParams& p);

}  // namespace jax_flashmla
