#!/usr/bin/env python3
"""This package's benchmark results beside FlashMLA's own figures on the same kind of GPU.

FlashMLA's figures are a markdown file measured elsewhere (FlashMLA's tests timed with torch, see
docs/performance.md): a table with columns s_k, h_q, s_q, "FlashMLA ms", TFLOPS, GB/s and "plain XLA
ms", and a line naming that run's "copy N GB/s" and "matmul N TFLOPS". Absolute times move between
runs and machines, so the comparison that holds is of ratios: FM BW% and FM FLOP% divide FlashMLA's
rates by the copy and matmul of its own run, as BW% and FLOP% do ours.

    python3 tools/flashmla_anchors.py ANCHORS.md BENCH.json     # BENCH.json: bench_decode.py --json
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def read_anchors(text: str) -> dict:
    """{'rows': {(s_k, h_q, s_q): {column: value}}, 'copy_gbps', 'matmul_tflops'} from the markdown
    (the first table whose header names s_k, h_q and s_q; columns found by their header names)."""
    rows, header = {}, None
    for line in text.splitlines():
        if not line.strip().startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        rec = dict(zip(header, cells))
        try:
            key = (int(rec["s_k"]), int(rec["h_q"]), int(rec["s_q"]))
        except (KeyError, ValueError):
            continue
        vals = {}
        for col, v in rec.items():
            try:
                vals[col] = float(v)
            except ValueError:
                pass
        rows.setdefault(key, vals)
    out = {"rows": rows}
    copy = re.search(r"copy\s+([\d.]+)\s*GB/s", text)
    matmul = re.search(r"matmul\s+([\d.]+)\s*TFLOPS", text)
    if copy:
        out["copy_gbps"] = float(copy.group(1))
    if matmul:
        out["matmul_tflops"] = float(matmul.group(1))
    return out


def compare(anchors: dict, rec: dict, baselines: dict) -> dict:
    """FlashMLA's figures for one standard-matrix record (b = 128, h_kv = 1) and both sides' ratios
    to their own run's copy and matmul; {} where FlashMLA has no such row."""
    if rec.get("b") != 128 or rec.get("h_kv") != 1:
        return {}
    row = anchors["rows"].get((rec["s_k"], rec["h_q"], rec["s_q"]))
    if not row:
        return {}
    out = {"fm_ms": row.get("FlashMLA ms"), "ms": rec.get("kernel_ms")}
    if out["fm_ms"] and out["ms"]:
        out["fm_over_ours"] = out["fm_ms"] / out["ms"]
    copy, mm = baselines.get("copy", {}).get("gbps"), baselines.get("matmul", {}).get("tflops")
    if row.get("GB/s") and anchors.get("copy_gbps"):
        out["fm_bw_pct"] = 100 * row["GB/s"] / anchors["copy_gbps"]
    if row.get("TFLOPS") and anchors.get("matmul_tflops"):
        out["fm_flop_pct"] = 100 * row["TFLOPS"] / anchors["matmul_tflops"]
    if rec.get("gbps") and copy:
        out["bw_pct"] = 100 * rec["gbps"] / copy
    if rec.get("tflops") and mm:
        out["flop_pct"] = 100 * rec["tflops"] / mm
    return out


COLUMNS = [("s_k", "s_k", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"), ("ms", "ms", ".3f"),
           ("FM ms", "fm_ms", ".3f"), ("FM/ours", "fm_over_ours", ".2f"), ("BW%", "bw_pct", ".1f"),
           ("FM BW%", "fm_bw_pct", ".1f"), ("FLOP%", "flop_pct", ".1f"), ("FM FLOP%", "fm_flop_pct", ".1f")]


def table(anchors: dict, report: dict) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for rec in report.get("matrix", []):
        row = compare(anchors, rec, report.get("baselines", {}))
        if row:
            row.update({k: rec[k] for k in ("s_k", "h_q", "s_q")})
            lines.append("| " + " | ".join("n/a" if row.get(k) is None else format(row[k], f)
                                            for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("anchors", help="FlashMLA's figures (markdown)")
    p.add_argument("bench_json", help="benchmarks/bench_decode.py --json output")
    args = p.parse_args(argv)
    with open(args.anchors, encoding="utf-8") as f:
        anchors = read_anchors(f.read())
    with open(args.bench_json, encoding="utf-8") as f:
        report = json.load(f)
    print(f"FlashMLA: {args.anchors} (its run: copy {anchors.get('copy_gbps')} GB/s, matmul "
          f"{anchors.get('matmul_tflops')} TFLOPS); ours: {report.get('env', {}).get('device')}")
    print(table(anchors, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
