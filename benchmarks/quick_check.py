"""A two-minute device check: nine correctness cases against the float32 reference, then the wall
time of three standard-matrix cases (b=128, s_k=8192, causal, h_kv=1, bf16).

The full suites are tests/test_gpu_decode.py and benchmarks/bench_decode.py; this is what fits a
two-minute check of a GPU machine. The timings are wall clock of one jitted call (decode + combine, metadata passed
in), median of `--iters` calls: dispatch is included. On the CPU it runs the correctness cases only.

Usage (repository root, package installed):
  python3 benchmarks/quick_check.py [--time-only | --check-only] [--iters 30] [--case H_Q,S_Q ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jfm
from jax_flashmla import testing
from jax_flashmla.reference import reference_math


def cos_diff(x, y) -> float:
    """FlashMLA's closeness measure, 1 - 2 sum(xy) / sum(x^2 + y^2), in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denom = float((x * x + y * y).sum())
    return 0.0 if denom == 0.0 else 1.0 - 2.0 * float((x * y).sum()) / denom


def check(b, s_q, h_q, h_kv, lengths, causal, dtype=jnp.bfloat16, num_sm_parts=None, seed=0) -> bool:
    """Kernel vs reference with FlashMLA's tolerances: cos diff < 1e-5, lse within 8/65536."""
    # Shuffled pages, NaN in every slot no request reads, padding ids -1.
    problem = testing.make_problem(np.random.default_rng(seed), batch=b, seqlen_q=s_q, num_heads_q=h_q,
                                   num_heads_k=h_kv, lengths=lengths, dtype=dtype, spare_pages=3)
    q, k_cache, table, lens = (jnp.asarray(x) for x in problem.args)
    plan = (jfm.get_mla_metadata(lens, s_q * h_q // h_kv, h_kv, num_sm_parts=num_sm_parts)
            if num_sm_parts else (None, None))
    out, lse = jfm.flash_mla_with_kvcache(q, k_cache, table, lens, 512, *plan, causal=causal)
    ref_out, ref_lse = reference_math(q.astype(jnp.float32), k_cache.astype(jnp.float32), table, lens, 512,
                                      576 ** -0.5, causal)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    ref_out, ref_lse = np.asarray(ref_out), np.asarray(ref_lse)
    finite = np.isfinite(ref_lse)
    lse_ok = (np.array_equal(np.isinf(lse), np.isinf(ref_lse))
              and np.allclose(lse[finite], ref_lse[finite], rtol=8 / 65536, atol=1e-5))
    diff = cos_diff(out, ref_out)
    ok = diff < 1e-5 and lse_ok and bool(np.isfinite(out).all())
    print(f"{'OK ' if ok else 'BAD'} b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} causal={causal} {np.dtype(dtype).name} "
          f"num_sm_parts={num_sm_parts} cos_diff={diff:.2e} max|out-ref|={np.max(np.abs(out - ref_out)):.3e}", flush=True)
    return ok


def correctness() -> bool:
    results = [
        check(1, 1, 16, 1, [64], False),
        check(2, 1, 16, 1, [20, 140], False),
        check(2, 2, 16, 1, [20, 140], True),
        check(3, 1, 128, 1, [300, 0, 77], False),
        check(4, 2, 9, 3, [500, 1, 64, 129], True, dtype=jnp.float16),
        check(6, 4, 63, 1, [4096, 20, 140, 0, 1000, 33], True),
        check(2, 1, 64, 8, [4096, 333], False, num_sm_parts=3),
        check(1, 1, 128, 1, [20000], False, num_sm_parts=16),
        check(64, 2, 128, 1, list(np.random.default_rng(1).integers(0, 4096, 64)), True),
    ]
    print(f"correctness: {sum(results)} of {len(results)} cases OK")
    return all(results)


TIMED_CASES = ((16, 1), (64, 1), (128, 2))  # (h_q, s_q)


def timing(iters: int, cases=TIMED_CASES) -> None:
    for h_q, s_q in cases:
        b, s_k = 128, 8192
        rng = np.random.default_rng(0)
        lens = testing.varlen_lengths(rng, b, s_k, min_len=s_q)
        layout = testing.page_layout(rng, lens, pad=0)
        table, num_blocks = layout.block_table, layout.num_blocks
        q = jnp.asarray(rng.standard_normal((b, s_q, h_q, jfm.HEAD_DIM)), jnp.bfloat16)
        k_cache = jax.random.normal(jax.random.key(0), (num_blocks, jfm.PAGE_SIZE, 1, jfm.HEAD_DIM), jnp.bfloat16)
        table, lens_dev = jnp.asarray(table), jnp.asarray(lens)
        plan = jfm.get_mla_metadata(lens_dev, s_q * h_q, 1)
        step = jax.jit(lambda q, k, t, n, md, ns: jfm.flash_mla_with_kvcache(q, k, t, n, 512, md, ns, causal=True))
        jax.block_until_ready(step(q, k_cache, table, lens_dev, *plan))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(step(q, k_cache, table, lens_dev, *plan))
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        total = int(lens.sum())
        flops = 2 * s_q * total * h_q * (576 + 512)
        nbytes = 2 * (total * 576 + b * s_q * h_q * (576 + 512))
        print(f"time h_q={h_q} s_q={s_q} b={b} s_k={s_k}: {t * 1e6:.0f} us  {nbytes / t / 1e9:.0f} GB/s  "
              f"{flops / t / 1e12:.0f} TFLOPS (wall clock of the jitted call, median of {iters})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-only", action="store_true")
    parser.add_argument("--check-only", action="store_true", help="the correctness cases only (e.g. under compute-sanitizer)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--case", action="append", metavar="H_Q,S_Q",
                        help="time only this case (repeatable), e.g. --case 16,1; default: 16,1 64,1 128,2")
    args = parser.parse_args()
    cases = TIMED_CASES if not args.case else tuple(tuple(int(v) for v in c.split(",")) for c in args.case)
    print("backend", jax.default_backend(), "| path", jfm.kernel_path(), "|", jax.devices()[0])
    ok = True if args.time_only else correctness()
    if jax.default_backend() != "cpu" and not args.check_only:
        timing(args.iters, cases)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
