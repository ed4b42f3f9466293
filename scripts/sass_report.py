#!/usr/bin/env python3
"""Static SASS figures of the decode kernels: the instruction mix of each kernel's page loop.

    python3 scripts/sass_report.py OBJECT_OR_CUBIN [--cuobjdump PATH]

The page loop is the innermost backward branch that encloses the kernel's HGMMA instructions; its
body is counted as laid out (so conditional parts, such as the tail-page zeroing and the one
thread that issues TMA loads, are counted once). A change that removes instructions from that body
shows here before any timing. cuobjdump comes with the CUDA toolkit, or from PyPI
(`pip install --target DIR nvidia-cuda-cuobjdump`, binary under DIR/nvidia/cu13/bin).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys

INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.A-Za-z0-9_]*)\s*(.*?);")
FUNC = re.compile(r"Function : (\S+)")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """name -> [(address, opcode, opcode with modifiers + operands)]"""
    out, name = {}, None
    for line in sass.splitlines():
        if m := FUNC.search(line):
            name = m.group(1)
            out[name] = []
        elif name and (m := INSTR.match(line)):
            out[name].append((int(m.group(1), 16), m.group(2), m.group(2) + m.group(3) + " " + m.group(4)))
    return out


def page_loop(instrs):
    """(start, end) addresses of the smallest backward-branch range holding every HGMMA, or None."""
    hgmma = [a for a, op, _ in instrs if op == "HGMMA"]
    if not hgmma:
        return None
    best = None
    for addr, op, text in instrs:
        if op != "BRA" or "U.ANY" in text:
            continue
        m = BRANCH_TARGET.search(text)
        target = int(m.group(1), 16) if m else addr
        if target < addr and target <= min(hgmma) and addr >= max(hgmma):
            if best is None or addr - target < best[1] - best[0]:
                best = (target, addr)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("object")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args()
    sass = subprocess.run([args.cuobjdump, "-sass", args.object], check=True, capture_output=True, text=True).stdout
    for name, instrs in functions(sass).items():
        loop = page_loop(instrs)
        if loop is None:
            continue
        body = [(op, text) for a, op, text in instrs if loop[0] <= a <= loop[1]]
        mix = collections.Counter(op for op, _ in body)
        hgmma = collections.Counter(text.split()[0] for op, text in body if op == "HGMMA")
        print(f"{name}\n  page loop: {len(body)} instructions of {len(instrs)} in the kernel; "
              + ", ".join(f"{k} x{v}" for k, v in sorted(hgmma.items())))
        print("  mix: " + ", ".join(f"{k} {v}" for k, v in mix.most_common(16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
