#!/usr/bin/env python3
"""Sparse FP8 decode benchmark: the sparse matrix, the dense FP8 rows, and FlashMLA side by side.

flash_mla_with_kvcache in its sparse mode (indices into an FP8 pool filled with
jax_flashmla.quantize_kv_cache) over three suites, timed with mla_bench's machinery (profiler
device times, the L2 flushed before each iteration) against the same run's copy bandwidth and
matmul:

  v32   DeepSeek-V3.2 pools (656-byte tokens, d_qk 576, pages of 64): b 64/128, h_q 128/64/32/16,
        s_q 1/2, s_k 32768, topk 2048
  v4    DeepSeek-V4 pools (584-byte tokens, d_qk 512): topk 128 in pages of 256 plus an extra pool
        read through 512 or 1024 more indices in pages of 64, s_k and extra s_k 16384; b 64/128,
        h_q 128/64/32/16, s_q 2
  peak  topk 16384 over s_k 32768, b 148, s_q 2, h_q 64/128, both formats

--dense-fp8 adds the dense FP8 decode (a V3.2 pool, pages of 64) against the bf16 dense kernel on
the same requests of the standard matrix; --flashmla times FlashMLA's own sparse decode on the same
inputs in the same process (a `flash_mla` build and torch must be importable; tools/flashmla_build.sh).
Columns and method: benchmarks/README.md.

  python3 benchmarks/bench_sparse.py                                 # the three suites
  python3 benchmarks/bench_sparse.py --suite v32 --cases h_q=16/32    # a subset
  python3 benchmarks/bench_sparse.py --flashmla                       # FlashMLA side by side
  python3 benchmarks/bench_sparse.py --dense-fp8 --suite none         # only the dense FP8 rows
  python3 benchmarks/bench_sparse.py --smoke                          # tiny sizes; runs on the CPU
  python3 benchmarks/bench_sparse.py --json out.json --markdown       # save; print markdown tables
  python3 benchmarks/bench_sparse.py --from-json out.json --markdown  # re-render saved results
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # mla_bench beside this file
import mla_bench  # noqa: E402

jfm = mla_bench.jfm
testing = mla_bench.testing

HEAD_DIM_V = 512
D_QK = {"v32": 576, "model1": 512}
# FlashMLA's count of a retrieved token's bytes (tests/lib.py, count_flop_and_mem_vol_for_decode):
# 656 for V3.2 and 576 for MODEL1, whose scale record (8 bytes a token) it leaves out.
FLASHMLA_TOKEN_BYTES = {"v32": 656, "model1": 576}
# The bytes a token takes in the pool, scales included (kv_formats' token_bytes): the KV GB/s column.
TOKEN_BYTES = {"v32": 656, "model1": 584}
FLASHMLA_HEADS = (64, 128)  # the head counts FlashMLA's SM90 sparse decode runs


@dataclasses.dataclass(frozen=True)
class SparseCase:
    suite: str
    fmt: str  # "v32" or "model1" (kv_formats' names)
    b: int
    h_q: int
    s_q: int
    s_k: int  # lengths ~ Normal(s_k, s_k / 2), at least s_q
    topk: int
    page: int
    extra_topk: int = 0  # 0: no extra pool
    extra_s_k: int = 0
    extra_page: int = 0

    @property
    def d_qk(self) -> int:
        return D_QK[self.fmt]

    @property
    def flashmla_h_q(self) -> int:
        """The head count FlashMLA runs this case at: h_q padded up to 64 or 128."""
        return next((h for h in FLASHMLA_HEADS if h >= self.h_q), self.h_q)

    @property
    def topk_label(self) -> str:
        return f"{self.topk}+{self.extra_topk}" if self.extra_topk else str(self.topk)

    @property
    def name(self) -> str:
        extra = f" extra={self.extra_topk}/s_k {self.extra_s_k}/page {self.extra_page}" if self.extra_topk else ""
        return (f"{self.suite}: {self.fmt} b={self.b} h_q={self.h_q} s_q={self.s_q} s_k={self.s_k} "
                f"topk={self.topk} page={self.page}{extra}")


# Each suite: grid axes (lists) and fixed fields. Cases run in the order b, s_k, ... outermost, so
# that one pool serves consecutive cases.
SUITES = {
    "v32": dict(fmt=["v32"], b=[64, 128], h_q=[128, 64, 32, 16], s_q=[1, 2], s_k=[32768], topk=[2048], page=[64],
                extra_topk=[0]),
    "v4": dict(fmt=["model1"], b=[64, 128], h_q=[128, 64, 32, 16], s_q=[2], s_k=[16384], topk=[128], page=[256],
               extra_topk=[512, 1024], fixed=dict(extra_s_k=16384, extra_page=64)),
    "peak": dict(fmt=["v32", "model1"], b=[148], h_q=[128, 64], s_q=[2], s_k=[32768], topk=[16384], page=[64],
                 extra_topk=[0]),
}
SMOKE_SUITES = {
    "v32": dict(fmt=["v32"], b=[2], h_q=[64, 16], s_q=[1, 2], s_k=[300], topk=[64], page=[64], extra_topk=[0]),
    "v4": dict(fmt=["model1"], b=[2], h_q=[16], s_q=[2], s_k=[300], topk=[16], page=[256], extra_topk=[32],
               fixed=dict(extra_s_k=200, extra_page=64)),
    "peak": dict(fmt=["v32"], b=[3], h_q=[64], s_q=[2], s_k=[256], topk=[128], page=[64], extra_topk=[0]),
}
FILTER_KEYS = ("b", "h_q", "s_q", "s_k", "topk", "page", "extra_topk", "d_qk")
ADDABLE = ("b", "h_q", "s_q", "s_k", "topk")  # a filter value outside the grid adds it on these axes


def select_sparse_cases(suites: dict, names, flt: dict) -> list[SparseCase]:
    """The cases of the named suites that pass `flt` (parse_filter's form over FILTER_KEYS); a value
    outside a suite's grid on an ADDABLE axis adds it (e.g. h_q=8)."""
    cases = []
    for suite in names:
        grid = dict(suites[suite])
        fixed = grid.pop("fixed", {})
        axes = {k: list(v) + sorted(flt[k] - set(v)) if k in ADDABLE and k in flt else v for k, v in grid.items()}
        for fmt in axes["fmt"]:
            for b in axes["b"]:
                for s_k in axes["s_k"]:
                    for page in axes["page"]:
                        for extra_topk in axes["extra_topk"]:
                            for topk in axes["topk"]:
                                for h_q in axes["h_q"]:
                                    for s_q in axes["s_q"]:
                                        extra = fixed if extra_topk else {}
                                        c = SparseCase(suite, fmt, b, h_q, s_q, s_k, topk, page, extra_topk, **extra)
                                        if all(getattr(c, k) in v for k, v in flt.items()):
                                            cases.append(c)
    return cases


def sparse_flops_and_bytes(case: SparseCase, unique_tokens: int) -> dict:
    """FlashMLA's counts for a sparse decode call (tests/lib.py, count_flop_and_mem_vol_for_decode):

      flops    = 2 h_q (b s_q (topk + extra_topk)) (d_qk + 512): every index entry attended, -1 too
      bytes    = 2 b s_q h_q d_qk (q) + unique_tokens * (656 | 576) + 2 b s_q h_q 512 (out), with
                 unique_tokens the distinct valid slot ids over the whole call, per pool (FlashMLA's
                 count also takes -1 for one token, a difference of a token or two)
      kv_bytes = b s_q (topk + extra_topk) * (656 | 584): each selected token's pool bytes once per
                 query token (what the gather reads; the anchors' "KV GB/s")."""
    attended = case.b * case.s_q * (case.topk + case.extra_topk)
    rows = case.b * case.s_q * case.h_q
    return {
        "flops": 2 * case.h_q * attended * (case.d_qk + HEAD_DIM_V),
        "bytes": 2 * rows * case.d_qk + unique_tokens * FLASHMLA_TOKEN_BYTES[case.fmt] + 2 * rows * HEAD_DIM_V,
        "kv_bytes": attended * TOKEN_BYTES[case.fmt],
        "attended_tokens": attended,
        "unique_tokens": unique_tokens,
    }


def dense_fp8_bytes(lengths, b, s_q, h_q) -> int:
    """FlashMLA's dense byte count with the V3.2 pool's 656 bytes a token in place of bf16's 1152."""
    total = int(np.sum(lengths, dtype=np.int64))
    return total * TOKEN_BYTES["v32"] + 2 * b * s_q * h_q * (576 + HEAD_DIM_V)


# ==== problems ====================================================================================

def fp8_pool(jax, fmt: str, num_blocks: int, page: int, key, chunk_tokens: int = 1 << 20):
    """A uint8 pool of `fmt`: standard-normal bf16 tokens made on the device and quantised with
    jax_flashmla.quantize_kv_cache, in chunks of pages (the bf16 tokens of a whole pool would take
    twice its bytes and more)."""
    import jax.numpy as jnp
    per = max(1, chunk_tokens // page)
    parts = []
    for start in range(0, num_blocks, per):
        n = min(per, num_blocks - start)
        kv = jax.random.normal(jax.random.fold_in(key, start), (n, page, 1, D_QK[fmt]), jnp.bfloat16)
        parts.append(jax.block_until_ready(jfm.quantize_kv_cache(kv, fmt, dtype=jnp.uint8)))
        del kv
    return parts[0] if len(parts) == 1 else jax.block_until_ready(jnp.concatenate(parts))


class SparsePool:
    """The FP8 pool of one (fmt, b, s_k, page): per-request lengths ~ Normal(s_k, s_k / 2) (at least
    min_len; FlashMLA's draw), each request's pages taken from a random permutation of a pool that
    holds exactly the pages in use."""

    def __init__(self, jax, fmt, b, s_k, page, min_len, seed, salt=0):
        rng = np.random.default_rng([seed, s_k, page, salt])
        self.fmt, self.page = fmt, page
        self.lengths = testing.varlen_lengths(rng, b, s_k, min_len)
        pages = -(-self.lengths.astype(np.int64) // page)
        self.num_blocks = max(int(pages.sum()), 1)
        ids = rng.permutation(self.num_blocks)
        self.block_table = np.zeros((b, max(int(pages.max()), 1)), np.int64)
        starts = np.concatenate([[0], np.cumsum(pages)])
        for i, n in enumerate(pages):
            self.block_table[i, :n] = ids[starts[i]:starts[i + 1]]
        self.pool = fp8_pool(jax, fmt, self.num_blocks, page, jax.random.PRNGKey(seed * 7919 + s_k + 31 * salt))

    def indices(self, rng, s_q: int, topk: int) -> np.ndarray:
        """int32 [b, s_q, topk] global slot ids: for each query token, topk distinct random positions
        of its request (all of them, then -1, where the request is shorter), mapped through the
        request's pages."""
        b = self.lengths.shape[0]
        out = np.full((b, s_q, topk), -1, np.int64)
        for i, n in enumerate(self.lengths):
            for s in range(s_q):
                pos = rng.permutation(int(n))[:topk]
                out[i, s, :pos.size] = self.block_table[i, pos // self.page] * self.page + pos % self.page
        return out.astype(np.int32)

    @property
    def nbytes(self) -> int:
        return int(self.pool.size)


def unique_valid(*index_arrays) -> int:
    """Distinct valid (>= 0) slot ids of each array, summed over the arrays (one per pool)."""
    return sum(int(np.unique(a[a >= 0]).size) for a in index_arrays if a is not None)


# ==== FlashMLA in the same process ================================================================

def torch_pool(torch, pool, fmt: str, page: int):
    """FlashMLA's view of one of our pools, sharing its memory (DLPack): v32 as it is
    ([num_blocks, page, 1, 656]); model1 as [num_blocks, page, 1, 584] with the page's bytes as the
    page stride (kv_formats' module docstring)."""
    t = torch.from_dlpack(pool)
    if fmt == "v32":
        return t
    num_blocks, rows = t.shape[0], t.shape[1]
    page_bytes = rows * t.shape[3]
    flat = t.reshape(num_blocks, page_bytes)
    return flat.as_strided((num_blocks, page, 1, TOKEN_BYTES["model1"]),
                           (page_bytes, TOKEN_BYTES["model1"], TOKEN_BYTES["model1"], 1))


class FlashMLACall:
    """FlashMLA's sparse decode on our inputs: q (and the sink) padded with zero heads up to 64 or 128,
    the pools and indices shared through DLPack, the plan made by the first (untimed) call."""

    def __init__(self, flash_mla, torch, case: SparseCase, q, pool, indices, sink, extra_pool, extra_indices, scale):
        import jax.numpy as jnp
        self.torch, self.h_q = torch, case.h_q
        pad = case.flashmla_h_q - case.h_q
        if pad:
            q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
            sink = None if sink is None else jnp.pad(sink, (0, pad))
        q, sink = (None if x is None else x.block_until_ready() for x in (q, sink))
        self._keep = (q, sink)  # the JAX buffers the torch views share
        args = dict(q=torch.from_dlpack(q), k_cache=torch_pool(torch, pool.pool, case.fmt, case.page),
                    indices=torch.from_dlpack(indices), attn_sink=None if sink is None else torch.from_dlpack(sink))
        if extra_pool is not None:
            args["extra_k_cache"] = torch_pool(torch, extra_pool.pool, case.fmt, case.extra_page)
            args["extra_indices_in_kvcache"] = torch.from_dlpack(extra_indices)
        meta, _ = flash_mla.get_mla_metadata()

        def call():
            return flash_mla.flash_mla_with_kvcache(
                args["q"], args["k_cache"], None, None, HEAD_DIM_V, meta, None, scale, False, True, args["indices"],
                args["attn_sink"], args.get("extra_k_cache"), args.get("extra_indices_in_kvcache"), None, None)
        self.call = call
        torch.cuda.synchronize()

    def out(self):
        """The first h_q heads of FlashMLA's out, as float32 numpy."""
        out, _ = self.call()
        return out[:, :, :self.h_q].float().cpu().numpy()

    def sync(self, _=None):
        self.torch.cuda.synchronize()


# ==== the measurements ============================================================================

def run_sparse(jax, timer, settings, cases, opts, fm=None, on_row=None) -> list[dict]:
    """One record per case; `fm` = (flash_mla, torch) adds FlashMLA's time on the same inputs."""
    import jax.numpy as jnp

    def bench_sparse_call(q, k_cache, indices, attn_sink, extra_k_cache, extra_indices):
        return jfm.flash_mla_with_kvcache(q, k_cache, None, None, HEAD_DIM_V, None, None, is_fp8_kvcache=True,
                                          indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
                                          extra_indices_in_kvcache=extra_indices)
    call_fn = jax.jit(bench_sparse_call)

    results = []
    groups = collections.OrderedDict()
    for c in cases:
        groups.setdefault((c.fmt, c.b, c.s_k, c.page, c.extra_s_k, c.extra_page), []).append(c)
    min_len = max((c.s_q for c in cases), default=1)
    for (fmt, b, s_k, page, extra_s_k, extra_page), group in groups.items():
        pool = SparsePool(jax, fmt, b, s_k, page, min_len, settings.seed)
        extra_pool = None
        if any(c.extra_topk for c in group):
            extra_pool = SparsePool(jax, fmt, b, extra_s_k, extra_page, min_len, settings.seed, salt=1)
        print(f"\n[pool] {fmt} b={b} s_k={s_k} page={page}: sum(len)={int(pool.lengths.sum())}, {pool.num_blocks} "
              f"pages ({pool.nbytes / 2**30:.2f} GiB)" + ("" if extra_pool is None else
              f"; extra s_k={extra_s_k} page={extra_page}: {extra_pool.num_blocks} pages "
              f"({extra_pool.nbytes / 2**30:.2f} GiB)"))
        for c in group:
            rng = np.random.default_rng([settings.seed, c.b, c.h_q, c.s_q, c.topk, c.extra_topk, c.page])
            idx_np = pool.indices(rng, c.s_q, c.topk)
            extra_np = extra_pool.indices(rng, c.s_q, c.extra_topk) if c.extra_topk else None
            key = jax.random.PRNGKey(c.h_q * 10 + c.s_q)
            q = jax.random.normal(key, (c.b, c.s_q, c.h_q, c.d_qk), jnp.bfloat16)
            sink = None if opts.no_sink else jax.random.normal(jax.random.fold_in(key, 1), (c.h_q,), jnp.float32)
            indices = jnp.asarray(idx_np)
            extra_indices = None if extra_np is None else jnp.asarray(extra_np)
            args = (q, pool.pool, indices, sink, None if extra_np is None else extra_pool.pool, extra_indices)
            call = lambda: call_fn(*args)  # noqa: E731
            out, _ = jax.block_until_ready(call())
            dev = timer.device_ms([("sparse", call, settings.iters, "bench_sparse_call")])

            rec = dataclasses.asdict(c)
            rec.update(d_qk=c.d_qk, sum_len=int(pool.lengths.sum()), path=mla_bench.lowered_path(call_fn, *args),
                       attn_sink=sink is not None)
            rec.update(sparse_flops_and_bytes(c, unique_valid(idx_np, extra_np)))
            t = dev.get("sparse")
            if t is not None:
                rec.update(kernel_ms=mla_bench.median(t.span_ms), kernel_min_ms=min(t.span_ms),
                           kernel_iters=len(t.span_ms), kernel_events=dict(t.names),
                           kernel_parts_ms={n: mla_bench.median(v) for n, v in t.name_ms.items()}, src="trace")
            else:
                wall = timer.wall_ms(call, settings.iters)
                rec.update(kernel_ms=mla_bench.median(wall), kernel_min_ms=min(wall), kernel_iters=len(wall),
                           src="wall")
            seconds = rec["kernel_ms"] * 1e-3
            rec.update(tflops=rec["flops"] / seconds / 1e12, gbps=rec["bytes"] / seconds / 1e9,
                       kv_gbps=rec["kv_bytes"] / seconds / 1e9)
            if fm is not None:
                rec.update(side_by_side(jax, fm, c, call, out, q, pool, indices, sink, extra_pool, extra_indices,
                                        opts))
            results.append(rec)
            if on_row is not None:
                on_row(rec, c is cases[0])
            del out
        del pool, extra_pool
    return results


def side_by_side(jax, fm, case, call, out, q, pool, indices, sink, extra_pool, extra_indices, opts) -> dict:
    """Our call and FlashMLA's on the same inputs, timed alike (interleaved_wall_ms); FlashMLA at h_q
    padded to 64 or 128. Returns the record's fm_* fields, or fm_error."""
    flash_mla, torch = fm
    try:
        theirs = FlashMLACall(flash_mla, torch, case, q, pool, indices, sink, extra_pool, extra_indices,
                              case.d_qk ** -0.5)
        diff = mla_bench.cos_diff(np.asarray(out, np.float32), theirs.out())
        times = mla_bench.interleaved_wall_ms({"ours": (call, jax.block_until_ready),
                                               "flashmla": (theirs.call, theirs.sync)},
                                              opts.sbs_calls, opts.sbs_repeats)
    except Exception as e:  # noqa: BLE001  (a case FlashMLA refuses or fails: the row keeps ours)
        return {"fm_error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    ours, fm_ms = mla_bench.median(times["ours"]), mla_bench.median(times["flashmla"])
    return {"fm_h_q": case.flashmla_h_q, "ours_wall_ms": ours, "fm_wall_ms": fm_ms, "fm_over_ours": fm_ms / ours,
            "cos_diff_vs_flashmla": diff, "sbs_calls": opts.sbs_calls, "sbs_repeats": opts.sbs_repeats}


def run_dense_fp8(jax, timer, settings, cases, on_row=None) -> list[dict]:
    """The dense FP8 decode (V3.2 pool of the bf16 cache, quantised) against the bf16 dense kernel on the
    same requests (mla_bench's standard-matrix pools; the plan of the bf16 call made outside)."""
    import jax.numpy as jnp

    def bench_bf16_call(q, k_cache, block_table, cache_seqlens, tile_md, num_splits):
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_md, num_splits,
                                          causal=True)

    def bench_fp8_call(q, k_cache, block_table, cache_seqlens):
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, None, None, causal=True,
                                          is_fp8_kvcache=True)
    bf16_fn, fp8_fn = jax.jit(bench_bf16_call), jax.jit(bench_fp8_call)

    results = []
    min_len = max((c.s_q for c in cases), default=1)
    by_pool = collections.OrderedDict()
    for c in cases:
        by_pool.setdefault((c.b, c.s_k), []).append(c)
    for (b, s_k), group in by_pool.items():
        pool = mla_bench.Pool(jax, b, s_k, 1, min_len, settings.seed)
        fp8 = jax.block_until_ready(jfm.quantize_kv_cache(pool.cache, "v32", dtype=jnp.uint8))
        print(f"\n[dense pool] b={b} s_k={s_k}: sum(len)={int(pool.lengths.sum())}, {pool.num_blocks} pages "
              f"(bf16 {pool.nbytes / 2**30:.2f} GiB, fp8 {fp8.size / 2**30:.2f} GiB)")
        for c in group:
            q = jax.random.normal(jax.random.PRNGKey(c.h_q * 10 + c.s_q), (c.b, c.s_q, c.h_q, 576), jnp.bfloat16)
            md = jax.block_until_ready(jfm.get_mla_metadata(pool.cache_seqlens, c.s_q * c.h_q, 1))
            bf16 = lambda: bf16_fn(q, pool.cache, pool.block_table, pool.cache_seqlens, *md)  # noqa: E731
            fp8_call = lambda: fp8_fn(q, fp8, pool.block_table, pool.cache_seqlens)  # noqa: E731
            out_bf16, _ = jax.block_until_ready(bf16())
            out_fp8, _ = jax.block_until_ready(fp8_call())
            dev = timer.device_ms([("bf16", bf16, settings.iters, "bench_bf16_call"),
                                   ("fp8", fp8_call, settings.iters, "bench_fp8_call")])
            rec = {"b": c.b, "s_k": c.s_k, "h_q": c.h_q, "s_q": c.s_q, "sum_len": int(pool.lengths.sum()),
                   "path": mla_bench.lowered_path(fp8_fn, q, fp8, pool.block_table, pool.cache_seqlens)}
            for side, fn in (("bf16", bf16), ("fp8", fp8_call)):
                t = dev.get(side)
                if t is not None:
                    rec[f"{side}_ms"], rec[f"{side}_src"] = mla_bench.median(t.span_ms), "trace"
                else:
                    rec[f"{side}_ms"], rec[f"{side}_src"] = mla_bench.median(timer.wall_ms(fn, settings.iters)), "wall"
            flops, bf16_bytes = mla_bench.flops_and_bytes(pool.lengths, c.b, c.s_q, c.h_q, 1)
            fp8_bytes = dense_fp8_bytes(pool.lengths, c.b, c.s_q, c.h_q)
            rec.update(flops=flops, bf16_bytes=bf16_bytes, fp8_bytes=fp8_bytes,
                       fp8_over_bf16=rec["fp8_ms"] / rec["bf16_ms"],
                       target=0.62 if c.h_q * c.s_q <= 32 else 1.0,
                       bf16_tflops=flops / (rec["bf16_ms"] * 1e-3) / 1e12,
                       fp8_tflops=flops / (rec["fp8_ms"] * 1e-3) / 1e12,
                       bf16_gbps=bf16_bytes / (rec["bf16_ms"] * 1e-3) / 1e9,
                       fp8_gbps=fp8_bytes / (rec["fp8_ms"] * 1e-3) / 1e9,
                       cos_diff_fp8_vs_bf16=mla_bench.cos_diff(np.asarray(out_fp8, np.float32), np.asarray(out_bf16, np.float32)))
            rec["meets_target"] = rec["fp8_over_bf16"] <= rec["target"]
            results.append(rec)
            if on_row is not None:
                on_row(rec, c is cases[0])
        del pool, fp8
    return results


# ==== the report ==================================================================================

SPARSE_COLUMNS = [
    ("suite", "suite", "s"), ("fmt", "fmt", "s"), ("b", "b", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"),
    ("topk", "topk_label", "s"), ("ms", "kernel_ms", ".4f"), ("TFLOPS", "tflops", "num"), ("GB/s", "gbps", "num"),
    ("KV GB/s", "kv_gbps", "num"), ("BW%", "bw_pct", ".1f"), ("FLOP%", "flop_pct", ".1f"), ("src", "src", "s"),
    ("path", "path", "s"),
]
SBS_COLUMNS = [("ours wall ms", "ours_wall_ms", ".4f"), ("FM h_q", "fm_h_q", "d"), ("FM wall ms", "fm_wall_ms", ".4f"),
               ("FM/ours", "fm_over_ours", ".3f"), ("cos_diff FM", "cos_diff_vs_flashmla", ".1e")]
DENSE_COLUMNS = [
    ("s_k", "s_k", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"), ("bf16 ms", "bf16_ms", ".4f"),
    ("fp8 ms", "fp8_ms", ".4f"), ("fp8/bf16", "fp8_over_bf16", ".3f"), ("target", "target", ".2f"),
    ("ok", "meets_target", "s"), ("fp8 GB/s", "fp8_gbps", "num"), ("fp8 BW%", "fp8_bw_pct", ".1f"),
    ("fp8 TFLOPS", "fp8_tflops", "num"), ("cos_diff", "cos_diff_fp8_vs_bf16", ".1e"), ("path", "path", "s"),
]


def with_ratios(rec: dict, baselines: dict | None) -> dict:
    """The record plus its rates over the same run's copy bandwidth (BW%) and matmul (FLOP%)."""
    row = dict(rec)
    copy = (baselines or {}).get("copy", {}).get("gbps")
    mm = (baselines or {}).get("matmul", {}).get("tflops")
    if "kernel_ms" in rec:  # a sparse row
        row["topk_label"] = f"{rec['topk']}+{rec['extra_topk']}" if rec.get("extra_topk") else str(rec["topk"])
        if rec.get("gbps") and copy:
            row["bw_pct"] = 100 * rec["gbps"] / copy
        if rec.get("tflops") and mm:
            row["flop_pct"] = 100 * rec["tflops"] / mm
    elif rec.get("fp8_gbps") and copy:
        row["fp8_bw_pct"] = 100 * rec["fp8_gbps"] / copy
    return row


def sparse_columns(records):
    return SPARSE_COLUMNS + (SBS_COLUMNS if any("fm_wall_ms" in r or "fm_error" in r for r in records) else [])


def table(records, columns, baselines, markdown=False) -> str:
    return mla_bench.table([with_ratios(r, baselines) for r in records], columns, markdown)


def summary_lines(report: dict) -> list[str]:
    """The side-by-side's geomean and minimum of FlashMLA/ours per group (h_q 64/128 and h_q below 64),
    and the dense FP8 rows against their targets."""
    out = []
    sbs = [r for r in report.get("sparse", []) if r.get("fm_over_ours")]
    for label, keep in (("h_q 64/128", lambda r: r["h_q"] in FLASHMLA_HEADS),
                        ("h_q < 64 (FlashMLA padded to 64)", lambda r: r["h_q"] < 64)):
        rows = [r for r in sbs if keep(r)]
        if rows:
            worst = min(rows, key=lambda r: r["fm_over_ours"])
            out.append(f"FlashMLA/ours, {label}: geomean {mla_bench.geomean([r['fm_over_ours'] for r in rows]):.3f} over "
                       f"{len(rows)} rows, min {worst['fm_over_ours']:.3f} ({worst['fmt']} b={worst['b']} "
                       f"h_q={worst['h_q']} s_q={worst['s_q']} topk {worst['topk']}+{worst['extra_topk']})")
    failed = [r for r in report.get("sparse", []) if r.get("fm_error")]
    if failed:
        out.append(f"FlashMLA failed on {len(failed)} rows, first: {failed[0]['fm_error']}")
    dense = report.get("dense_fp8", [])
    if dense:
        misses = [r for r in dense if not r["meets_target"]]
        out.append(f"dense FP8 / bf16: {len(dense) - len(misses)} of {len(dense)} rows within target "
                   f"(0.62 where h_q*s_q <= 32, else 1.0)" +
                   ("" if not misses else "; misses: " + ", ".join(
                       f"s_k={r['s_k']} h_q={r['h_q']} s_q={r['s_q']} {r['fp8_over_bf16']:.3f}" for r in misses)))
    return out


def render(report: dict, markdown: bool) -> str:
    env, base = report.get("env", {}), report.get("baselines", {})
    lines = [f"Device: {env.get('device')} | jax {env.get('jax')} | {env.get('date')}"]
    if base:
        lines.append(mla_bench.baselines_line(base))
    if report.get("flashmla"):
        lines.append(f"FlashMLA: {report['flashmla']}")
    if report.get("sparse"):
        lines += ["", "Sparse FP8 decode:", table(report["sparse"], sparse_columns(report["sparse"]), base, markdown)]
    if report.get("dense_fp8"):
        lines += ["", "Dense FP8 decode against the bf16 dense kernel, same requests:",
                  table(report["dense_fp8"], DENSE_COLUMNS, base, markdown)]
    summary = summary_lines(report)
    if summary:
        lines += [""] + summary
    return "\n".join(lines)


# ==== the command line ============================================================================

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--suite", default="all", help="comma-separated suites: v32, v4, peak, all, none (default all)")
    p.add_argument("--cases", help=f"filter, e.g. 'h_q=16/32,s_q=2' (keys {', '.join(FILTER_KEYS)}; a value of "
                                   f"{'/'.join(ADDABLE)} outside a suite adds it)")
    mla_bench.add_settings_args(p)
    p.add_argument("--no-sink", action="store_true", help="no attn_sink (FlashMLA's timed cases have one)")
    p.add_argument("--dense-fp8", action="store_true",
                   help="add the dense FP8 decode against the bf16 dense kernel over the standard matrix")
    p.add_argument("--dense-cases", help="filter of the dense rows (mla_bench's keys b, s_k, h_q, s_q)")
    p.add_argument("--flashmla", action="store_true",
                   help="time FlashMLA's sparse decode on the same inputs in this process (flash_mla and torch)")
    p.add_argument("--sbs-calls", type=int, default=30, help="side by side: back-to-back calls per timing")
    p.add_argument("--sbs-repeats", type=int, default=7, help="side by side: alternating repeats (median)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU in seconds)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print markdown tables at the end")
    p.add_argument("--from-json", help="print the tables of a saved --json file and exit (no measuring)")
    return p


def suite_names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if "all" in names:
        return list(SUITES)
    bad = [s for s in names if s not in SUITES and s != "none"]
    if bad:
        raise ValueError(f"unknown suite {bad[0]!r} (v32, v4, peak, all, none)")
    return [s for s in names if s != "none"]


def plan(args):
    """(sparse cases, dense cases) of the command line; ValueError naming the bad option."""
    try:
        names = suite_names(args.suite)
    except ValueError as e:
        raise ValueError(f"--suite: {e}") from None
    try:
        sparse = select_sparse_cases(SMOKE_SUITES if args.smoke else SUITES, names,
                                     mla_bench.parse_filter(args.cases, FILTER_KEYS))
    except ValueError as e:
        raise ValueError(f"--cases: {e}") from None
    dense = []
    if args.dense_fp8:
        try:
            flt = mla_bench.parse_filter(args.dense_cases, ("b", "s_k", "h_q", "s_q"))
        except ValueError as e:
            raise ValueError(f"--dense-cases: {e}") from None
        dense = mla_bench.select_cases(mla_bench.SMOKE if args.smoke else mla_bench.STANDARD, flt)
    return sparse, dense


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if mla_bench.replay(args, render):
        return 0
    try:
        sparse_cases, dense_cases = plan(args)
    except ValueError as e:
        raise SystemExit(str(e))
    settings = mla_bench.settings_from(args, no_ref=True)

    import jax
    report = mla_bench.start_report(jax, args, settings, suite=args.suite, cases=args.cases,
                                    dense_cases=args.dense_cases if args.dense_fp8 else None)

    fm = mla_bench.open_flashmla(report, args.sbs_calls, args.sbs_repeats) if args.flashmla else None
    timer = mla_bench.Timer(jax, settings)
    report["baselines"] = mla_bench.run_baselines(jax, timer, settings)

    def printer(columns):
        def on_row(rec, first):
            text = table([rec], columns, report["baselines"]).splitlines()
            print("\n".join(text if first else text[1:]))
        return on_row

    if sparse_cases:
        print(f"\n[sparse] {len(sparse_cases)} cases")
        cols = SPARSE_COLUMNS + (SBS_COLUMNS if fm else [])
        report["sparse"] = run_sparse(jax, timer, settings, sparse_cases, args, fm, on_row=printer(cols))
    if dense_cases:
        print(f"\n[dense fp8] {len(dense_cases)} cases")
        report["dense_fp8"] = run_dense_fp8(jax, timer, settings, dense_cases, on_row=printer(DENSE_COLUMNS))
    return mla_bench.finish_report(args, report, render(report, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
