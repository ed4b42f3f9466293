// The decode contract shared by the CPU handler and the CUDA kernels: fixed sizes of the MLA layout,
// the layout of the tile-scheduler metadata, and the scheduler itself. The scheduler is written once
// as a host/device function so the CPU path exercises exactly the split plan the GPU kernel runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JFM_HOST_DEVICE __host__ __device__
#else
#define JFM_HOST_DEVICE
#endif

namespace jax_flashmla {

constexpr int kHeadDim = 576;       // 512 latent + 64 RoPE channels
constexpr int kHeadDimV = 512;      // V is the first 512 channels of K
constexpr int kPageSize = 64;       // tokens per KV-cache page
constexpr int kRowsPerTile = 64;    // query rows (s_q * h_q / h_kv) handled by one work tile
constexpr int kTileMetadataSize = 8;  // int32 fields per row of tile_md
// Scheduler cost of starting a (request, page-range) piece, in pages: it pays for the prologue, the
// epilogue and, when the request is split, the combine.
constexpr int kPieceOverheadPages = 5;

// Fields of one tile_md row. A row describes the work of one persistent CTA ("sm part"): the pages
// from (begin_req, begin_page) up to (end_req, end_page), end_page exclusive, visited request by
// request. begin_split is the split index, within begin_req, of the part's first piece; later pieces
// of the part start their request and so have split index 0. An empty part has begin_req > end_req.
enum TileMetadataField : int {
  kMdBeginReq = 0,
  kMdBeginPage = 1,
  kMdEndReq = 2,
  kMdEndPage = 3,
  kMdBeginSplit = 4,
};

JFM_HOST_DEVICE inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Persistent CTAs per (kv head, 64-row tile): FlashMLA's rule, num_SMs / h_kv / row tiles.
JFM_HOST_DEVICE inline int num_sm_parts_for(int sm_count, int rows_per_head_k, int num_heads_k) {
  int parts = sm_count / num_heads_k / ceil_div(rows_per_head_k, kRowsPerTile);
  return parts > 0 ? parts : 1;
}

// Largest number of accumulator slots any plan can use: each part ends inside at most one request,
// adding at most one piece to it, so pieces <= batch + parts.
JFM_HOST_DEVICE inline int max_accum_slots(int batch, int num_sm_parts) { return batch + num_sm_parts; }

// Pages a request of `seqlen` tokens occupies (seqlen < 0 counts as 0).
JFM_HOST_DEVICE inline int pages_of(int seqlen) { return seqlen > 0 ? ceil_div(seqlen, kPageSize) : 0; }

// Splits every request's pages into pieces and deals the pieces to `num_parts` parts so that each part
// gets about the same cost (pages + kPieceOverheadPages per piece). Writes tile_md[num_parts][8] and
// num_splits[batch + 1] (prefix sums of pieces per request). Every request gets at least one piece,
// zero-length requests included, so that every output row is written. The last part takes whatever
// is left, so the plan always covers everything whatever the cost model says.
JFM_HOST_DEVICE inline void schedule_tiles(const int32_t* seqlens, int batch, int num_parts,
                                           int32_t* tile_md, int32_t* num_splits) {
  long long total_cost = 0;
  for (int i = 0; i < batch; ++i) total_cost += pages_of(seqlens[i]) + kPieceOverheadPages;
  const long long payload = (total_cost + num_parts - 1) / num_parts + kPieceOverheadPages;

  int req = 0, page = 0, split = 0;  // next unassigned position and its split index
  num_splits[0] = 0;
  for (int part = 0; part < num_parts; ++part) {
    int32_t* md = tile_md + part * kTileMetadataSize;
    for (int f = 0; f < kTileMetadataSize; ++f) md[f] = 0;
    md[kMdBeginReq] = req;
    md[kMdBeginPage] = page;
    md[kMdBeginSplit] = split;
    int end_req = req - 1, end_page = 0;  // empty until something is taken
    const bool last = part == num_parts - 1;
    long long budget = payload;
    while (req < batch) {
      const int pages_left = pages_of(seqlens[req]) - page;
      if (last || pages_left + kPieceOverheadPages <= budget) {  // take the rest of this request
        budget -= pages_left + kPieceOverheadPages;
        end_req = req;
        end_page = page + pages_left;
        num_splits[req + 1] = split + 1;  // pieces of req so far; made a prefix sum below
        ++req;
        page = 0;
        split = 0;
      } else {
        const long long take = budget - kPieceOverheadPages;
        if (take > 0) {  // take a leading part of the request and end the part inside it
          end_req = req;
          end_page = page + static_cast<int>(take);
          page = end_page;
          ++split;
        }
        break;
      }
    }
    md[kMdEndReq] = end_req;
    md[kMdEndPage] = end_page;
  }
  for (int i = 0; i < batch; ++i) num_splits[i + 1] += num_splits[i];
}

}  // namespace jax_flashmla
