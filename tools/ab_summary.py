#!/usr/bin/env python3
"""tools/ab_variants.sh's summary: reads its run folder (/tmp/ab/run) and prints markdown.

Files read (all optional): variants.txt (order), status.tsv (variant, key, value; last one wins),
runs.tsv (variant, rep, rc, start, end, secs, json), json/*.json (bench_decode.py --json output:
report["matrix"] = [{b, s_k, h_q, s_q, h_kv, kernel_ms, src, ...}], report["env"]; or
bench_sparse.py's: report["sparse"] = [{fmt, b, s_k, topk, extra_topk, h_q, s_q, kernel_ms, ...}]; or
bench_prefill.py's: report["prefill"] = [{d_qk, s_kv, topk, h_q, s_q, fwd_ms, ...}]), clocks.csv
(nvidia-smi "timestamp, 1980 MHz, 350.12 W"), ptxas_<variant>.txt ("Used N registers | props | fn"),
env.txt.

  python3 ab_summary.py --dir /tmp/ab/run [--field kernel_ms] [--ref base]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import statistics
import sys


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def short_kernel(name: str) -> str:
    """'void ns::decode_kernel<1, true>(ns::Params)' -> 'ns::decode_kernel<1, true>'."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    if name.endswith(")"):  # drop the final parameter list (matching parenthesis)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name[:100]


def parse_ptxas(lines):
    """-> ({kernel: cell}, [warning lines])"""
    out, warns = {}, []
    for line in lines:
        if line.startswith("WARN "):
            warns.append(line[5:].strip())
            continue
        parts = [p.strip() for p in line.split(" | ")]
        if len(parts) < 3:
            continue
        m = re.search(r"Used (\d+) registers", parts[0])
        if not m:
            continue
        nums = {k: int(v) for v, k in re.findall(r"(\d+) bytes (stack frame|spill stores|spill loads)", parts[1])}
        cell = f"{m.group(1)} regs"
        if nums.get("stack frame"):
            cell += f", stack {nums['stack frame']}"
        if nums.get("spill stores") or nums.get("spill loads"):
            cell += f", **spill {nums.get('spill stores', 0)}/{nums.get('spill loads', 0)}**"
        out[short_kernel(" | ".join(parts[2:]))] = cell
    return out, warns


def parse_clocks(lines):
    """-> [(epoch, mhz, watts)]"""
    samples = []
    for row in csv.reader(lines):
        if len(row) < 2:
            continue
        try:
            t = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            mhz = float(row[1].strip().split()[0])
        except (ValueError, IndexError):
            continue
        try:
            w = float(row[2].strip().split()[0]) if len(row) > 2 else None
        except (ValueError, IndexError):
            w = None
        samples.append((t, mhz, w))
    return samples


def case_key(rec):
    """(b, s_k, h_q, s_q, h_kv) of a row; a sparse row's s_k cell names its format, s_k and topk, a
    prefill row's its d_qk, s_kv and topk."""
    if "s_kv" in rec:
        return (None, f"d_qk {rec.get('d_qk')} s_kv {rec.get('s_kv')} topk {rec.get('topk')}", rec.get("h_q"),
                rec.get("s_q"), 1)
    if "topk" in rec:
        s_k = f"{rec.get('fmt')} {rec.get('s_k')} topk {rec.get('topk')}"
        if rec.get("extra_topk"):
            s_k += f"+{rec['extra_topk']}"
        return (rec.get("b"), s_k, rec.get("h_q"), rec.get("s_q"), 1)
    return tuple(rec.get(k) for k in ("b", "s_k", "h_q", "s_q", "h_kv"))


def fmt_stats(xs):
    xs = sorted(xs)
    if not xs:
        return "n/a"
    return f"{xs[0]:.0f} / {statistics.median(xs):.0f} / {xs[-1]:.0f}"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--field", default="kernel_ms")
    p.add_argument("--ref", default="base", help="the reference variant (default base; else the first one)")
    p.add_argument("--elapsed", type=int)
    p.add_argument("--budget", type=int)
    args = p.parse_args(argv)
    d = args.dir
    out = []
    w = out.append

    variants = [v for v in read_lines(os.path.join(d, "variants.txt")) if v.strip()]
    status = {}
    for line in read_lines(os.path.join(d, "status.tsv")):
        parts = line.split("\t", 2)
        if len(parts) == 3:
            status.setdefault(parts[0], {})[parts[1]] = parts[2]
            if parts[0] not in variants:
                variants.append(parts[0])

    runs = []  # dicts
    for line in read_lines(os.path.join(d, "runs.tsv"))[1:]:
        parts = line.split("\t")
        parts += [""] * (7 - len(parts))
        runs.append(dict(variant=parts[0], rep=parts[1], rc=parts[2], start=parts[3], end=parts[4],
                         secs=parts[5], json=parts[6]))
    for r in runs:
        if r["variant"] not in variants:
            variants.append(r["variant"])

    # results[variant][case] = {rep: value}; also remember src and kernel_path per variant
    results, srcs, kpaths, case_keys, notes = {}, {}, {}, [], []
    reps_seen = []
    for r in runs:
        if r["json"] and not os.path.exists(r["json"]):
            # A run folder unpacked elsewhere (ab_logs.tgz): the JSON under this folder's json/.
            r["json"] = os.path.join(d, "json", os.path.basename(r["json"]))
        if not r["json"] or not os.path.exists(r["json"]):
            continue
        try:
            report = json.load(open(r["json"], encoding="utf-8"))
        except (OSError, ValueError) as e:
            notes.append(f"{r['variant']} rep {r['rep']}: unreadable JSON ({e})")
            continue
        kp = report.get("env", {}).get("kernel_path")
        kpaths.setdefault(r["variant"], set()).add(kp)
        if r["rep"] not in reps_seen:
            reps_seen.append(r["rep"])
        for rec in report.get("matrix", []) + report.get("sparse", []) + report.get("prefill", []):
            key = case_key(rec)
            if key not in case_keys:
                case_keys.append(key)
            results.setdefault(r["variant"], {}).setdefault(key, {})[r["rep"]] = rec.get(args.field)
            if rec.get("src") not in (None, "trace"):
                srcs.setdefault(r["variant"], set()).add(rec.get("src"))
    reps_seen.sort(key=lambda x: int(x) if x.isdigit() else 0)

    bench_vs = [v for v in variants if v in results]
    ref = args.ref if args.ref in bench_vs else (bench_vs[0] if bench_vs else None)
    others = [v for v in bench_vs if v != ref]

    clocks = parse_clocks(read_lines(os.path.join(d, "clocks.csv")))

    # ---- header ----
    w(f"# A/B of kernel variants: {' '.join(variants) or '(none)'}")
    env = read_lines(os.path.join(d, "env.txt"))
    for line in env:
        if line.startswith(("date:", "BENCH_ARGS", "VARIANTS")) or re.search(r"MiB|H100|H200|NVIDIA", line):
            w(f"- {line}")
    if args.elapsed is not None:
        w(f"- elapsed {args.elapsed} s (budget {args.budget} s)")
    w("")

    # ---- ptxas ----
    pt, pt_warns = {}, {}
    for v in variants:
        pt[v], pt_warns[v] = parse_ptxas(read_lines(os.path.join(d, f"ptxas_{v}.txt")))
    kernels = []
    for v in variants:
        for k in pt[v]:
            if k not in kernels:
                kernels.append(k)
    if kernels:
        w("## ptxas (registers, stack bytes, spill stores/loads bytes)")
        w("")
        w("| kernel | " + " | ".join(variants) + " |")
        w("|---|" + "---|" * len(variants))
        for k in kernels:
            w(f"| `{k}` | " + " | ".join(pt[v].get(k, "-") for v in variants) + " |")
        for v in variants:
            for line in pt_warns[v][:5]:
                w(f"- {v}: {line[:200]}")
        w("")

    # ---- variants ----
    w("## Variants")
    w("")
    w("| variant | source hash | overlay | build | import | check | pytest | bench runs (s) | SM MHz min/med/max in its runs |")
    w("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        s = status.get(v, {})
        vr = [r for r in runs if r["variant"] == v]
        run_txt = ", ".join(f"r{r['rep']}:{r['secs'] or r['rc']}" + ("" if r["rc"] in ("0", "", "skipped") else f" rc={r['rc']}")
                            for r in vr) or "-"
        vclk = []
        for r in vr:
            try:
                t0, t1 = float(r["start"]), float(r["end"])
            except ValueError:
                continue
            vclk += [m for t, m, _ in clocks if t0 <= t <= t1]
        imp = s.get("import", "-")
        imp_short = (imp.split(" | ", 1)[1] if " | " in imp else imp).replace(" | ", ", ")
        check = s.get("check", "-")
        failed = any(x.startswith("FAILED") for x in (check, s.get("pytest", "")))
        name = f"**{v} FAILED**" if failed else v
        overlay = s.get("overlay", "") or ("(repository tree)" if v == "base" else "(none)")
        cells = [name, s.get("hash", "-"), overlay[:160], s.get("build", "-"), imp_short, check,
                 s.get("pytest", "-"), run_txt, fmt_stats(vclk)]
        w("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        if s.get("warn"):
            notes.append(f"{v}: {s['warn']}")
    for v in variants:
        if kpaths.get(v, set()) - {"cuda-sm90"}:
            notes.append(f"{v}: bench kernel_path {sorted(map(str, kpaths[v]))} (not the SM90 kernel!)")
        if srcs.get(v):
            notes.append(f"{v}: some cases timed by {sorted(srcs[v])}, not the profiler trace")
    skipped = [f"{r['variant']} rep {r['rep']}" for r in runs if r["rc"] == "skipped"]
    if skipped:
        notes.append("not started (budget): " + ", ".join(skipped))
    failed_runs = [f"{r['variant']} rep {r['rep']} rc={r['rc']}" for r in runs if r["rc"] not in ("0", "skipped", "")]
    if failed_runs:
        notes.append("bench runs that failed: " + ", ".join(failed_runs))
    w("")

    # ---- clocks ----
    if clocks:
        watts = [x for _, _, x in clocks if x is not None]
        w(f"SM clock during the bench over {len(clocks)} samples (500 ms): min/median/max "
          f"{fmt_stats([m for _, m, _ in clocks])} MHz" + (f"; power max {max(watts):.0f} W" if watts else ""))
    else:
        w("SM clock: no nvidia-smi samples")
    for n in notes:
        w(f"- NOTE {n}")
    w("")

    # ---- the table ----
    if not bench_vs:
        w("## No bench results")
        print("\n".join(out))
        return 0
    multi_b = len({k[0] for k in case_keys}) > 1 or len({k[4] for k in case_keys}) > 1
    w(f"## {args.field}, " + "/".join(f"rep{r}" for r in reps_seen) + f"; ratio = median({ref}) / median(variant) "
      "over reps (> 1: variant faster)")
    w("")
    head = (["b"] if multi_b else []) + ["s_k", "h_q", "s_q"] + bench_vs + [f"{ref}/{v}" for v in others]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    ratios = {v: [] for v in others}
    slowest = {}  # variant -> (ratio, case) of its lowest ratio

    def cell(v, key):
        vals = results.get(v, {}).get(key, {})
        if not vals:
            return "-"
        return "/".join(f"{vals[r]:.3f}" if isinstance(vals.get(r), (int, float)) else "-" for r in reps_seen)

    for key in case_keys:
        b, s_k, h_q, s_q, h_kv = key
        row = ([f"{b} h_kv={h_kv}"] if multi_b else []) + [str(s_k), str(h_q), str(s_q)]
        row += [cell(v, key) for v in bench_vs]
        ref_m = median(list(results.get(ref, {}).get(key, {}).values()))
        for v in others:
            m = median(list(results.get(v, {}).get(key, {}).values()))
            if ref_m and m:
                ratios[v].append(ref_m / m)
                if v not in slowest or ref_m / m < slowest[v][0]:
                    slowest[v] = (ref_m / m, f"s_k={s_k} h_q={h_q} s_q={s_q}" + (f" b={b} h_kv={h_kv}" if multi_b else ""))
                row.append(f"{ref_m / m:.3f}")
            else:
                row.append("-")
        w("| " + " | ".join(row) + " |")
    geo = []
    for v in others:
        rs = ratios[v]
        geo.append(f"**{math.exp(sum(map(math.log, rs)) / len(rs)):.3f}** ({len(rs)})" if rs else "-")
    w("| " + " | ".join(["geomean"] + [""] * (len(head) - 1 - len(others)) + geo) + " |")
    for v in others:
        rs = ratios[v]
        if rs:
            w(f"- {ref}/{v}: geomean {math.exp(sum(map(math.log, rs)) / len(rs)):.4f}, min {min(rs):.3f} "
              f"({slowest[v][1]}), max {max(rs):.3f} over {len(rs)} cases; "
              f"{sum(r < 0.98 for r in rs)} below 0.98" + (" **(check FAILED)**" if any(
                  x.startswith("FAILED") for x in (status.get(v, {}).get("check", ""),
                                                    status.get(v, {}).get("pytest", ""))) else ""))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
