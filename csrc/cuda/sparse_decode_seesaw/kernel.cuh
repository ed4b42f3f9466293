// The seesaw sparse FP8 decode kernel (config.h describes it): the grid of the mma.sync kernel, the
// prefill's two-warpgroup walk over the split's entry blocks (sparse_prefill/schedule.cuh), and the
// decode's epilogue (epilogue.cuh). Without a producer (kProducer false) the walk's source is
// DequantSource (loads.cuh): each consumer warpgroup refills the parts it is done with. With one, the
// walk's source is ReleaseSource and a third warpgroup runs producer_loop with DequantSource (both in
// sparse_prefill/schedule.cuh). launch.cuh launches it.
#pragma once

#include "common/sparse_params.h"
#include "cuda/sparse_decode_seesaw/epilogue.cuh"
#include "cuda/sparse_decode_seesaw/loads.cuh"
#include "cuda/sparse_prefill/schedule.cuh"

namespace jax_flashmla {
namespace sparse_sm90 {
namespace seesaw {

// Grid: the mma.sync kernel's (decode_cta, sparse_decode/loads.cuh).
template <KvFormat kFormat, bool kProducer>
__global__ void __launch_bounds__(threads<kProducer>(), 1)
    sparse_decode_seesaw_kernel(const __grid_constant__ SparseDecodeParams p) {
  constexpr int kDqk = kv_format_layout(kFormat).d_qk;
  extern __shared__ uint8_t smem_raw[];
  // Aligned by an offset from smem_raw, so the compiler still knows these are shared-memory addresses.
  Storage<kFormat>& s =
      *reinterpret_cast<Storage<kFormat>*>(smem_raw + (1024 - sm90::smem_addr(smem_raw) % 1024) % 1024);

  // With splits, the combine grid may launch now: it waits for this grid's completion itself.
  sm90::allow_dependent_launch();
  const DecodeCta tp = decode_cta(p);
  const sm90::ThreadCoord t = sm90::thread_coord();
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const SplitRange range = split_range(p, tp.req, tp.split);
  const int blocks = range.e_end > range.e_begin ? ceil_div(range.e_end - range.e_begin, kBlockN) : 0;
  const DequantSource<kFormat> dequant{p, tp.req, tp.token, range};

  using Release = prefill::ReleaseSource<DequantSource<kFormat>::kArrivals>;
  if constexpr (kProducer) {
    prefill::init_producer_barriers<DequantSource<kFormat>>(s);
    if (t.wg == 2) {
      sm90::warpgroup_reg_dealloc<prefill::kProducerRegs>();
      prefill::producer_loop(s, dequant, blocks);
      return;
    }
    sm90::warpgroup_reg_alloc<prefill::kConsumerRegs>();
  }

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  sm90::RowState st{-INFINITY, -INFINITY, 0.f, 0.f};
  sm90::RowPair row_max{-INFINITY, -INFINITY};  // the walk's exact maxima (the decode returns no max_logits)
  bool any_read = false;
  const uint16_t* q_row0 = p.q + tp.qo_row0 * kDqk;
  if constexpr (kProducer) {
    prefill::walk_blocks(s, Release{s.k_free}, blocks, q_row0, tp.rows, t, scale_log2, o, st, row_max,
                         any_read);
  } else {
    prefill::walk_blocks(s, dequant, blocks, q_row0, tp.rows, t, scale_log2, o, st, row_max, any_read);
  }
  finish_tile<kProducer>(p, s, o, t, st, tp);
}

}  // namespace seesaw
}  // namespace sparse_sm90
}  // namespace jax_flashmla
