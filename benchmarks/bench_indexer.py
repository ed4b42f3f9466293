#!/usr/bin/env python3
"""Lightning indexer benchmark: the indexer logits and the top-k of a DeepSeek-V3.2 decode step.

jax_flashmla.indexer's paged_mqa_logits (DeepGEMM's fp8_paged_mqa_logits contract: FP8 queries of 64
heads x 128 channels, per-head weights, the 132-byte paged FP8 key pool, pages of 64) and topk_slots
(the top-k positions of each query turned into global cache slots), each alone and the two in one
jitted call, and the pure-JAX logits program beside the library's call (on an SM90 GPU the library
runs its fused kernel: "x XLA" is the speed-up, "match" compares the two's logits), timed with mla_bench's machinery (profiler device times, the L2 flushed before each
iteration) at V3.2's decode shapes: b 64 / 128, next_n 1 / 2, every request at context 4096 / 16384
/ 65536, topk 2048. The logits are reported as GB/s of the key bytes they read (132 bytes a token:
128 e4m3 values and a float32 scale; every request's keys once a step, whatever next_n) against the
same run's copy bandwidth, and as a share of a decode step: the indexer's logits, its top-k and the
sparse attention (flash_mla_with_kvcache's sparse FP8 mode over a "v32" pool holding the same
context, h_q 128, reading the slots the top-k picked), each timed alone. Columns and method:
benchmarks/README.md.

  python3 benchmarks/bench_indexer.py                                  # the whole matrix
  python3 benchmarks/bench_indexer.py --cases b=128,context=65536       # a subset
  python3 benchmarks/bench_indexer.py --attn-heads 32 --json ix.json    # a tensor-parallel share
  python3 benchmarks/bench_indexer.py --smoke                           # tiny sizes; runs on the CPU
  python3 benchmarks/bench_indexer.py --from-json ix.json --markdown    # re-render saved results
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # mla_bench beside this file
import mla_bench  # noqa: E402

jfm = mla_bench.jfm

HEADS, HEAD_DIM, PAGE_SIZE = 64, 128, 64  # DeepSeek-V3.2's indexer; DeepGEMM's paged layout
KEY_BYTES = HEAD_DIM + 4  # 128 e4m3 values and a float32 scale a token
V32_TOKEN_BYTES = 656  # the attention's FP8 "v32" pool


@dataclasses.dataclass(frozen=True)
class IndexerCase:
    b: int
    next_n: int
    context: int
    heads: int = HEADS
    head_dim: int = HEAD_DIM

    @property
    def name(self) -> str:
        return f"b={self.b} next_n={self.next_n} context={self.context} heads={self.heads}x{self.head_dim}"


AXES = ("context", "b", "next_n")  # context outermost: one pool serves consecutive cases
GRID = dict(context=[4096, 16384, 65536], b=[64, 128], next_n=[1, 2])
SMOKE_GRID = dict(context=[128, 320], b=[2], next_n=[1, 2])
FILTER_KEYS = AXES


def select_indexer_cases(grid: dict, flt: dict) -> list[IndexerCase]:
    """The grid's cases that pass `flt` (mla_bench.parse_filter's form); a value outside the grid adds it."""
    axes = {k: sorted(set(grid[k]) | flt.get(k, set())) for k in AXES}
    cases = [IndexerCase(**dict(zip(AXES, values))) for values in itertools.product(*(axes[k] for k in AXES))]
    return [c for c in cases if all(getattr(c, k) in v for k, v in flt.items())]


def indexer_counts(case: IndexerCase, topk: int, attn_heads: int) -> dict:
    """What a decode step moves and computes:

      key_bytes     b context (head_dim + 4): every request's index keys once (the paged pool's bytes)
      logits_bytes  4 b next_n context: the float32 logits written (and read again by the top-k)
      flops         2 b next_n heads context head_dim: the q . k dots (the relu and weighting aside)
      attn_bytes    b next_n min(topk, context) 656: the FP8 entries the sparse attention gathers"""
    rows = case.b * case.next_n
    return {"key_bytes": case.b * case.context * (case.head_dim + 4), "logits_bytes": 4 * rows * case.context,
            "flops": 2 * rows * case.heads * case.context * case.head_dim,
            "attn_bytes": rows * min(topk, case.context) * V32_TOKEN_BYTES, "topk": topk, "attn_heads": attn_heads}


# ==== problems ====================================================================================

def random_key_pool(jax, key, num_pages: int, head_dim: int = HEAD_DIM):
    """An index-key pool [num_pages, 64, 1, head_dim + 4] uint8 of random keys: standard normal values
    in e4m3 and scales uniform in [0.5, 1), laid out as jax_flashmla.indexer's module docstring says
    (a page's values, then its scales), made on the device without a quantiser pass."""
    import jax.numpy as jnp
    kv, ks = jax.random.split(key)
    values = jax.random.normal(kv, (num_pages, PAGE_SIZE * head_dim), jnp.float32).astype(jnp.float8_e4m3fn)
    scales = jax.random.uniform(ks, (num_pages, PAGE_SIZE), jnp.float32, 0.5, 1.0)
    value_bytes = jax.lax.bitcast_convert_type(values, jnp.uint8)
    scale_bytes = jax.lax.bitcast_convert_type(scales, jnp.uint8).reshape(num_pages, PAGE_SIZE * 4)
    return jnp.concatenate([value_bytes, scale_bytes], axis=1).reshape(num_pages, PAGE_SIZE, 1, head_dim + 4)


def block_table(rng, b: int, pages_per_seq: int) -> np.ndarray:
    """int32 [b, pages_per_seq]: every page of the pool once, in a random order."""
    return rng.permutation(b * pages_per_seq).astype(np.int32).reshape(b, pages_per_seq)


# ==== the measurements ============================================================================

def run_indexer(jax, timer, settings, cases, opts, on_row=None) -> list[dict]:
    """One record per case (benchmarks/README.md, "The indexer benchmark")."""
    import jax.numpy as jnp
    from jax_flashmla import indexer as ix
    from jax_flashmla import kv_formats

    def bench_indexer_logits(q, pool, weights, lens, table):
        return ix.paged_mqa_logits(q, pool, weights, lens, table, table.shape[1] * PAGE_SIZE)

    def bench_indexer_logits_xla(q, pool, weights, lens, table):  # the pure-JAX program, on any platform
        limits = ix.visible_limits(lens, q.shape[1])
        return ix._paged_mqa_logits(q, pool, weights, limits, table, table.shape[1] * PAGE_SIZE, 8)

    def bench_indexer_topk(logits, lens, table):
        return ix.topk_slots(logits, lens, table, opts.topk)

    def bench_indexer_step(q, pool, weights, lens, table):
        return bench_indexer_topk(bench_indexer_logits(q, pool, weights, lens, table), lens, table)

    def bench_sparse_attention(q, pool, indices):
        return jfm.flash_mla_with_kvcache(q, pool, None, None, is_fp8_kvcache=True, indices=indices)[0]

    logits_fn, topk_fn, step_fn = (jax.jit(f) for f in (bench_indexer_logits, bench_indexer_topk, bench_indexer_step))
    attn_fn = jax.jit(bench_sparse_attention)
    xla_fn = jax.jit(bench_indexer_logits_xla)

    def bench_indexer_topk_kernel(logits, lens, table):  # the same selection, lowered with the opt-in kernel
        return ix.topk_slots(logits, lens, table, opts.topk)

    def topk_kernel_fn(*args):  # the opt-in is read when the call is lowered: compile with it set
        previous = os.environ.get(ix._fused_topk.KERNEL_ENV)
        os.environ[ix._fused_topk.KERNEL_ENV] = "1"
        try:
            return jax.jit(bench_indexer_topk_kernel).lower(*args).compile()
        finally:
            if previous is None:
                del os.environ[ix._fused_topk.KERNEL_ENV]
            else:
                os.environ[ix._fused_topk.KERNEL_ENV] = previous
    results, pools = [], {}
    for c in cases:
        pages_per_seq = -(-c.context // PAGE_SIZE)
        pool_key = (c.context, c.b)
        if pool_key not in pools:
            pools.clear()  # the previous pools go before the next are made
            key = jax.random.PRNGKey(settings.seed * 7919 + c.context + c.b)
            num_pages = c.b * pages_per_seq
            index_pool = jax.block_until_ready(random_key_pool(jax, key, num_pages, c.head_dim))
            attn_pool = None
            if not opts.no_attention:  # random bytes are not a valid pool (NaN codes): quantise tokens
                fmt = kv_formats.kv_cache_format("v32")
                attn_pool = jnp.zeros(fmt.pool_shape(num_pages, PAGE_SIZE), jnp.uint8)
                step = 1 << 16  # tokens quantised a call
                write = jax.jit(lambda pool, slots, tokens: kv_formats.write_tokens(pool, "v32", slots, tokens),
                                donate_argnums=0)
                for start in range(0, num_pages * PAGE_SIZE, step):
                    n = min(step, num_pages * PAGE_SIZE - start)
                    tokens = jax.random.normal(jax.random.fold_in(key, start), (step, 576), jnp.bfloat16)
                    slots = jnp.where(jnp.arange(step) < n, start + jnp.arange(step, dtype=jnp.int32), -1)
                    attn_pool = write(attn_pool, slots, tokens)
                attn_pool = jax.block_until_ready(attn_pool)
            pools[pool_key] = (index_pool, attn_pool)
            mib = (index_pool.nbytes + (attn_pool.nbytes if attn_pool is not None else 0)) / 2 ** 20
            print(f"\n[pools] context={c.context} b={c.b}: {num_pages} pages, {mib:.1f} MiB")
        index_pool, attn_pool = pools[pool_key]
        rng = np.random.default_rng([settings.seed, c.context, c.b, c.next_n])
        table = jnp.asarray(block_table(rng, c.b, pages_per_seq))
        lens = jnp.full((c.b,), c.context, jnp.int32)
        key = jax.random.PRNGKey(settings.seed * 31 + c.next_n)
        q = jax.random.normal(key, (c.b, c.next_n, c.heads, c.head_dim), jnp.float32).astype(jnp.float8_e4m3fn)
        weights = jax.random.uniform(jax.random.fold_in(key, 1), (c.b * c.next_n, c.heads), jnp.float32)
        rec = dataclasses.asdict(c)
        rec.update(indexer_counts(c, opts.topk, opts.attn_heads))
        logits = slots = attn_q = None
        try:
            logits = jax.block_until_ready(logits_fn(q, index_pool, weights, lens, table))
            slots = jax.block_until_ready(topk_fn(logits, lens, table))
            jax.block_until_ready(step_fn(q, index_pool, weights, lens, table))
            rec["logits_path"] = mla_bench.lowered_path(logits_fn, q, index_pool, weights, lens, table)
            topk_kernel = None
            if opts.topk_kernel:  # the opt-in kernel's slots against the default selection's
                topk_kernel = topk_kernel_fn(logits, lens, table)
                rec["topk_kernel_ok"] = bool(np.array_equal(np.asarray(topk_kernel(logits, lens, table)),
                                                            np.asarray(slots)))
            if not opts.no_xla:  # the fused logits against the pure-JAX program's, on the first requests
                want = np.asarray(xla_fn(q, index_pool, weights, lens, table)[:4])
                got = np.asarray(logits[:4])
                fin = np.isfinite(want)
                rec["logits_match"] = bool(np.array_equal(np.isneginf(got), np.isneginf(want)) and
                                           np.abs(got[fin] - want[fin]).max(initial=0.0)
                                           <= 2e-3 * np.abs(want[fin]).max(initial=0.0))
            if attn_pool is not None:
                attn_q = jax.random.normal(jax.random.fold_in(key, 2), (c.b, c.next_n, opts.attn_heads, 576),
                                           jnp.bfloat16)
                jax.block_until_ready(attn_fn(attn_q, attn_pool, slots))
                rec["attn_path"] = mla_bench.lowered_path(attn_fn, attn_q, attn_pool, slots)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory: the row keeps its error)
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if "error" not in rec:
            calls = {"logits": (lambda: logits_fn(q, index_pool, weights, lens, table), "bench_indexer_logits"),
                     "topk": (lambda: topk_fn(logits, lens, table), "bench_indexer_topk"),
                     "step": (lambda: step_fn(q, index_pool, weights, lens, table), "bench_indexer_step")}
            if topk_kernel is not None:
                calls["topk_kernel"] = (lambda: topk_kernel(logits, lens, table), "bench_indexer_topk_kernel")
            if not opts.no_xla:
                calls["xla"] = (lambda: xla_fn(q, index_pool, weights, lens, table), "bench_indexer_logits_xla")
            if attn_q is not None:
                calls["attn"] = (lambda: attn_fn(attn_q, attn_pool, slots), "bench_sparse_attention")
            dev = timer.device_ms([(label, fn, settings.iters, hint) for label, (fn, hint) in calls.items()])
            for label, (fn, _) in calls.items():
                t = mla_bench.device_or_wall(timer, dev, label, fn, settings.iters)
                rec[f"{label}_ms"], rec["src"] = t["ms"], t["src"]
            rec["gbps"] = rec["key_bytes"] / (rec["logits_ms"] * 1e-3) / 1e9
            rec["tflops"] = rec["flops"] / (rec["logits_ms"] * 1e-3) / 1e12
            if "xla_ms" in rec:
                rec["xla_speedup"] = rec["xla_ms"] / rec["logits_ms"]
            parts = [rec["logits_ms"], rec["topk_ms"]] + ([rec["attn_ms"]] if "attn_ms" in rec else [])
            if len(parts) == 3:
                rec["decode_ms"] = sum(parts)
                rec.update(logits_share=parts[0] / rec["decode_ms"], topk_share=parts[1] / rec["decode_ms"],
                           attn_share=parts[2] / rec["decode_ms"])
            # The selection is the logits' top-k: checked on the first request's first query.
            want = np.argsort(-np.asarray(logits[0]), kind="stable")[:min(opts.topk, c.context)]
            got = np.asarray(slots[0, 0, :want.size])
            rec["topk_ok"] = bool(np.array_equal(got, np.asarray(table[0])[want // PAGE_SIZE] * PAGE_SIZE
                                                 + want % PAGE_SIZE))
        results.append(rec)
        if on_row is not None:
            on_row(rec, c is cases[0])
        logits = slots = attn_q = None
    return results


# ==== the report ==================================================================================

COLUMNS = [
    ("b", "b", "d"), ("next_n", "next_n", "d"), ("context", "context", "d"), ("logits ms", "logits_ms", ".3f"),
    ("GB/s", "gbps", "num"), ("BW%", "bw_pct", ".1f"), ("TFLOPS", "tflops", "num"), ("XLA ms", "xla_ms", ".3f"),
    ("x XLA", "xla_speedup", ".1f"), ("match", "logits_match", "s"), ("top-k ms", "topk_ms", ".3f"),
    ("top-k kernel ms", "topk_kernel_ms", ".3f"), ("kernel ok", "topk_kernel_ok", "s"),
    ("both ms", "step_ms", ".3f"), ("attn ms", "attn_ms", ".3f"), ("logits %", "logits_pct", ".0f"),
    ("top-k %", "topk_pct", ".0f"), ("attn %", "attn_pct", ".0f"), ("top-k ok", "topk_ok", "s"), ("src", "src", "s"),
    ("logits path", "logits_path", "s"), ("attn path", "attn_path", "s"),
]


def with_ratios(rec: dict, baselines: dict | None) -> dict:
    """The record plus BW% (its key GB/s over the same run's copy bandwidth) and the shares in percent."""
    row = dict(rec)
    copy = (baselines or {}).get("copy", {}).get("gbps")
    if rec.get("gbps") and copy:
        row["bw_pct"] = 100 * rec["gbps"] / copy
    for part in ("logits", "topk", "attn"):
        if f"{part}_share" in rec:
            row[f"{part}_pct"] = 100 * rec[f"{part}_share"]
    return row


def table(records, baselines, markdown=False) -> str:
    return mla_bench.table([with_ratios(r, baselines) for r in records], COLUMNS, markdown)


def render(report: dict, markdown: bool) -> str:
    env, base = report.get("env", {}), report.get("baselines", {})
    lines = [f"Device: {env.get('device')} | jax {env.get('jax')} | path {env.get('kernel_path')} | {env.get('date')}"]
    if base:
        lines.append(mla_bench.baselines_line(base))
    if report.get("inputs"):
        lines.append(f"Inputs: {report['inputs']}")
    rows = report.get("indexer", [])
    if rows:
        lines += ["", "Indexer logits (GB/s of the key bytes read), top-k, and their share of a decode step:",
                  table(rows, base, markdown)]
        timed = [row for row in (with_ratios(r, base) for r in rows) if row.get("bw_pct")]
        if timed:
            worst = min(timed, key=lambda r: r["bw_pct"])
            lines.append(f"\nlogits: {mla_bench.geomean([r['bw_pct'] for r in timed]):.1f}% of the copy bandwidth "
                         f"(geomean), worst {worst['bw_pct']:.1f}% at {worst['b']} x {worst['next_n']} x "
                         f"{worst['context']}")
        for r in rows:
            if r.get("error"):
                lines.append(f"not run: {IndexerCase(r['b'], r['next_n'], r['context']).name}: {r['error']}")
    return "\n".join(lines)


# ==== the command line ============================================================================

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help=f"filter, e.g. 'b=128,context=65536' (keys {', '.join(FILTER_KEYS)}; a value "
                                   "outside the grid adds it)")
    mla_bench.add_settings_args(p, iters=20)
    p.add_argument("--topk", type=int, default=None, help="tokens selected a query (default 2048; --smoke: 32)")
    p.add_argument("--attn-heads", type=int, default=128, help="h_q of the sparse attention (default 128)")
    p.add_argument("--no-attention", action="store_true", help="the indexer only (no step share)")
    p.add_argument("--topk-kernel", action="store_true",
                   help="also time topk_slots with the opt-in SM90 top-k kernel ('top-k kernel ms'; 'kernel ok': "
                        "its slots equal the default selection's)")
    p.add_argument("--no-xla", action="store_true",
                   help="skip the pure-JAX logits (timed beside the library's call by default: 'XLA ms', 'x XLA')")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU in seconds)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print markdown tables at the end")
    p.add_argument("--from-json", help="print the tables of a saved --json file and exit (no measuring)")
    return p


def plan(args) -> list[IndexerCase]:
    """The cases of the command line (and args.topk filled in); ValueError naming the bad option."""
    if args.topk is None:
        args.topk = 32 if args.smoke else 2048
    if args.topk < 1 or args.attn_heads < 1:
        raise ValueError(f"--topk and --attn-heads must be positive, got {args.topk} and {args.attn_heads}")
    try:
        return select_indexer_cases(SMOKE_GRID if args.smoke else GRID, mla_bench.parse_filter(args.cases, FILTER_KEYS))
    except ValueError as e:
        raise ValueError(f"--cases: {e}") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if mla_bench.replay(args, render):
        return 0
    try:
        cases = plan(args)
    except ValueError as e:
        raise SystemExit(str(e))
    settings = mla_bench.settings_from(args, no_ref=True)

    import jax
    inputs = (f"every request at its context; index keys e4m3 of standard normal values with scales in [0.5, 1), "
              f"queries e4m3 of standard normal values, weights uniform in [0, 1); pages shuffled; topk {args.topk}"
              + ("" if args.no_attention else f"; attention: h_q {args.attn_heads}, a v32 pool of standard normal "
                                              "tokens, the top-k's slots as indices"))
    report = mla_bench.start_report(jax, args, settings, cases=args.cases, inputs=inputs)
    timer = mla_bench.Timer(jax, settings)
    report["baselines"] = mla_bench.run_baselines(jax, timer, settings)

    def on_row(rec, first):
        text = table([rec], report["baselines"]).splitlines()
        print("\n".join(text if first else text[1:]))
        if rec.get("error"):
            print(f"  error: {rec['error']}")

    print(f"\n[indexer] {len(cases)} cases")
    report["indexer"] = run_indexer(jax, timer, settings, cases, args, on_row=on_row)
    return mla_bench.finish_report(args, report, render(report, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
