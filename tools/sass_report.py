#!/usr/bin/env python3
"""Static SASS figures of the decode kernels: the instruction mix of each kernel's page loops.

    python3 tools/sass_report.py OBJECT_OR_CUBIN [--cuobjdump PATH]

A page loop is an innermost backward branch that encloses HGMMA instructions: one per warpgroup's
steady pair body (a kernel whose warpgroups share one loop shows one). Its body is
counted as laid out (so conditional parts, such as the one thread that issues TMA loads, are
counted once). A change that removes instructions from that body shows here before any timing.
cuobjdump comes with the CUDA toolkit, or from PyPI (`pip install --target DIR
nvidia-cuda-cuobjdump`, binary under DIR/nvidia/cu13/bin).
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


def page_loops(instrs):
    """[(start, end)] of the innermost backward-branch ranges that hold an HGMMA, in address order.
    Uniform retry loops (BRA.U.ANY) are not loops of the kernel's own."""
    hgmma = [a for a, op, _ in instrs if op == "HGMMA"]
    ranges = []
    for addr, op, text in instrs:
        if op != "BRA" or "U.ANY" in text:
            continue
        m = BRANCH_TARGET.search(text)
        target = int(m.group(1), 16) if m else addr
        if target < addr and any(target <= h <= addr for h in hgmma):
            ranges.append((target, addr))
    innermost = [r for r in ranges
                 if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    return sorted(set(innermost))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("object")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args()
    sass = subprocess.run([args.cuobjdump, "-sass", args.object], check=True, capture_output=True, text=True).stdout
    for name, instrs in functions(sass).items():
        loops = page_loops(instrs)
        if not loops:
            continue
        print(f"{name}: {len(instrs)} instructions")
        for start, end in loops:
            body = [(op, text) for a, op, text in instrs if start <= a <= end]
            mix = collections.Counter(op for op, _ in body)
            hgmma = collections.Counter(text.split()[0] for op, text in body if op == "HGMMA")
            print(f"  page loop {start:#x}-{end:#x}: {len(body)} instructions; "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(hgmma.items())))
            print("    mix: " + ", ".join(f"{k} {v}" for k, v in mix.most_common(16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
