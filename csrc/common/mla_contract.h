// The decode contract shared by the CPU handler and the CUDA kernels: fixed sizes of the MLA layout,
// the layout of the tile-scheduler metadata, and the scheduler's rule. The rule is written once as
// host/device functions so the CPU path exercises exactly the split plan the GPU kernel runs.
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
constexpr int kMaxSmParts = 65535;  // the decode grid's z dimension (CUDA's limit) holds the parts
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

// Split-accumulator slots. Only the pieces of split requests use slots: piece `split` of request
// `req` takes slot 2 E + split, where E = num_splits[req] - req counts the pieces beyond one per
// request of the requests before it. A split request of n >= 2 pieces adds n - 1 >= n / 2 to E, so
// its n slots end before the next split request's first. Each boundary between two parts falls
// inside at most one request, so E <= num_sm_parts - 1 over the whole batch and every slot is below
// 2 (num_sm_parts - 1): the workspace depends on the part count, not on the batch.
JFM_HOST_DEVICE inline int max_accum_slots(int num_sm_parts) { return num_sm_parts > 1 ? 2 * (num_sm_parts - 1) : 1; }
JFM_HOST_DEVICE inline long long accum_slot(const int32_t* num_splits, int req, int split) {
  return 2LL * (num_splits[req] - req) + split;
}

// Pages a request of `seqlen` tokens occupies (seqlen < 0 counts as 0); no overflow up to INT32_MAX.
JFM_HOST_DEVICE inline int pages_of(int seqlen) { return seqlen > 0 ? (seqlen - 1) / kPageSize + 1 : 0; }

// The split plan. Every request is a run of pages_of(len) + kPieceOverheadPages cost units on one
// line, requests in order, its overhead units first; part p takes the units [p W, p W + W), W =
// ceil(total / num_parts), so every part gets the same cost. A request has one piece in each part
// that holds some of its page units (an empty request: the part that holds its first unit), split
// at the part boundaries. Every unit a part holds decides its plan alone, so the device computes the
// plan with one thread per request (cuda/metadata/metadata.cu) and the host with the loop of schedule_tiles;
// both call plan_request below, the one statement of the rule.

// The units a request claims, [lo, hi]: its page units, or for an empty request its first unit.
struct RequestUnits {
  long long lo, hi;
};

JFM_HOST_DEVICE inline RequestUnits request_units(long long start, int pages) {
  if (pages == 0) return {start, start};
  return {start + kPieceOverheadPages, start + kPieceOverheadPages + pages - 1};
}

// Units per part, from the total cost of all requests (at least 1).
JFM_HOST_DEVICE inline long long part_width(long long total, int num_parts) {
  return total > 0 ? (total + num_parts - 1) / num_parts : 1;
}

// A tile_md row before any request writes it: an empty part (begin_req > end_req).
JFM_HOST_DEVICE inline int32_t empty_part_field(int field, int batch) {
  return field == kMdBeginReq ? batch : field == kMdEndReq ? -1 : 0;
}

// Request `req` (`pages` pages, claiming `units`) writes the begin fields of the parts that begin
// with it and the end fields of the parts that end with it; returns its number of pieces. prev_hi is
// the previous request's units.hi (-1 for the first request), next_lo the next one's units.lo (-1
// for the last request). Each field of tile_md is written by exactly one request.
JFM_HOST_DEVICE inline int plan_request(int req, int pages, RequestUnits units, long long prev_hi, long long next_lo,
                                        long long width, int num_parts, int32_t* tile_md) {
  const long long first = units.lo / width, last = units.hi / width;
  // Parts whose first unit lies in (prev_hi, units.hi] begin with this request.
  for (long long part = (prev_hi + width) / width; part <= last; ++part) {
    int32_t* md = tile_md + part * kTileMetadataSize;
    md[kMdBeginReq] = req;
    md[kMdBeginPage] = pages > 0 ? static_cast<int32_t>(part * width > units.lo ? part * width - units.lo : 0) : 0;
    md[kMdBeginSplit] = static_cast<int32_t>(part - first);
  }
  // Parts whose last unit lies in [units.lo, next_lo) end with it; the last request ends every part
  // from its own on.
  const long long end_last = next_lo < 0 ? num_parts - 1 : next_lo / width - 1;
  for (long long part = first; part <= end_last; ++part) {
    int32_t* md = tile_md + part * kTileMetadataSize;
    md[kMdEndReq] = req;
    const long long end_unit = (part + 1) * width;  // exclusive
    md[kMdEndPage] = pages > 0 ? static_cast<int32_t>(end_unit - units.lo < pages ? end_unit - units.lo : pages) : 0;
  }
  return static_cast<int>(last - first + 1);
}

// Cost units of a request of `seqlen` tokens on the plan's line.
JFM_HOST_DEVICE inline int request_cost(int seqlen) { return pages_of(seqlen) + kPieceOverheadPages; }

// Plans the run of requests [begin, end), whose first request starts at cost unit `start`: writes
// their tile_md fields and each one's number of pieces to pieces[i]; returns the run's pieces. The
// host plans the whole batch as one run, the metadata kernel one run per thread.
JFM_HOST_DEVICE inline int plan_requests(const int32_t* seqlens, int batch, int begin, int end, long long start,
                                         long long width, int num_parts, int32_t* tile_md, int32_t* pieces) {
  long long prev_hi = -1;
  if (begin > 0) prev_hi = request_units(start - request_cost(seqlens[begin - 1]), pages_of(seqlens[begin - 1])).hi;
  int run_pieces = 0;
  for (int i = begin; i < end; ++i) {
    const int pages = pages_of(seqlens[i]);
    const RequestUnits units = request_units(start, pages);
    start += request_cost(seqlens[i]);
    const long long next_lo = i + 1 < batch ? request_units(start, pages_of(seqlens[i + 1])).lo : -1;
    pieces[i] = plan_request(i, pages, units, prev_hi, next_lo, width, num_parts, tile_md);
    run_pieces += pieces[i];
    prev_hi = units.hi;
  }
  return run_pieces;
}

// The whole plan on the host: tile_md[num_parts][8] and num_splits[batch + 1] (prefix sums of the
// pieces of each request). Every request gets at least one piece, zero-length ones included, so
// that every output row is written.
inline void schedule_tiles(const int32_t* seqlens, int batch, int num_parts, int32_t* tile_md, int32_t* num_splits) {
  long long total = 0;
  for (int i = 0; i < batch; ++i) total += request_cost(seqlens[i]);
  const long long width = part_width(total, num_parts);
  for (int f = 0; f < num_parts * kTileMetadataSize; ++f) tile_md[f] = empty_part_field(f % kTileMetadataSize, batch);
  num_splits[0] = 0;
  plan_requests(seqlens, batch, 0, batch, 0, width, num_parts, tile_md, num_splits + 1);
  for (int i = 0; i < batch; ++i) num_splits[i + 1] += num_splits[i];
}

}  // namespace jax_flashmla
