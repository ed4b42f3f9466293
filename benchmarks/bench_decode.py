#!/usr/bin/env python3
"""MLA decode benchmark: the kernel over the standard matrix, with the same run's ceilings.

The standard matrix: b = 128, s_k in {4096, 8192, 16384} (lengths ~ Normal(s_k, s_k/2)), h_q in
{16, 32, 64, 128}, s_q in {1, 2}, causal, h_kv = 1, bf16. Columns and method: benchmarks/mla_bench.py
and docs/performance.md.

  python3 benchmarks/bench_decode.py                                 # the standard matrix
  python3 benchmarks/bench_decode.py --cases s_k=4096,h_q=64/128     # a subset
  python3 benchmarks/bench_decode.py --smoke                         # tiny sizes; runs on the CPU
  python3 benchmarks/bench_decode.py --json out.json --markdown      # save; print a markdown table
  python3 benchmarks/bench_decode.py --from-json out.json --markdown # re-render saved results
  python3 benchmarks/bench_decode.py --no-ref --flashmla             # FlashMLA side by side

--flashmla times FlashMLA's own dense decode on the same inputs in the same process (a `flash_mla`
build and a CUDA torch must import; tools/flashmla_build.sh): both calls with their plans made
outside, wall clock per call over --sbs-calls back-to-back calls, median of --sbs-repeats repeats
that alternate which side goes first, no L2 flush. FM/ours > 1 means ours is faster; "wall BW%" is
the bytes over our side-by-side time, over the same run's copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # mla_bench beside this file
import mla_bench  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    d = mla_bench.Settings()
    p.add_argument("--cases", help="filter, e.g. 's_k=4096,h_q=64/128' (keys b, s_k, h_q, s_q, h_kv; a value outside "
                                   "the matrix adds it)")
    p.add_argument("--iters", type=int, default=d.iters, help="timed iterations of the kernel and of the whole call")
    p.add_argument("--ref-iters", type=int, default=d.ref_iters, help="timed iterations of the plain-XLA reference")
    p.add_argument("--baseline-iters", type=int, default=d.baseline_iters, help="of the copy and the matmul")
    p.add_argument("--copy-mib", type=int, default=d.copy_mib, help="the copy-bandwidth buffer")
    p.add_argument("--matmul-n", type=int, default=d.matmul_n, help="the bf16 n^3 matmul")
    p.add_argument("--flush-mib", type=int, default=d.flush_mib,
                   help="L2 flush buffer touched before each iteration (0: off)")
    p.add_argument("--flush-kind", choices=("write", "read"), default=d.flush_kind,
                   help="rewrite the flush buffer (FlashMLA's tests' way) or only read it (leaves no dirty lines)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-ref", action="store_true", help="skip the plain-XLA reference")
    p.add_argument("--no-trace", action="store_true", help="wall clock only (no profiler)")
    p.add_argument("--trace-dir", help="keep the profiler traces here (default: temporary, deleted)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU in seconds)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    p.add_argument("--from-json", help="print the table of a saved --json file and exit (no measuring)")
    p.add_argument("--verbose", action="store_true", help="per-trace attribution of the kernels")
    p.add_argument("--flashmla", action="store_true",
                   help="time FlashMLA's dense decode on the same inputs in this process (flash_mla and torch)")
    p.add_argument("--sbs-calls", type=int, default=30, help="side by side: back-to-back calls per timing")
    p.add_argument("--sbs-repeats", type=int, default=7, help="side by side: alternating repeats (median)")
    return p


def print_report(report: dict, markdown: bool) -> None:
    base = report.get("baselines", {})
    print("\n==== summary ====")
    for k, v in report.get("env", {}).items():
        print(f"{k}: {v}")
    if base:
        print(f"copy: {mla_bench._f(base['copy'].get('gbps'), 'num')} GB/s ({base['copy']['src']}), "
              f"matmul: {mla_bench._f(base['matmul'].get('tflops'), 'num')} TFLOPS ({base['matmul']['src']})")
    records = report.get("matrix", [])
    cols = mla_bench._columns(records)
    for i, rec in enumerate(records):
        print(mla_bench.format_row(rec, base, header=i == 0, columns=cols))
    if report.get("flashmla"):
        print(f"FlashMLA: {report['flashmla']}")
    for line in mla_bench.side_by_side_summary(records):
        print(line)
    if markdown:
        print("\n" + mla_bench.markdown(report))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            print_report(json.load(f), args.markdown)
        return 0
    try:
        cases = mla_bench.select_cases(mla_bench.SMOKE if args.smoke else mla_bench.STANDARD,
                                       mla_bench.parse_filter(args.cases))
    except ValueError as e:
        raise SystemExit(f"--cases: {e}")
    settings = mla_bench.settings_from(args)

    import jax
    env = mla_bench.environment(jax, settings, smoke=args.smoke)
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if env["kernel_path"] != "cuda-sm90":
        print(f"NOTE: decode lowers to {env['kernel_path']!r}, not the SM90 kernel: the 'kernel' figures "
              "measure that path.")

    timer = mla_bench.Timer(jax, settings)
    report = {"env": env, "settings": dataclasses.asdict(settings), "cases": args.cases}
    fm = mla_bench.open_flashmla(report, args.sbs_calls, args.sbs_repeats) if args.flashmla else None
    report["baselines"] = mla_bench.run_baselines(jax, timer, settings)
    print(f"\n[matrix] {len(cases)} cases")
    cols = mla_bench._columns([dataclasses.asdict(c) for c in cases])
    report["matrix"] = mla_bench.run_matrix(
        jax, timer, settings, cases, fm=fm, sbs_calls=args.sbs_calls, sbs_repeats=args.sbs_repeats,
        on_row=lambda rec, first: print(mla_bench.format_row(rec, report["baselines"], header=first, columns=cols)))
    if args.json:
        mla_bench.write_json(args.json, report)
    print_report(report, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
