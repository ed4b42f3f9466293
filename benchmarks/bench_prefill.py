#!/usr/bin/env python3
"""Sparse MLA prefill benchmark: flash_mla_sparse_fwd forward and backward, FlashMLA side by side.

jax_flashmla.flash_mla_sparse_fwd in FlashMLA's unbatched form (q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk],
indices [s_q, 1, topk]) and its gradient with respect to q and kv (the op's custom VJP: on an SM90
GPU the backward kernel of csrc/cuda/sparse_prefill_bwd/, elsewhere the pure-JAX backward), timed with
mla_bench's machinery (profiler device times, the L2 flushed before each iteration) against the same
run's bf16 matmul, over two suites at s_q 4096, s_kv 8192 / 32768 / 65536 and h_q 128 / 64:

  v32   DeepSeek-V3.2: d_qk 576, topk 2048
  v4    DeepSeek-V4: d_qk 512, topk 512 and 1024

--flashmla times FlashMLA's own flash_mla_sparse_fwd on the same arrays in the same process (a
`flash_mla` build and torch must be importable; tools/flashmla_build.sh). Columns and method:
benchmarks/README.md.

  python3 benchmarks/bench_prefill.py                                # both suites
  python3 benchmarks/bench_prefill.py --suite v4 --cases s_kv=8192    # a subset
  python3 benchmarks/bench_prefill.py --flashmla --json pf.json        # FlashMLA side by side
  python3 benchmarks/bench_prefill.py --causal --invalid 0.05          # causal draws, 5% -1 entries
  python3 benchmarks/bench_prefill.py --smoke                          # tiny sizes; runs on the CPU
  python3 benchmarks/bench_prefill.py --from-json pf.json --markdown   # re-render saved results
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

D_V = 512
FLASHMLA_HEADS = (64, 128)  # the head counts FlashMLA's sparse prefill runs
FLASHMLA_TOPK_MULTIPLE = 128  # its SM90 kernel walks topk two blocks of 64 at a time


@dataclasses.dataclass(frozen=True)
class PrefillCase:
    suite: str
    d_qk: int
    h_q: int
    s_q: int
    s_kv: int
    topk: int

    @property
    def name(self) -> str:
        return f"{self.suite}: d_qk={self.d_qk} h_q={self.h_q} s_q={self.s_q} s_kv={self.s_kv} topk={self.topk}"


# Each suite: grid axes. Cases run with d_qk and s_kv outermost (one kv serves consecutive cases),
# then topk (one index draw serves both head counts), then h_q and s_q.
AXES = ("d_qk", "s_kv", "topk", "h_q", "s_q")
SUITES = {
    "v32": dict(d_qk=[576], s_kv=[8192, 32768, 65536], topk=[2048], h_q=[128, 64], s_q=[4096]),
    "v4": dict(d_qk=[512], s_kv=[8192, 32768, 65536], topk=[512, 1024], h_q=[128, 64], s_q=[4096]),
}
SMOKE_SUITES = {
    "v32": dict(d_qk=[576], s_kv=[96, 200], topk=[32], h_q=[8], s_q=[40]),
    "v4": dict(d_qk=[512], s_kv=[96], topk=[16, 40], h_q=[8], s_q=[40]),
}
FILTER_KEYS = AXES
ADDABLE = ("s_kv", "topk", "h_q", "s_q")  # a filter value outside a suite's grid adds it on these axes


def select_prefill_cases(suites: dict, names, flt: dict) -> list[PrefillCase]:
    """The cases of the named suites that pass `flt` (parse_filter's form over FILTER_KEYS); a value
    outside a suite's grid on an ADDABLE axis adds it (e.g. h_q=32)."""
    cases = []
    for suite in names:
        axes = {k: list(v) + sorted(flt[k] - set(v)) if k in ADDABLE and k in flt else list(v)
                for k, v in suites[suite].items()}
        for values in itertools.product(*(axes[k] for k in AXES)):
            c = PrefillCase(suite, **dict(zip(AXES, values)))
            if all(getattr(c, k) in v for k, v in flt.items()):
                cases.append(c)
    return cases


def prefill_counts(case: PrefillCase, num_valid: int) -> dict:
    """FlashMLA's counts for a sparse prefill call (tests/lib.py, count_flop_and_mem_vol), and ours for
    the backward:

      flops      = 2 s_q topk h_q (d_qk + 512): every index entry attended, -1 too (no topk_length here)
      bytes      = 2 num_valid d_qk + 2 s_q h_q (d_qk + 512): each valid entry's kv row once per query
                   token, q and out
      bwd_flops  = 2 s_q topk h_q (3 d_qk + 2 * 512): the backward's five matmuls, an exact count of
                   what it computes: the scores again (q.k, d_qk), d_out.v (512), dq = dS k (d_qk),
                   dkv += dS q (d_qk) and P d_out (512); 2.5x the forward at d_qk 512, 2.53x at 576."""
    attended = case.s_q * case.topk
    return {
        "attended": attended,
        "num_valid": num_valid,
        "flops": 2 * attended * case.h_q * (case.d_qk + D_V),
        "bytes": 2 * num_valid * case.d_qk + 2 * case.s_q * case.h_q * (case.d_qk + D_V),
        "bwd_flops": 2 * attended * case.h_q * (3 * case.d_qk + 2 * D_V),
    }


def flashmla_refusal(case: PrefillCase) -> str | None:
    """Why FlashMLA's SM90 sparse prefill cannot run the case, or None."""
    if case.h_q not in FLASHMLA_HEADS:
        return f"FlashMLA's sparse prefill runs h_q 64 or 128, not {case.h_q}"
    if case.topk % FLASHMLA_TOPK_MULTIPLE:
        return f"FlashMLA's SM90 sparse prefill needs topk a multiple of {FLASHMLA_TOPK_MULTIPLE}, not {case.topk}"
    if case.d_qk not in (512, 576):
        return f"FlashMLA's sparse prefill runs d_qk 512 or 576, not {case.d_qk}"
    return None


# ==== problems ====================================================================================

def draw_indices(rng, s_q: int, s_kv: int, topk: int, causal: bool = False, invalid: float = 0.0,
                 chunk_elems: int = 1 << 24) -> np.ndarray:
    """int32 [s_q, 1, topk] (FlashMLA's layout): each query token's topk distinct kv rows drawn
    uniformly at random, in random order; where a token sees fewer than topk rows, all of them, then
    -1. Without `causal` a token sees all s_kv rows (FlashMLA's timed cases); with it, token i sits at
    position s_kv - s_q + i of the sequence and sees the rows up to it. `invalid`: each entry is then
    replaced by -1 with that probability. The draw takes the topk smallest of uniform keys per row,
    for chunk_elems // s_kv rows at a time (never s_q x s_kv at once)."""
    out = np.full((s_q, topk), -1, np.int32)
    k = min(topk, s_kv)
    rows_per_chunk = max(1, chunk_elems // max(s_kv, 1))
    positions = np.arange(s_kv)
    for start in range(0, s_q, rows_per_chunk):
        stop = min(s_q, start + rows_per_chunk)
        keys = rng.random((stop - start, s_kv), dtype=np.float32)
        if causal:
            seen = np.clip(s_kv - s_q + 1 + np.arange(start, stop), 0, s_kv)
            keys[positions[None, :] >= seen[:, None]] = 2.0  # above every uniform key: picked last
        if k == 0:
            continue
        picked = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < s_kv else np.tile(positions, (stop - start, 1))
        picked_keys = np.take_along_axis(keys, picked, axis=1)
        order = np.argsort(picked_keys, axis=1)  # ascending keys: a random order, unseen rows last
        chosen = np.take_along_axis(picked, order, axis=1)
        chosen[np.take_along_axis(picked_keys, order, axis=1) >= 1.0] = -1
        out[start:stop, :k] = chosen
    if invalid > 0:
        out[rng.random(out.shape) < invalid] = -1
    return out[:, None, :]


def check_rows(s_q: int, n: int) -> np.ndarray:
    """n query tokens spread evenly over s_q (all of them when n >= s_q), for the reference check."""
    if n <= 0:
        return np.zeros((0,), np.int64)
    return np.unique(np.linspace(0, s_q - 1, min(n, s_q)).round().astype(np.int64))


# ==== FlashMLA in the same process ================================================================

class FlashMLAPrefill:
    """FlashMLA's flash_mla_sparse_fwd on our arrays, shared through DLPack (q, kv, the indices in
    their [s_q, 1, topk] int32 layout, the sink)."""

    def __init__(self, flash_mla, torch, q, kv, indices, sink, scale):
        self.torch = torch
        self._keep = tuple(x.block_until_ready() for x in (q, kv, indices) + (() if sink is None else (sink,)))
        tq, tkv, tidx = (torch.from_dlpack(x) for x in (q, kv, indices))
        tsink = None if sink is None else torch.from_dlpack(sink)

        def call():
            return flash_mla.flash_mla_sparse_fwd(tq, tkv, tidx, scale, d_v=D_V, attn_sink=tsink, topk_length=None)
        self.call = call
        torch.cuda.synchronize()

    def sync(self, _=None):
        self.torch.cuda.synchronize()

    def differences(self, out, max_logits, lse) -> dict:
        """Ours against FlashMLA's, on the device: cos_diff of out, the largest |difference| of lse and
        max_logits where both are finite, and whether the non-finite entries agree."""
        torch = self.torch
        theirs = self.call()
        ours = [torch.from_dlpack(x) for x in (out, max_logits, lse)]
        x, y = ours[0].double(), theirs[0].double()
        cos = 1 - 2 * float((x * y).sum()) / max(float((x * x).sum() + (y * y).sum()), 1e-12)
        rec = {"cos_diff_vs_flashmla": cos}
        for name, a, b in (("max_logits", ours[1], theirs[1]), ("lse", ours[2], theirs[2])):
            both = torch.isfinite(a) & torch.isfinite(b)
            rec[f"{name}_diff_vs_flashmla"] = float((a - b).abs()[both].max()) if bool(both.any()) else 0.0
            rec[f"{name}_nonfinite_agree"] = bool(((~torch.isfinite(a)) == (~torch.isfinite(b))).all()) and bool(
                (a[~both] == b[~both]).all())
        return rec


def side_by_side(jax, fm, case, call, results, q, kv, indices, sink, scale, opts) -> dict:
    """Our forward and FlashMLA's on the same arrays, timed alike (mla_bench.interleaved_wall_ms).
    Returns the record's fm_* fields, or fm_error (a case FlashMLA refuses or fails)."""
    why = flashmla_refusal(case)
    if why:
        return {"fm_error": why}
    flash_mla, torch = fm
    try:
        theirs = FlashMLAPrefill(flash_mla, torch, q, kv, indices, sink, scale)
        diffs = theirs.differences(*results)
        times = mla_bench.interleaved_wall_ms({"ours": (call, jax.block_until_ready),
                                               "flashmla": (theirs.call, theirs.sync)}, opts.sbs_calls,
                                              opts.sbs_repeats)
    except Exception as e:  # noqa: BLE001
        return {"fm_error": _short(e)}
    ours, fm_ms = mla_bench.median(times["ours"]), mla_bench.median(times["flashmla"])
    return {"ours_wall_ms": ours, "fm_wall_ms": fm_ms, "fm_over_ours": fm_ms / ours,
            "fm_tflops": prefill_counts(case, 0)["flops"] / (fm_ms * 1e-3) / 1e12, "sbs_calls": opts.sbs_calls,
            "sbs_repeats": opts.sbs_repeats, **diffs}


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# ==== the measurements ============================================================================

def run_prefill(jax, timer, settings, cases, opts, fm=None, on_row=None) -> list[dict]:
    """One record per case (benchmarks/README.md, "The sparse prefill benchmark"); `fm` = (flash_mla,
    torch) adds FlashMLA's forward on the same arrays."""
    import jax.numpy as jnp

    def bench_prefill_fwd(q, kv, indices, attn_sink):
        return jfm.flash_mla_sparse_fwd(q, kv, indices, q.shape[-1] ** -0.5, D_V, attn_sink=attn_sink)

    def bench_prefill_residuals(q, kv, indices, attn_sink):
        # jax.vjp through the op's custom VJP: the forward, and the pullback holding its residuals.
        return jax.vjp(lambda q, kv: bench_prefill_fwd(q, kv, indices, attn_sink)[0], q, kv)

    def bench_prefill_bwd(pullback, d_out):
        return pullback(d_out)  # (dq, dkv): the backward alone, from the saved residuals

    def bench_prefill_reference(q, kv, indices, attn_sink, d_out):
        """The float32 reference and its autodiff on a few tokens: (out, lse, dq) of those tokens."""
        def f(q):
            out, _, lse = jfm.sparse_prefill_reference(q, kv, indices, q.shape[-1] ** -0.5, D_V, attn_sink=attn_sink)
            return out, lse
        (out, lse), pullback = jax.vjp(f, q)
        (dq,) = pullback((d_out, jnp.zeros_like(lse)))
        return out, lse, dq

    fwd_fn, res_fn, bwd_fn = jax.jit(bench_prefill_fwd), jax.jit(bench_prefill_residuals), jax.jit(bench_prefill_bwd)
    ref_fn = jax.jit(bench_prefill_reference)
    bwd_iters = min(opts.bwd_iters, settings.iters)

    results = []
    kv_cache, idx_cache = {}, {}
    for c in cases:
        kv_key = (c.d_qk, c.s_kv)
        if kv_key not in kv_cache:
            kv_cache.clear()
            kv_cache[kv_key] = jax.block_until_ready(jax.random.normal(
                jax.random.PRNGKey(settings.seed * 7919 + c.s_kv + c.d_qk), (c.s_kv, 1, c.d_qk), jnp.bfloat16))
            print(f"\n[kv] d_qk={c.d_qk} s_kv={c.s_kv}: {kv_cache[kv_key].nbytes / 2**20:.1f} MiB")
        kv = kv_cache[kv_key]
        idx_key = (c.s_q, c.s_kv, c.topk)
        if idx_key not in idx_cache:
            idx_cache.clear()
            rng = np.random.default_rng([settings.seed, c.s_q, c.s_kv, c.topk, int(opts.causal),
                                         int(round(opts.invalid * 1e6))])
            idx_np = draw_indices(rng, c.s_q, c.s_kv, c.topk, causal=opts.causal, invalid=opts.invalid)
            idx_cache[idx_key] = (idx_np, jnp.asarray(idx_np))
        idx_np, indices = idx_cache[idx_key]
        key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), c.h_q * 100003 + c.s_q * 7 + c.d_qk)
        q = jax.random.normal(key, (c.s_q, c.h_q, c.d_qk), jnp.bfloat16)
        sink = None if opts.no_sink else jax.random.normal(jax.random.fold_in(key, 1), (c.h_q,), jnp.float32)
        d_out = jax.random.normal(jax.random.fold_in(key, 2), (c.s_q, c.h_q, D_V), jnp.bfloat16)

        rec = dataclasses.asdict(c)
        rec.update(d_v=D_V, attn_sink=sink is not None, causal=opts.causal, invalid=opts.invalid,
                   **prefill_counts(c, int(((idx_np >= 0) & (idx_np < c.s_kv)).sum())))
        fwd = lambda: fwd_fn(q, kv, indices, sink)  # noqa: E731
        try:
            fwd_results = jax.block_until_ready(fwd())
            rec["path"] = mla_bench.lowered_path(fwd_fn, q, kv, indices, sink)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory: the row keeps its error)
            rec["fwd_error"] = _short(e)
            fwd_results = None
        grads, pullback = None, None
        if fwd_results is not None and not opts.no_bwd:
            try:
                _, pullback = jax.block_until_ready(res_fn(q, kv, indices, sink))
                grads = jax.block_until_ready(bwd_fn(pullback, d_out))
            except Exception as e:  # noqa: BLE001
                rec["bwd_error"] = _short(e)
                grads = pullback = None
        jobs = []
        if fwd_results is not None:
            jobs.append(("fwd", fwd, settings.iters, "bench_prefill_fwd"))
        if grads is not None:
            bwd = lambda: bwd_fn(pullback, d_out)  # noqa: E731
            jobs.append(("bwd", bwd, bwd_iters, "bench_prefill_bwd"))
        dev = timer.device_ms(jobs) if jobs else {}
        if fwd_results is not None:
            t = mla_bench.device_or_wall(timer, dev, "fwd", fwd, settings.iters)
            rec.update({f"fwd_{k}": v for k, v in t.items() if k != "src"}, src=t["src"])
            rec.update(tflops=rec["flops"] / (rec["fwd_ms"] * 1e-3) / 1e12,
                       gbps=rec["bytes"] / (rec["fwd_ms"] * 1e-3) / 1e9)
        if grads is not None:
            t = mla_bench.device_or_wall(timer, dev, "bwd", bwd, bwd_iters)
            rec.update({f"bwd_{k}": v for k, v in t.items()})
            rec["bwd_tflops"] = rec["bwd_flops"] / (rec["bwd_ms"] * 1e-3) / 1e12
            rec["bwd_over_fwd"] = rec["bwd_tflops"] / rec["tflops"]
        rows = check_rows(c.s_q, opts.check_tokens)
        if fwd_results is not None and rows.size:
            try:
                r_idx = jnp.asarray(rows)
                ref_out, ref_lse, ref_dq = ref_fn(q[r_idx].astype(jnp.float32), kv.astype(jnp.float32),
                                                  indices[r_idx], sink, d_out[r_idx].astype(jnp.float32))
                rec["check_tokens"] = int(rows.size)
                rec["cos_diff_vs_reference"] = mla_bench.cos_diff(np.asarray(fwd_results[0][r_idx], np.float32),
                                                                  np.asarray(ref_out))
                both = np.isfinite(ref_lse) & np.isfinite(np.asarray(fwd_results[2][r_idx]))
                rec["lse_diff_vs_reference"] = float(np.abs(np.asarray(fwd_results[2][r_idx]) - ref_lse)[both].max(
                    initial=0.0))
                if grads is not None:
                    rec["dq_cos_diff_vs_reference"] = mla_bench.cos_diff(np.asarray(grads[0][r_idx], np.float32),
                                                                         np.asarray(ref_dq))
            except Exception as e:  # noqa: BLE001
                rec["check_error"] = _short(e)
        if fm is not None and fwd_results is not None:
            rec.update(side_by_side(jax, fm, c, fwd, fwd_results, q, kv, indices, sink, c.d_qk ** -0.5, opts))
        results.append(rec)
        if on_row is not None:
            on_row(rec, c is cases[0])
        fwd_results = grads = pullback = None  # the device arrays of this case go before the next is made
    return results


# ==== the report ==================================================================================

COLUMNS = [
    ("suite", "suite", "s"), ("d_qk", "d_qk", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"), ("s_kv", "s_kv", "d"),
    ("topk", "topk", "d"), ("fwd ms", "fwd_ms", ".3f"), ("TFLOPS", "tflops", "num"), ("FLOP%", "flop_pct", ".1f"),
    ("bwd ms", "bwd_ms", ".3f"), ("bwd TFLOPS", "bwd_tflops", "num"), ("bwd FLOP%", "bwd_flop_pct", ".1f"),
    ("bwd/fwd", "bwd_over_fwd", ".2f"), ("cos_diff", "cos_diff_vs_reference", ".1e"),
    ("dq cos_diff", "dq_cos_diff_vs_reference", ".1e"), ("src", "src", "s"), ("path", "path", "s"),
]
SBS_COLUMNS = [("ours wall ms", "ours_wall_ms", ".3f"), ("FM wall ms", "fm_wall_ms", ".3f"),
               ("FM/ours", "fm_over_ours", ".3f"), ("cos_diff FM", "cos_diff_vs_flashmla", ".1e")]
TARGETS = {"geomean": 1.05, "worst": 0.97, "bwd_over_fwd": 0.45}  # the issue's, on a Hopper GPU


def with_ratios(rec: dict, baselines: dict | None) -> dict:
    """The record plus its TFLOPS over the same run's bf16 matmul (FLOP%, bwd FLOP%)."""
    row = dict(rec)
    mm = (baselines or {}).get("matmul", {}).get("tflops")
    if mm:
        for rate, pct in (("tflops", "flop_pct"), ("bwd_tflops", "bwd_flop_pct")):
            if rec.get(rate):
                row[pct] = 100 * rec[rate] / mm
    return row


def columns_for(records) -> list:
    return COLUMNS + (SBS_COLUMNS if any("fm_wall_ms" in r or "fm_error" in r for r in records) else [])


def table(records, columns, baselines, markdown=False) -> str:
    return mla_bench.table([with_ratios(r, baselines) for r in records], columns, markdown)


def _where(r) -> str:
    return f"{r['suite']} h_q={r['h_q']} s_kv={r['s_kv']} topk={r['topk']}"


def _verdict(value, target) -> str:
    return "met" if value >= target else "MISSED"


def summary_lines(report: dict) -> list[str]:
    """The side by side's geomean and worst row of FlashMLA's time over ours against the issue's
    targets, the backward's TFLOPS over the forward's, the worst checks, and the rows that failed."""
    rows, out = report.get("prefill", []), []
    sbs = [r for r in rows if r.get("fm_over_ours")]
    if sbs:
        g = mla_bench.geomean([r["fm_over_ours"] for r in sbs])
        worst = min(sbs, key=lambda r: r["fm_over_ours"])
        out.append(f"ours vs FlashMLA (FM ms / ours ms, > 1: ours faster): geomean {g:.3f} over {len(sbs)} rows "
                   f"(target >= {TARGETS['geomean']}: {_verdict(g, TARGETS['geomean'])}), worst "
                   f"{worst['fm_over_ours']:.3f} at {_where(worst)} (target >= {TARGETS['worst']}: "
                   f"{_verdict(worst['fm_over_ours'], TARGETS['worst'])}); worst cos_diff FM "
                   f"{max(r['cos_diff_vs_flashmla'] for r in sbs):.1e}")
    bwd = [r for r in rows if r.get("bwd_over_fwd")]
    if bwd:
        worst = min(bwd, key=lambda r: r["bwd_over_fwd"])
        out.append(f"backward / forward TFLOPS: geomean {mla_bench.geomean([r['bwd_over_fwd'] for r in bwd]):.2f}, "
                   f"min {worst['bwd_over_fwd']:.2f} at {_where(worst)} (target >= {TARGETS['bwd_over_fwd']}: "
                   f"{_verdict(worst['bwd_over_fwd'], TARGETS['bwd_over_fwd'])})")
    checked = [r for r in rows if "cos_diff_vs_reference" in r]
    if checked:
        line = (f"against the float32 reference on {checked[0]['check_tokens']} tokens a row: worst cos_diff "
                f"{max(r['cos_diff_vs_reference'] for r in checked):.1e}, worst |lse diff| "
                f"{max(r['lse_diff_vs_reference'] for r in checked):.1e}")
        dq = [r["dq_cos_diff_vs_reference"] for r in checked if "dq_cos_diff_vs_reference" in r]
        out.append(line + (f", worst dq cos_diff {max(dq):.1e}" if dq else ""))
    for key, what in (("fwd_error", "forward"), ("bwd_error", "backward"), ("check_error", "check"),
                      ("fm_error", "FlashMLA")):
        failed = [r for r in rows if r.get(key)]
        if failed:
            out.append(f"{what} not run or failed on {len(failed)} rows, first ({_where(failed[0])}): {failed[0][key]}")
    return out


def render(report: dict, markdown: bool) -> str:
    env, base = report.get("env", {}), report.get("baselines", {})
    lines = [f"Device: {env.get('device')} | jax {env.get('jax')} | path {env.get('kernel_path')} | {env.get('date')}"]
    if base:
        lines.append(mla_bench.baselines_line(base))
    if report.get("flashmla"):
        lines.append(f"FlashMLA: {report['flashmla']}")
    inputs = report.get("inputs")
    if inputs:
        lines.append(f"Indices: {inputs}")
    if "bwd_kernel" in report:
        lines.append("Backward: " + ("the SM90 kernel (JAX_FLASHMLA_SPARSE_PREFILL_BWD_KERNEL=1)" if report["bwd_kernel"]
                                     else "the pure-JAX program (the default; the kernel is opt-in)"))
    if report.get("prefill"):
        lines += ["", "Sparse prefill (forward, and backward with respect to q and kv):",
                  table(report["prefill"], columns_for(report["prefill"]), base, markdown)]
    summary = summary_lines(report)
    if summary:
        lines += [""] + summary
    return "\n".join(lines)


# ==== the command line ============================================================================

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", help="comma-separated suites: v32, v4, all (default all)")
    p.add_argument("--cases", help=f"filter, e.g. 's_kv=8192,h_q=128' (keys {', '.join(FILTER_KEYS)}; a value of "
                                   f"{'/'.join(ADDABLE)} outside a suite adds it)")
    mla_bench.add_settings_args(p, iters=20)
    p.add_argument("--bwd-iters", type=int, default=10, help="timed iterations of the backward (at most --iters)")
    p.add_argument("--no-bwd", action="store_true", help="forward only")
    p.add_argument("--no-sink", action="store_true", help="no attn_sink (FlashMLA's timed cases have one)")
    p.add_argument("--causal", action="store_true",
                   help="token i draws from the kv rows up to position s_kv - s_q + i (default: from all of them)")
    p.add_argument("--invalid", type=float, default=0.0, help="probability of an entry being -1 (default 0)")
    p.add_argument("--check-tokens", type=int, default=64,
                   help="tokens a row checked against the float32 reference (0: no check)")
    p.add_argument("--flashmla", action="store_true",
                   help="time FlashMLA's flash_mla_sparse_fwd on the same inputs in this process (flash_mla, torch)")
    p.add_argument("--sbs-calls", type=int, default=10, help="side by side: back-to-back calls per timing")
    p.add_argument("--sbs-repeats", type=int, default=5, help="side by side: alternating repeats (median)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU in seconds)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print markdown tables at the end")
    p.add_argument("--from-json", help="print the tables of a saved --json file and exit (no measuring)")
    return p


def plan(args) -> list[PrefillCase]:
    """The cases of the command line; ValueError naming the bad option."""
    names = [s.strip() for s in args.suite.split(",") if s.strip()]
    names = list(SUITES) if "all" in names else names
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise ValueError(f"--suite: unknown suite {bad[0] if bad else args.suite!r} (v32, v4, all)")
    if not 0.0 <= args.invalid < 1.0:
        raise ValueError(f"--invalid: expected a probability in [0, 1), got {args.invalid}")
    try:
        return select_prefill_cases(SMOKE_SUITES if args.smoke else SUITES, names,
                                    mla_bench.parse_filter(args.cases, FILTER_KEYS))
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
    inputs = ("each token's topk distinct kv rows " + ("up to its causal position" if args.causal else "of all s_kv") +
              ", uniformly at random, in random order" +
              (f"; each entry -1 with probability {args.invalid}" if args.invalid else "") +
              ("; no attn_sink" if args.no_sink else "; attn_sink standard normal") + "; sm_scale d_qk^-0.5")
    report = mla_bench.start_report(jax, args, settings, suite=args.suite, cases=args.cases, inputs=inputs,
                                    bwd_kernel=jfm.ops.sparse_prefill.bwd_kernel_enabled(),
                                    bwd_iters=None if args.no_bwd else min(args.bwd_iters, settings.iters))
    fm = mla_bench.open_flashmla(report, args.sbs_calls, args.sbs_repeats) if args.flashmla else None
    timer = mla_bench.Timer(jax, settings)
    report["baselines"] = mla_bench.run_baselines(jax, timer, settings)

    cols = columns_for([{"fm_wall_ms": 0}] if fm else [])

    def on_row(rec, first):
        text = table([rec], cols, report["baselines"]).splitlines()
        print("\n".join(text if first else text[1:]))
        for key in ("fwd_error", "bwd_error", "check_error", "fm_error"):
            if rec.get(key):
                print(f"  {key}: {rec[key]}")

    print(f"\n[prefill] {len(cases)} cases")
    report["prefill"] = run_prefill(jax, timer, settings, cases, args, fm, on_row=on_row)
    return mla_bench.finish_report(args, report, render(report, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
