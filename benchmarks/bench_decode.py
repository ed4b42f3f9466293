#!/usr/bin/env python3
"""MLA decode benchmark: jax_flashmla's kernel over DESIGN.md's standard matrix, with the figures of §4.

Per case (b=128, s_k in {4096, 8192, 16384}, h_q in {16, 32, 64, 128}, s_q in {1, 2}, causal, h_kv=1,
bf16; lengths ~ Normal(s_k, s_k/2) clipped to >= 2, one draw per s_k from --seed; pages shuffled):

  kernel ms   device time of one decode call (decode + combine kernels; the plan is computed once,
              outside): from the JAX profiler, first kernel start to last kernel end of each
              iteration (its "span"; kernels that overlap, e.g. under programmatic dependent launch,
              count once), median over --iters (50) iterations with the L2 flushed before each.
              The JSON record adds kernel_parts_ms: per kernel name (decode, combine), the median
              of its time per iteration, so the two can be told apart where they overlap.
  tail us     of kernel ms, the part after the decode kernel's end (the combine's wait release, its
              work and its end), median over the same iterations.
  call ms     wall clock of the whole jitted call (metadata + decode + combine), block_until_ready,
              median, L2 flushed before each.
  queued ms   the same call --queue-calls (20) times back to back with one block_until_ready, wall
              clock per call, median of 5 repeats: host dispatch overlaps earlier calls, as in a
              serving loop (the first call's dispatch and the final sync are spread over the calls).
  steady ms   per call in that loop's steady state: (time of 2x --queue-calls calls - time of
              --queue-calls calls) / --queue-calls, median of the same 5 repeats; the fixed cost of
              filling and draining the queue cancels.
  k.steady ms the kernel-only call (the plan computed outside, as for kernel ms) in the same loop,
              its repeats taking turns with the whole call's; "call/k" = steady ms / k.steady ms,
              the whole call's cost over the kernels' under the same load (a clock that drops under
              sustained load slows both).
  q.span ms   the same queued calls seen by the profiler: first kernel start to last kernel end over
              the --queue-calls calls, per call (median of 3): what a call costs the device in a loop
              that does not wait, metadata kernel and every gap between kernels and calls included.
  TFLOPS, GB/s  FlashMLA's formulas over kernel ms: FLOPs = 2 s_q sum(len) h_q (576 + 512),
              bytes = 2 (sum(len) h_kv 576 + b s_q h_q (576 + 512)).
  BW%, FLOP%  GB/s over this run's device-to-device copy bandwidth (a buffer of default 2 GiB updated
              elementwise, as bf16 x + 1 and as uint32 x ^ 1, the faster counting; bytes read +
              written) and TFLOPS over this run's bf16 8192^3 matmul.
  XLA ms      the plain-XLA reference (jitted mla_decode_reference: gather + einsum + softmax),
              device time measured the same way; speedup = XLA ms / kernel ms.
  FM ...      FlashMLA's figures on this workplace's H100 from anchors/flashmla_h100.md, read at run
              time (--anchors, else ../shared/anchors/ or /work/shared/anchors/); absent if not found.
              FM BW% / FM FLOP% divide them by the copy and matmul figures of FlashMLA's own run.

--mode step: a decode step, the plan computed once and --layers decode calls in one jit (a different
q and, memory allowing, a different cache per layer): device busy time (union of kernel intervals),
span and the step's wall clock; overhead = 1 - busy / wall. "queued ms" is the wall clock per step of
--step-queue steps dispatched back to back with one sync (a serving loop that does not wait for
each step), and "q.ovh%" = 1 - busy / queued ms; "steady ms" and "s.ovh%" the same in the loop's
steady state (as in the matrix: 2x --step-queue steps less --step-queue steps, per step).
"l.steady ms" is the step's decode calls alone (a jit of the same --layers calls, the plan given)
in the same loop, its repeats taking turns with the step's, and "step/l" = steady ms / l.steady ms:
what the plan's kernel and the step's dispatch add under the same load. The same queued steps
under the profiler give "q.busy ms" and "q.span ms" per step (union of kernel intervals; first
kernel start to last kernel end) and "q.gap%" = 1 - q.busy / q.span: the device
time lost between kernels and between steps while steps are queued, against kernel time measured in
the same run (so a clock that drops under sustained load shows as q.busy > busy, not as overhead).

Device times come from `jax.profiler.trace`: the written *.xplane.pb is read with
jax.profiler.ProfileData. Each timed iteration runs inside a TraceAnnotation; device events (GPU
planes "/device:GPU:N", lines "Stream #..."; kernels carry a "kernel_details" stat) are attributed
to the iteration whose annotation window holds their start, keeping those whose "hlo_module" stat
names the timed function. Where the trace holds no GPU plane (CPU runs), the kernel column falls back
to the wall clock of the kernel-only call and says so ("src" column).

  python3 benchmarks/bench_decode.py                       # the standard matrix, then the step mode
  python3 benchmarks/bench_decode.py --cases s_k=4096,h_q=64/128 --iters 50
  python3 benchmarks/bench_decode.py --smoke               # tiny sizes; runs on the CPU
  python3 benchmarks/bench_decode.py --json out.json --markdown
  python3 benchmarks/bench_decode.py --from-json out.json --markdown   # re-render saved results
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

HEAD_DIM = 576
HEAD_DIM_V = 512
PAGE = 64
ANNOTATION_PREFIX = "jfm_bench"
TIMED_KINDS = ("kernel", "memcpy", "memset", "graph")
# Stat that marks what a device event is (XLA's CUPTI collector adds one of these per event).
KIND_STATS = {"kernel_details": "kernel", "memcpy_details": "memcpy", "memset_details": "memset",
              "cuda_graph_exec_id": "graph", "memalloc_details": "alloc", "memfree_details": "free",
              "memory_residency_details": "residency"}


# ==== reading the profiler's trace ==================================================================

def _profile_data_class():
    try:
        from jax.profiler import ProfileData
        return ProfileData
    except ImportError:
        try:
            from jax._src.lib import _profile_data
            return _profile_data.ProfileData
        except ImportError:
            return None


@dataclasses.dataclass
class DeviceEvent:
    name: str
    kind: str  # kernel, memcpy, memset, graph, alloc, free, residency, other
    start: float  # ns
    end: float  # ns
    module: str | None
    plane: str
    line: str


@dataclasses.dataclass
class Window:
    label: str
    index: int
    start: float
    end: float


def _stats(obj) -> dict:
    out = {}
    try:
        for name, value in obj.stats:
            if name is not None:
                out[name] = value
    except Exception:  # noqa: BLE001  (stats of unknown metadata; keep what was read)
        pass
    return out


def is_device_plane(name: str) -> bool:
    return name.startswith("/device:GPU") or name.startswith("/device:CUDA")


def is_stream_line(name: str) -> bool:
    # Raw CUPTI lines are "Stream #<id>(<kinds>)"; "CUPTI overhead" and any derived lines
    # ("XLA Ops", "XLA Modules", "Steps", ...) would double count.
    return name.startswith("Stream #")


def parse_trace(profile) -> tuple[list[DeviceEvent], list[Window], dict]:
    """Device events and our iteration windows from a ProfileData, plus a description of the trace."""
    events, windows = [], []
    info = {"planes": [], "device_lines": collections.OrderedDict()}
    for plane in profile.planes:
        info["planes"].append(plane.name)
        if is_device_plane(plane.name):
            for line in plane.lines:
                kinds = collections.Counter()
                keep = is_stream_line(line.name)
                for ev in line.events:
                    stats = _stats(ev)
                    kind = next((KIND_STATS[k] for k in KIND_STATS if k in stats), "other")
                    kinds[kind] += 1
                    if keep:
                        module = stats.get("hlo_module")
                        events.append(DeviceEvent(ev.name, kind, float(ev.start_ns), float(ev.end_ns),
                                                  None if module is None else str(module), plane.name, line.name))
                info["device_lines"][f"{plane.name} | {line.name}{'' if keep else ' (skipped)'}"] = dict(kinds)
        elif plane.name.startswith("/host:"):
            for line in plane.lines:
                for ev in line.events:
                    if ev.name.startswith(ANNOTATION_PREFIX + "|"):
                        _, label, index = ev.name.split("|")
                        windows.append(Window(label, int(index), float(ev.start_ns), float(ev.end_ns)))
    windows.sort(key=lambda w: w.start)
    return events, windows, info


def describe_trace(info: dict) -> str:
    lines = [f"  planes: {info['planes']}"]
    if not info["device_lines"]:
        lines.append("  no GPU plane (/device:GPU:N) in the trace: device times unavailable")
    for name, kinds in info["device_lines"].items():
        lines.append(f"  {name}: {kinds}")
    return "\n".join(lines)


def _module_matches(module: str | None, hint: str) -> bool:
    return module is not None and hint in module


@dataclasses.dataclass
class IterationTimes:
    span_ms: list  # first start .. last end
    busy_ms: list  # union of event intervals
    sum_ms: list  # sum of event durations
    events: list  # events per iteration
    names: dict  # name -> count in the first iteration with events
    name_ms: dict  # name -> per-iteration sum of that kernel's durations
    tail_ms: list  # per iteration: last end - the decode kernel's last end (iterations that have one)
    method: str


def _union_ns(intervals) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


DECODE_KERNEL = "decode_kernel"  # in the decode kernel's (demangled) name, not in the combine's


def attribute(events, windows, label: str, module_hint: str) -> IterationTimes | None:
    """Per-iteration device times of `label`: events starting inside the iteration's window
    (up to the next window's start), restricted to the timed function's module when events carry
    one; if that keeps nothing, events inside the strict window; if there are no windows, runs of
    consecutive module events."""
    timed = sorted((e for e in events if e.kind in TIMED_KINDS), key=lambda e: e.start)
    if not timed:
        return None
    mine = [w for w in windows if w.label == label]
    groups, method = [], "window+module"
    if mine:
        starts = [w.start for w in windows]
        for w in mine:
            nxt = next((s for s in starts if s > w.start), math.inf)
            loose = [e for e in timed if w.start <= e.start < nxt]
            chosen = [e for e in loose if _module_matches(e.module, module_hint)]
            if not chosen:
                chosen = [e for e in loose if e.start <= w.end]
                if chosen:
                    method = "window"
            groups.append(chosen)
    else:
        method, run = "module-runs", []
        for e in timed:
            if _module_matches(e.module, module_hint):
                run.append(e)
            elif run:
                groups.append(run)
                run = []
        if run:
            groups.append(run)
    groups = [g for g in groups if g]
    if not groups:
        return None
    name_ms, tail_ms = collections.defaultdict(list), []
    for g in groups:
        decode_ends = [e.end for e in g if DECODE_KERNEL in e.name]
        if decode_ends:
            tail_ms.append((max(e.end for e in g) - max(decode_ends)) / 1e6)
        per_iteration = collections.Counter()
        for e in g:
            per_iteration[e.name] += (e.end - e.start) / 1e6
        for name, ms in per_iteration.items():
            name_ms[name].append(ms)
    return IterationTimes(
        span_ms=[(max(e.end for e in g) - min(e.start for e in g)) / 1e6 for g in groups],
        busy_ms=[_union_ns((e.start, e.end) for e in g) / 1e6 for g in groups],
        sum_ms=[sum(e.end - e.start for e in g) / 1e6 for g in groups],
        events=[len(g) for g in groups],
        names=dict(collections.Counter(e.name for e in groups[0])),
        name_ms=dict(name_ms),
        tail_ms=tail_ms,
        method=method,
    )


def _newest_xplane(trace_dir: str) -> str | None:
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    return max(files, key=os.path.getmtime) if files else None


# ==== timing harness ===============================================================================

def median(xs):
    return statistics.median(xs) if xs else None


class Timer:
    def __init__(self, jax, args):
        self.jax = jax
        self.args = args
        self.profile_data = _profile_data_class()
        self.trace_described = False
        self.trace_ok = self.profile_data is not None and not args.no_trace
        self._flush_step = None  # runs one flush and returns its result (not yet waited for)
        if args.flush_mib > 0:
            import jax.numpy as jnp
            n = args.flush_mib * (1 << 20) // 4
            self._flush_buf = jnp.zeros((n,), jnp.float32)
            # Both kinds evict the caches from the L2. "write" (FlashMLA's way: its tests rewrite a
            # buffer) also leaves the buffer's last lines dirty there, to be written back during the
            # next kernel; "read" leaves nothing dirty. Both are named bench_l2_flush, so the trace
            # parser drops them from the timed iterations.
            if args.flush_kind == "write":
                def bench_l2_flush(x):
                    return x + 1.0
                rewrite = jax.jit(bench_l2_flush, donate_argnums=0)

                def step():
                    self._flush_buf = rewrite(self._flush_buf)
                    return self._flush_buf
            else:
                def bench_l2_flush(x):
                    return jnp.sum(x)
                read = jax.jit(bench_l2_flush)

                def step():
                    return read(self._flush_buf)
            self._flush_step = step
            self.flush()

    def flush(self):
        if self._flush_step is not None:
            self._flush_step().block_until_ready()

    def wall_ms(self, fn, iters: int) -> list:
        times = []
        for _ in range(iters):
            self.flush()
            t0 = time.perf_counter()
            self.jax.block_until_ready(fn())
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def queued_ms(self, fns: dict, calls: int = 20, repeats: int = 5) -> dict:
        """Wall clock per call of `calls` back-to-back calls with one sync at the end (no L2 flush
        between them), once per repeat: what a serving loop that does not wait for each step
        sees, host dispatch overlapping the device work of earlier calls. Each repeat also runs
        2 `calls` calls; (time of 2 `calls` - time of `calls`) / `calls` is the loop's steady cost
        per call, without the fixed cost of filling the queue (the first call's dispatch) and
        draining it (the final sync). The functions in `fns` take turns within each repeat, so
        that a clock that drops under sustained load slows all of them alike and their ratio
        stays fair. Returns {label: (per-call times, steady per-call times)}."""
        result = {label: ([], []) for label in fns}
        for _ in range(repeats):
            for label, fn in fns.items():
                batch_ms = []
                for n in (calls, 2 * calls):
                    self.flush()
                    t0 = time.perf_counter()
                    outs = [fn() for _ in range(n)]
                    self.jax.block_until_ready(outs)
                    batch_ms.append((time.perf_counter() - t0) * 1e3)
                    del outs
                result[label][0].append(batch_ms[0] / calls)
                result[label][1].append((batch_ms[1] - batch_ms[0]) / calls)
        return result

    def device_ms(self, jobs) -> dict:
        """jobs: [(label, fn, iters, module_hint)] with fn() -> arrays. Runs all of them inside one
        profiler trace; returns {label: IterationTimes or None}."""
        if not self.trace_ok:
            return {label: None for label, *_ in jobs}
        jax = self.jax
        base = self.args.trace_dir or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        trace_dir = tempfile.mkdtemp(prefix="jfm_trace_", dir=base)
        try:
            with jax.profiler.trace(trace_dir):
                for label, fn, iters, _ in jobs:
                    for i in range(iters):
                        self.flush()
                        with jax.profiler.TraceAnnotation(f"{ANNOTATION_PREFIX}|{label}|{i}"):
                            jax.block_until_ready(fn())
            path = _newest_xplane(trace_dir)
            if path is None:
                print(f"  [trace] no *.xplane.pb written under {trace_dir}: device times unavailable")
                self.trace_ok = False
                return {label: None for label, *_ in jobs}
            events, windows, info = parse_trace(self.profile_data.from_file(path))
        finally:
            if not self.args.trace_dir:
                shutil.rmtree(trace_dir, ignore_errors=True)
        if not self.trace_described or self.args.verbose:
            print("  [trace] " + os.path.basename(path) + f": {len(events)} device events, {len(windows)} windows")
            print(describe_trace(info))
            self.trace_described = True
        if not info["device_lines"]:
            self.trace_ok = False  # CPU: no device plane to read, later calls skip tracing
        results = {}
        for label, _, iters, hint in jobs:
            times = attribute(events, windows, label, hint)
            results[label] = times
            if times is not None and (self.args.verbose or len(times.span_ms) != iters):
                print(f"  [trace] {label}: {len(times.span_ms)}/{iters} iterations ({times.method}), "
                      f"events/iter {sorted(set(times.events))}, first: {times.names}")
            elif times is None and info["device_lines"]:
                print(f"  [trace] {label}: no device events attributed")
        return results


# ==== problems ====================================================================================

@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    s_k: int
    h_q: int
    s_q: int
    h_kv: int = 1

    @property
    def name(self):
        return f"b={self.b} s_k={self.s_k} h_q={self.h_q} s_q={self.s_q} h_kv={self.h_kv}"


STANDARD = dict(b=[128], s_k=[4096, 8192, 16384], h_q=[16, 32, 64, 128], s_q=[1, 2])
SMOKE = dict(b=[4], s_k=[128, 320], h_q=[16, 32], s_q=[1, 2])


def parse_filter(text: str | None) -> dict:
    """'s_k=4096,h_q=64/128' -> {'s_k': {4096}, 'h_q': {64, 128}}."""
    if not text:
        return {}
    out = {}
    for term in text.split(","):
        key, _, values = term.partition("=")
        key = key.strip()
        if key not in ("b", "s_k", "h_q", "s_q") or not values:
            raise SystemExit(f"--cases: bad term {term!r} (keys b, s_k, h_q, s_q; values separated by '/' or '|')")
        out[key] = {int(v) for v in re.split(r"[/|]", values) if v}
    return out


def select_cases(grid: dict, flt: dict) -> list[Case]:
    cases = []
    for s_k in grid["s_k"]:
        for h_q in grid["h_q"]:
            for s_q in grid["s_q"]:
                for b in grid["b"]:
                    c = Case(b=b, s_k=s_k, h_q=h_q, s_q=s_q)
                    if all(getattr(c, k) in v for k, v in flt.items()):
                        cases.append(c)
    return cases


def draw_lengths(b: int, s_k: int, min_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, s_k])
    return np.maximum(rng.normal(s_k, s_k / 2, size=b), min_len).astype(np.int32)


def flops_and_bytes(lengths, b, s_q, h_q, h_kv):
    total = int(np.sum(lengths, dtype=np.int64))
    flops = 2 * s_q * total * h_q * (HEAD_DIM + HEAD_DIM_V)
    nbytes = 2 * (total * h_kv * HEAD_DIM + b * s_q * h_q * (HEAD_DIM + HEAD_DIM_V))
    return flops, nbytes


class Pool:
    """One paged cache (or several) for a given (b, s_k): shuffled pages, lengths from draw_lengths."""

    def __init__(self, jax, b, s_k, h_kv, min_len, seed, copies=1):
        import jax.numpy as jnp
        self.lengths = draw_lengths(b, s_k, min_len, seed)
        pages = -(-self.lengths // PAGE)
        num_blocks = int(pages.sum())
        rng = np.random.default_rng([seed, s_k, 1])
        ids = rng.permutation(num_blocks).astype(np.int32)
        table = np.zeros((b, int(pages.max())), np.int32)  # padding 0: a valid id, never read
        offsets = np.concatenate([[0], np.cumsum(pages)])
        for i in range(b):
            table[i, :pages[i]] = ids[offsets[i]:offsets[i + 1]]
        self.block_table = jnp.asarray(table)
        self.cache_seqlens = jnp.asarray(self.lengths)
        self.shape = (num_blocks, PAGE, h_kv, HEAD_DIM)
        keys = jax.random.split(jax.random.PRNGKey(seed * 7919 + s_k), copies)
        self.caches = [jax.random.normal(k, self.shape, jnp.bfloat16) for k in keys]
        jax.block_until_ready(self.caches)

    @property
    def nbytes(self):
        return math.prod(self.shape) * 2


# ==== anchors =====================================================================================

def find_anchors(path_arg: str | None) -> str | None:
    if path_arg:
        if not os.path.exists(path_arg):
            print(f"WARNING: --anchors {path_arg}: no such file")
            return None
        return path_arg
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.environ.get("JAX_FLASHMLA_ANCHORS"),
                 os.path.join(here, "..", "shared", "anchors", "flashmla_h100.md"),
                 os.path.join(here, "..", "..", "shared", "anchors", "flashmla_h100.md"),
                 "/work/shared/anchors/flashmla_h100.md"):
        if cand and os.path.exists(cand):
            return os.path.normpath(cand)
    return None


def read_anchors(path: str | None) -> dict:
    """{'rows': {(s_k, h_q, s_q): {column: value}}, 'copy_gbps', 'matmul_tflops', 'path'} from the
    markdown table of the anchors file (columns found by their header names)."""
    if not path:
        return {}
    text = open(path, encoding="utf-8").read()
    rows, header = {}, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.strip().startswith("|") else None
        if not cells:
            header = None
            continue
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
        rows[key] = vals
    out = {"rows": rows, "path": path}
    copy = re.search(r"copy\s+([\d.]+)\s*GB/s", text)
    matmul = re.search(r"matmul\s+([\d.]+)\s*TFLOPS", text)
    if copy:
        out["copy_gbps"] = float(copy.group(1))
    if matmul:
        out["matmul_tflops"] = float(matmul.group(1))
    return out


def anchor_figures(anchors: dict, case: dict) -> dict:
    """FlashMLA's figures for a standard-matrix case (b=128, h_kv=1), or {}."""
    if not anchors or case["b"] != 128 or case["h_kv"] != 1:
        return {}
    row = anchors["rows"].get((case["s_k"], case["h_q"], case["s_q"]))
    if not row:
        return {}
    out = {"fm_ms": row.get("FlashMLA ms"), "fm_tflops": row.get("TFLOPS"), "fm_gbps": row.get("GB/s"),
           "fm_xla_ms": row.get("plain XLA ms")}
    if out["fm_gbps"] and anchors.get("copy_gbps"):
        out["fm_bw_pct"] = 100 * out["fm_gbps"] / anchors["copy_gbps"]
    if out["fm_tflops"] and anchors.get("matmul_tflops"):
        out["fm_flop_pct"] = 100 * out["fm_tflops"] / anchors["matmul_tflops"]
    if out["fm_ms"] and case.get("kernel_ms"):
        out["fm_over_ours"] = out["fm_ms"] / case["kernel_ms"]
    return out


# ==== the measurements ============================================================================

def measure_baselines(jax, timer: Timer, args) -> dict:
    """The copy bandwidth and matmul rate of this device, measured in this run. The copy is an
    elementwise update of a --copy-mib buffer (bytes read + written), written two ways: bf16 `x + 1`
    and uint32 `x ^ 1`. XLA's bf16 kernel fell short of the device on an H200 (3360 GB/s against
    4264 for torch's in-place add, 2026-11-30), so the faster of the two is the ceiling reported."""
    import jax.numpy as jnp
    res = {}
    n_bytes = args.copy_mib * (1 << 20)
    state = {"bf16": jnp.zeros((n_bytes // 2,), jnp.bfloat16), "u32": jnp.zeros((n_bytes // 4,), jnp.uint32)}

    def bench_copy_bf16(x):
        return x + jnp.bfloat16(1)

    def bench_copy_u32(x):
        return x ^ jnp.uint32(1)
    updates = {"bf16": jax.jit(bench_copy_bf16, donate_argnums=0), "u32": jax.jit(bench_copy_u32, donate_argnums=0)}

    def copy_step(kind):
        def step():
            state[kind] = updates[kind](state[kind])
            return state[kind]
        return step

    m = args.matmul_n
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(ka, (m, m), jnp.bfloat16)
    b = jax.random.normal(kb, (m, m), jnp.bfloat16)

    def bench_matmul(a, b):
        return a @ b
    matmul = jax.jit(bench_matmul)

    fns = {"copy_bf16": copy_step("bf16"), "copy_u32": copy_step("u32"), "matmul": lambda: matmul(a, b)}
    sizes = {"copy_bf16": f"{args.copy_mib} MiB, bf16 x + 1, read+write",
             "copy_u32": f"{args.copy_mib} MiB, uint32 x ^ 1, read+write", "matmul": f"bf16 {m}^3"}
    amounts = {"copy_bf16": (2 * n_bytes, "gbps"), "copy_u32": (2 * n_bytes, "gbps"), "matmul": (2 * m ** 3, "tflops")}
    for fn in fns.values():
        jax.block_until_ready(fn())
    dev = timer.device_ms([(label, fn, args.baseline_iters, "bench_" + label) for label, fn in fns.items()])
    measured = {}
    for label, fn in fns.items():
        amount, unit = amounts[label]
        t = dev.get(label)
        src = "trace"
        if t is None:
            ms = median(timer.wall_ms(fn, args.baseline_iters))
            src = "wall"
        else:
            ms = median(t.span_ms)
        rate = amount / (ms * 1e-3) / (1e9 if unit == "gbps" else 1e12)
        measured[label] = {"ms": ms, unit: rate, "src": src, "size": sizes[label]}
    res["copy"] = dict(max((measured["copy_bf16"], measured["copy_u32"]), key=lambda r: r["gbps"]))
    res["copy"]["variants"] = {label: measured[label]["gbps"] for label in ("copy_bf16", "copy_u32")}
    res["matmul"] = measured["matmul"]
    del state
    return res


def run_matrix(jax, timer: Timer, args, cases: list[Case], baselines=None, anchors=None) -> list[dict]:
    import jax.numpy as jnp
    import jax_flashmla as jfm

    def bench_kernel_call(q, k_cache, block_table, cache_seqlens, tile_md, num_splits):
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_md, num_splits,
                                          causal=True)

    def bench_whole_call(q, k_cache, block_table, cache_seqlens):
        rows = q.shape[1] * q.shape[2] // k_cache.shape[2]
        tile_md, num_splits = jfm.get_mla_metadata(cache_seqlens, rows, k_cache.shape[2])
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_md, num_splits,
                                          causal=True)

    def bench_xla_reference(q, k_cache, block_table, cache_seqlens):
        return jfm.mla_decode_reference(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, causal=True)

    def cos_diff(x, y):
        x = x.astype(jnp.float32).ravel()
        y = y.astype(jnp.float32).ravel()
        return 1 - 2 * jnp.vdot(x, y) / jnp.maximum(jnp.vdot(x, x) + jnp.vdot(y, y), 1e-12)

    kernel_fn = jax.jit(bench_kernel_call)
    whole_fn = jax.jit(bench_whole_call)
    ref_fn = jax.jit(bench_xla_reference)
    cos_fn = jax.jit(cos_diff)

    results = []
    min_len = max(c.s_q for c in cases)
    by_pool = collections.OrderedDict()
    for c in cases:
        by_pool.setdefault((c.b, c.s_k, c.h_kv), []).append(c)
    for (b, s_k, h_kv), group in by_pool.items():
        pool = Pool(jax, b, s_k, h_kv, min_len, args.seed)
        k_cache = pool.caches[0]
        print(f"\n[pool] b={b} s_k={s_k} h_kv={h_kv}: sum(len)={int(pool.lengths.sum())}, "
              f"len min/mean/max={pool.lengths.min()}/{pool.lengths.mean():.0f}/{pool.lengths.max()}, "
              f"{pool.shape[0]} pages ({pool.nbytes / 2**30:.2f} GiB)")
        for c in group:
            q = jax.random.normal(jax.random.PRNGKey(c.h_q * 10 + c.s_q), (c.b, c.s_q, c.h_q, HEAD_DIM), jnp.bfloat16)
            rows = c.s_q * c.h_q // c.h_kv
            md = jax.block_until_ready(jfm.get_mla_metadata(pool.cache_seqlens, rows, c.h_kv))
            call_args = (q, k_cache, pool.block_table, pool.cache_seqlens)
            kernel = lambda: kernel_fn(*call_args, *md)  # noqa: E731
            whole = lambda: whole_fn(*call_args)  # noqa: E731
            out, _ = jax.block_until_ready(kernel())
            jax.block_until_ready(whole())

            ref_out, ref_err = None, None
            if not args.no_ref:
                try:
                    ref_out, _ = jax.block_until_ready(ref_fn(*call_args))
                except Exception as e:  # noqa: BLE001  (e.g. out of memory for the gathered copy)
                    ref_err = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            jobs = [("kernel", kernel, args.iters, "bench_kernel_call"),
                    ("queued", lambda: [whole() for _ in range(args.queue_calls)], 3, "bench_whole_call")]
            if ref_out is not None:
                jobs.append(("xla_reference", lambda: ref_fn(*call_args), args.ref_iters, "bench_xla_reference"))
            dev = timer.device_ms(jobs)

            rec = dataclasses.asdict(c)
            flops, nbytes = flops_and_bytes(pool.lengths, c.b, c.s_q, c.h_q, c.h_kv)
            rec.update(sum_len=int(pool.lengths.sum()), flops=flops, bytes=nbytes,
                       max_splits=int(np.diff(np.asarray(md[1])).max()), num_sm_parts=int(md[0].shape[0]))
            t = dev.get("kernel")
            if t is not None:
                rec.update(kernel_ms=median(t.span_ms), kernel_busy_ms=median(t.busy_ms),
                           kernel_sum_ms=median(t.sum_ms), kernel_min_ms=min(t.span_ms),
                           kernel_iters=len(t.span_ms), kernel_events=dict(t.names), src="trace",
                           kernel_parts_ms={n: median(v) for n, v in t.name_ms.items()},
                           tail_us=None if not t.tail_ms else 1000 * median(t.tail_ms),
                           attribution=t.method)
            else:
                wall = timer.wall_ms(kernel, args.iters)
                rec.update(kernel_ms=median(wall), kernel_min_ms=min(wall), kernel_iters=len(wall), src="wall")
            wall_call = timer.wall_ms(whole, args.iters)
            rec.update(call_ms=median(wall_call), call_min_ms=min(wall_call))
            loops = timer.queued_ms({"call": whole, "kernel": kernel}, calls=args.queue_calls)
            rec.update(queued_call_ms=median(loops["call"][0]), steady_call_ms=median(loops["call"][1]),
                       steady_kernel_ms=median(loops["kernel"][1]))
            # The whole call's cost over the kernels' in the same loop, repeats interleaved.
            rec["steady_call_over_kernel"] = rec["steady_call_ms"] / rec["steady_kernel_ms"]
            tq = dev.get("queued")
            if tq is not None:
                rec["queued_span_ms"] = median(tq.span_ms) / args.queue_calls
            rec["tflops"] = flops / (rec["kernel_ms"] * 1e-3) / 1e12
            rec["gbps"] = nbytes / (rec["kernel_ms"] * 1e-3) / 1e9
            if ref_out is not None:
                rt = dev.get("xla_reference")
                if rt is not None:
                    rec.update(xla_ms=median(rt.span_ms), xla_src="trace")
                else:
                    rec.update(xla_ms=median(timer.wall_ms(lambda: ref_fn(*call_args), args.ref_iters)),
                               xla_src="wall")
                rec["speedup"] = rec["xla_ms"] / rec["kernel_ms"]
                rec["cos_diff_vs_reference"] = float(cos_fn(out, ref_out))
            elif ref_err:
                rec["xla_error"] = ref_err
            results.append(rec)
            print(format_row(rec, baselines, anchors, header=c is group[0]))
            del out, ref_out
        del pool, k_cache
    return results


def run_step(jax, timer: Timer, args, cases: list[Case]) -> list[dict]:
    import jax.numpy as jnp
    import jax_flashmla as jfm

    layers = args.layers

    def bench_decode_layers(qs, caches, block_table, cache_seqlens, tile_md, num_splits):
        outs = []
        for q, k_cache in zip(qs, caches):
            out, _ = jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_md,
                                                num_splits, causal=True)
            outs.append(out)
        return tuple(outs)

    def bench_decode_step(qs, caches, block_table, cache_seqlens):
        rows = qs[0].shape[1] * qs[0].shape[2] // caches[0].shape[2]
        tile_md, num_splits = jfm.get_mla_metadata(cache_seqlens, rows, caches[0].shape[2])
        return bench_decode_layers(qs, caches, block_table, cache_seqlens, tile_md, num_splits)

    step_fn = jax.jit(bench_decode_step)
    layers_fn = jax.jit(bench_decode_layers)  # the step's decode calls alone, the plan given
    results = []
    min_len = max(c.s_q for c in cases) if cases else 1
    for c in cases:
        probe_pages = int((-(-draw_lengths(c.b, c.s_k, min_len, args.seed) // PAGE)).sum())
        one_cache = probe_pages * PAGE * c.h_kv * HEAD_DIM * 2
        copies = layers if layers * one_cache <= args.step_cache_gib * 2**30 else 1
        pool = Pool(jax, c.b, c.s_k, c.h_kv, min_len, args.seed, copies=copies)
        caches = tuple(pool.caches[i % copies] for i in range(layers))
        keys = jax.random.split(jax.random.PRNGKey(c.h_q * 10 + c.s_q), layers)
        qs = tuple(jax.random.normal(k, (c.b, c.s_q, c.h_q, HEAD_DIM), jnp.bfloat16) for k in keys)
        step = lambda: step_fn(qs, caches, pool.block_table, pool.cache_seqlens)  # noqa: E731
        jax.block_until_ready(step())
        queue = lambda: [step() for _ in range(args.step_queue)]  # noqa: E731
        dev = timer.device_ms([("step", step, args.step_iters, "bench_decode_step"),
                               ("queued", queue, 3, "bench_decode_step")])
        wall = timer.wall_ms(step, args.step_iters)
        rows = c.s_q * c.h_q // c.h_kv
        md = jax.block_until_ready(jfm.get_mla_metadata(pool.cache_seqlens, rows, c.h_kv))
        layers_only = lambda: layers_fn(qs, caches, pool.block_table, pool.cache_seqlens, *md)  # noqa: E731
        loops = timer.queued_ms({"step": step, "layers": layers_only}, calls=args.step_queue)
        queued, steady = loops["step"]
        flops, nbytes = flops_and_bytes(pool.lengths, c.b, c.s_q, c.h_q, c.h_kv)
        rec = dataclasses.asdict(c)
        rec.update(layers=layers, distinct_caches=copies, wall_ms=median(wall), wall_min_ms=min(wall),
                   queued_step_ms=median(queued), steady_step_ms=median(steady), flops=layers * flops,
                   bytes=layers * nbytes, steady_layers_ms=median(loops["layers"][1]))
        # The step over its decode calls alone, in the same loop under the same load: the plan's
        # kernel and the step's dispatch.
        rec["steady_step_over_layers"] = rec["steady_step_ms"] / rec["steady_layers_ms"]
        t = dev.get("step")
        if t is not None:
            rec.update(busy_ms=median(t.busy_ms), span_ms=median(t.span_ms), sum_ms=median(t.sum_ms),
                       events_per_step=sorted(set(t.events)), src="trace")
            rec["overhead_pct"] = 100 * (1 - rec["busy_ms"] / rec["wall_ms"])
            rec["queued_overhead_pct"] = 100 * (1 - rec["busy_ms"] / rec["queued_step_ms"])
            rec["steady_overhead_pct"] = 100 * (1 - rec["busy_ms"] / rec["steady_step_ms"])
            rec["idle_in_span_pct"] = 100 * (1 - rec["busy_ms"] / rec["span_ms"])
            rec["per_layer_ms"] = rec["busy_ms"] / layers
        else:
            rec["src"] = "wall"
        tq = dev.get("queued")
        if tq is not None:
            rec.update(queued_busy_ms=median(tq.busy_ms) / args.step_queue,
                       queued_span_ms=median(tq.span_ms) / args.step_queue)
            rec["queued_gap_pct"] = 100 * (1 - rec["queued_busy_ms"] / rec["queued_span_ms"])
        results.append(rec)
        print(format_step_row(rec, header=len(results) == 1))
        del pool, caches, qs
    return results


# ==== output ======================================================================================

def _f(v, fmt):
    if v is None:
        return "n/a"
    if fmt == "num":  # rates: integers where large, 3 significant digits where small (CPU runs)
        return format(v, ".0f") if abs(v) >= 100 else format(v, ".3g")
    return format(v, fmt)


MATRIX_COLS = [
    ("s_k", "s_k", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"),
    ("kernel ms", "kernel_ms", ".3f"), ("call ms", "call_ms", ".3f"), ("queued ms", "queued_call_ms", ".3f"),
    ("steady ms", "steady_call_ms", ".3f"), ("k.steady ms", "steady_kernel_ms", ".3f"),
    ("call/k", "steady_call_over_kernel", ".3f"), ("q.span ms", "queued_span_ms", ".3f"), ("tail us", "tail_us", ".1f"),
    ("TFLOPS", "tflops", "num"),
    ("GB/s", "gbps", "num"), ("BW%", "bw_pct", ".1f"), ("FLOP%", "flop_pct", ".1f"),
    ("XLA ms", "xla_ms", ".2f"), ("speedup", "speedup", ".1f"),
    ("FM ms", "fm_ms", ".3f"), ("FM/ours", "fm_over_ours", ".2f"), ("FM BW%", "fm_bw_pct", ".1f"),
    ("FM FLOP%", "fm_flop_pct", ".1f"), ("cos_diff", "cos_diff_vs_reference", ".1e"), ("src", "src", "s"),
]


def enrich(rec: dict, baselines: dict | None, anchors: dict | None) -> dict:
    row = dict(rec)
    if baselines:
        if rec.get("gbps") and baselines.get("copy", {}).get("gbps"):
            row["bw_pct"] = 100 * rec["gbps"] / baselines["copy"]["gbps"]
        if rec.get("tflops") and baselines.get("matmul", {}).get("tflops"):
            row["flop_pct"] = 100 * rec["tflops"] / baselines["matmul"]["tflops"]
    row.update(anchor_figures(anchors or {}, rec))
    return row


def _columns(anchors, records=()):
    """The matrix columns; FlashMLA's only where some record has an anchor figure."""
    has_fm = anchors and (not records or any(anchor_figures(anchors, r) for r in records))
    return [c for c in MATRIX_COLS if has_fm or not c[1].startswith("fm_")]


def format_row(rec, baselines, anchors, header=False) -> str:
    cols = _columns(anchors, [rec])
    row = enrich(rec, baselines, anchors)
    widths = [max(len(h), 8) for h, _, _ in cols]
    line = "  ".join(_f(row.get(k), f).rjust(w) for (h, k, f), w in zip(cols, widths))
    if header:
        return "  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths)) + "\n" + line
    return line


STEP_COLS = [
    ("s_k", "s_k", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"), ("layers", "layers", "d"),
    ("caches", "distinct_caches", "d"), ("busy ms", "busy_ms", ".3f"), ("span ms", "span_ms", ".3f"),
    ("wall ms", "wall_ms", ".3f"), ("overhead%", "overhead_pct", ".1f"), ("queued ms", "queued_step_ms", ".3f"),
    ("q.ovh%", "queued_overhead_pct", ".1f"), ("steady ms", "steady_step_ms", ".3f"),
    ("s.ovh%", "steady_overhead_pct", ".1f"), ("l.steady ms", "steady_layers_ms", ".3f"),
    ("step/l", "steady_step_over_layers", ".3f"), ("q.busy ms", "queued_busy_ms", ".3f"),
    ("q.span ms", "queued_span_ms", ".3f"), ("q.gap%", "queued_gap_pct", ".1f"), ("idle%", "idle_in_span_pct", ".1f"),
    ("ms/layer", "per_layer_ms", ".3f"), ("src", "src", "s"),
]


def format_step_row(rec, header=False) -> str:
    widths = [max(len(h), 8) for h, _, _ in STEP_COLS]
    line = "  ".join(_f(rec.get(k), f).rjust(w) for (h, k, f), w in zip(STEP_COLS, widths))
    if header:
        return "  ".join(h.rjust(w) for (h, _, _), w in zip(STEP_COLS, widths)) + "\n" + line
    return line


def markdown(report: dict, anchors: dict) -> str:
    out = []
    env = report.get("env", {})
    base = report.get("baselines", {})
    out.append(f"Device: {env.get('device')} | jax {env.get('jax')} | decode path {env.get('kernel_path')} | "
               f"{env.get('date')}")
    if base:
        c, m = base.get("copy", {}), base.get("matmul", {})
        others = ", ".join(f"{k} {_f(v, 'num')}" for k, v in c.get("variants", {}).items())
        out.append(f"Same run: device-to-device copy {_f(c.get('gbps'), 'num')} GB/s ({c.get('size')}"
                   f"{'; ' + others + ' GB/s' if others else ''}), {m.get('size')} matmul {_f(m.get('tflops'), 'num')} TFLOPS.")
    if anchors and any(anchor_figures(anchors, r) for r in report.get("matrix", [])):
        out.append(f"FM columns: {anchors['path']} (FlashMLA's own run: copy {anchors.get('copy_gbps')} GB/s, "
                   f"matmul {anchors.get('matmul_tflops')} TFLOPS).")
    if report.get("matrix"):
        cols = _columns(anchors, report["matrix"])
        out.append("")
        out.append("| " + " | ".join(h for h, _, _ in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for rec in report["matrix"]:
            row = enrich(rec, base, anchors)
            out.append("| " + " | ".join(_f(row.get(k), f) for _, k, f in cols) + " |")
    if report.get("step"):
        out.append("")
        out.append("| " + " | ".join(h for h, _, _ in STEP_COLS) + " |")
        out.append("|" + "---|" * len(STEP_COLS))
        for rec in report["step"]:
            out.append("| " + " | ".join(_f(rec.get(k), f) for _, k, f in STEP_COLS) + " |")
    return "\n".join(out)


def print_summary(report: dict, anchors: dict):
    base = report.get("baselines", {})
    print("\n==== summary ====")
    for k, v in report.get("env", {}).items():
        print(f"{k}: {v}")
    if base:
        print(f"copy: {_f(base['copy'].get('gbps'), 'num')} GB/s ({base['copy']['src']}), "
              f"matmul: {_f(base['matmul'].get('tflops'), 'num')} TFLOPS ({base['matmul']['src']})")
    if anchors:
        print(f"anchors: {anchors['path']}")
    else:
        print("anchors: not found (FM columns omitted; --anchors PATH, or re-render with --from-json here)")
    if report.get("matrix"):
        print()
        for i, rec in enumerate(report["matrix"]):
            print(format_row(rec, base, anchors, header=i == 0))
    if report.get("step"):
        print()
        for i, rec in enumerate(report["step"]):
            print(format_step_row(rec, header=i == 0))


# ==== parser self-test (synthetic trace; runs with --smoke) ========================================

def selftest_parser() -> None:
    """Checks parse_trace/attribute on a synthetic XSpace shaped like a GPU trace."""
    cls = _profile_data_class()
    if cls is None or not hasattr(cls, "from_text_proto"):
        print("[selftest] ProfileData.from_text_proto unavailable: parser self-test skipped")
        return

    def ev(meta, start_us, dur_us, *stats):
        s = " ".join(f"stats {{ metadata_id: {sid} {kind}: {val} }}" for sid, kind, val in stats)
        return f"events {{ metadata_id: {meta} offset_ps: {int(start_us * 1e6)} duration_ps: {int(dur_us * 1e6)} {s} }}"

    kd, mod, mal = (1, "ref_value", 9), 2, (3, "ref_value", 9)
    gpu = [
        ev(1, 20, 10, kd, (mod, "str_value", '"jit_bench_kernel_call"')),   # decode, iteration 0
        ev(2, 28, 7, kd, (mod, "str_value", '"jit_bench_kernel_call"')),    # combine, overlapping
        ev(3, 150, 50, kd, (mod, "str_value", '"jit_bench_l2_flush"')),     # flush between iterations
        ev(4, 160, 1, mal),                                                # an allocation: not timed
        ev(1, 220, 12, kd, (mod, "str_value", '"jit_bench_kernel_call"')),  # iteration 1
        ev(2, 240, 5, kd, (mod, "str_value", '"jit_bench_kernel_call"')),
    ]
    host = [ev(10, 0, 100), ev(11, 200, 100)]
    text = f"""
planes {{ id: 1 name: "/host:CPU"
  lines {{ id: 1 name: "python3" timestamp_ns: 0 {' '.join(host)} }}
  event_metadata {{ key: 10 value {{ id: 10 name: "{ANNOTATION_PREFIX}|kernel|0" }} }}
  event_metadata {{ key: 11 value {{ id: 11 name: "{ANNOTATION_PREFIX}|kernel|1" }} }}
}}
planes {{ id: 2 name: "/device:GPU:0"
  lines {{ id: 7 name: "Stream #7(Kernel,MemoryAlloc)" timestamp_ns: 0 {' '.join(gpu)} }}
  lines {{ id: 8 name: "CUPTI overhead" timestamp_ns: 0 {ev(1, 50, 99, kd)} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "mla_decode_kernel" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "mla_combine_kernel" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "loop_add_fusion" }} }}
  event_metadata {{ key: 4 value {{ id: 4 name: "MemoryAlloc" }} }}
  stat_metadata {{ key: 1 value {{ id: 1 name: "kernel_details" }} }}
  stat_metadata {{ key: 2 value {{ id: 2 name: "hlo_module" }} }}
  stat_metadata {{ key: 3 value {{ id: 3 name: "memalloc_details" }} }}
  stat_metadata {{ key: 9 value {{ id: 9 name: "regs:128" }} }}
}}"""
    events, windows, info = parse_trace(cls.from_text_proto(text))
    t = attribute(events, windows, "kernel", "bench_kernel_call")
    assert t is not None and t.method == "window+module", t
    assert [round(x, 6) for x in t.span_ms] == [0.015, 0.025], t.span_ms
    assert [round(x, 6) for x in t.busy_ms] == [0.015, 0.017], t.busy_ms
    assert [round(x, 6) for x in t.sum_ms] == [0.017, 0.017], t.sum_ms
    assert t.names == {"mla_decode_kernel": 1, "mla_combine_kernel": 1}, t.names
    assert {n: [round(x, 6) for x in v] for n, v in t.name_ms.items()} == {
        "mla_decode_kernel": [0.01, 0.012], "mla_combine_kernel": [0.007, 0.005]}, t.name_ms
    assert [round(x, 6) for x in t.tail_ms] == [0.005, 0.013], t.tail_ms
    no_windows = attribute(events, [], "kernel", "bench_kernel_call")
    assert no_windows.method == "module-runs" and [round(x, 6) for x in no_windows.span_ms] == [0.015, 0.025]
    print("[selftest] trace parser: ok (synthetic GPU plane, windows, module filter, overlap, skipped lines)")


# ==== main ========================================================================================

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["matrix", "step", "all"], default="all")
    p.add_argument("--cases", help="filter, e.g. 's_k=4096,h_q=64/128' (keys b, s_k, h_q, s_q)")
    p.add_argument("--step-cases", default="h_q=16/128,s_q=1", help="filter of the step mode's cases")
    p.add_argument("--iters", type=int, default=50, help="timed iterations of the kernel and the whole call")
    p.add_argument("--ref-iters", type=int, default=5, help="timed iterations of the plain-XLA reference")
    p.add_argument("--baseline-iters", type=int, default=20)
    p.add_argument("--step-iters", type=int, default=20)
    p.add_argument("--layers", type=int, default=8, help="decode calls per step (step mode)")
    p.add_argument("--queue-calls", type=int, default=20,
                   help="whole calls dispatched back to back for the matrix's 'queued ms' and 'q.span ms'")
    p.add_argument("--step-queue", type=int, default=10,
                   help="steps dispatched back to back for the step mode's 'queued ms' (their outputs stay alive)")
    p.add_argument("--step-cache-gib", type=float, default=24.0,
                   help="memory for distinct per-layer caches in step mode; above it all layers share one")
    p.add_argument("--copy-mib", type=int, default=2048, help="copy-bandwidth buffer (bf16)")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--flush-mib", type=int, default=256, help="L2 flush buffer touched before each iteration (0: off)")
    p.add_argument("--flush-kind", choices=("write", "read"), default="write",
                   help="rewrite the flush buffer (the default, as FlashMLA's tests do) or only read it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ref", action="store_true", help="skip the plain-XLA reference")
    p.add_argument("--no-trace", action="store_true", help="wall clock only (no profiler)")
    p.add_argument("--trace-dir", help="keep the profiler traces here (default: temporary, deleted)")
    p.add_argument("--anchors", help="FlashMLA figures (markdown); default: found beside the repo")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    p.add_argument("--from-json", help="print the tables of a saved --json file and exit (no measuring)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    anchors = read_anchors(find_anchors(args.anchors))
    if args.from_json:
        report = json.load(open(args.from_json, encoding="utf-8"))
        print_summary(report, anchors)
        if args.markdown:
            print("\n" + markdown(report, anchors))
        return 0

    grid = STANDARD
    if args.smoke:
        grid = SMOKE
        args.iters, args.ref_iters, args.baseline_iters, args.step_iters = (min(args.iters, 3), min(args.ref_iters, 2),
                                                                            3, 3)
        args.copy_mib, args.matmul_n, args.flush_mib = 16, 256, 4
        if args.step_cases == p.get_default("step_cases"):
            args.step_cases = "h_q=16,s_q=1"
        selftest_parser()

    import jax
    import jax_flashmla as jfm

    dev = jax.devices()[0]
    env = {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}", "jax": jax.__version__,
           "jax_flashmla": getattr(jfm, "__version__", "?"), "kernel_path": jfm.kernel_path(),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "iters": args.iters, "flush_mib": args.flush_mib, "flush_kind": args.flush_kind, "seed": args.seed,
           "smoke": args.smoke}
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if env["kernel_path"] != "cuda-sm90":
        print(f"NOTE: decode lowers to {env['kernel_path']!r}, not the SM90 kernel: the 'kernel' figures "
              "measure that path.")
    if args.flush_mib == 0:
        print("NOTE: no L2 flush (the caches, >= 0.6 GB, are far larger than the 50 MB L2 anyway)")
    print(f"anchors: {anchors.get('path', 'not found (FM columns omitted)')}")

    timer = Timer(jax, args)
    report = {"env": env, "args": vars(args)}
    print("\n[baselines]")
    report["baselines"] = measure_baselines(jax, timer, args)
    for k, v in report["baselines"].items():
        print(f"  {k}: {json.dumps(v)}")

    if args.mode in ("matrix", "all"):
        cases = select_cases(grid, parse_filter(args.cases))
        print(f"\n[matrix] {len(cases)} cases")
        report["matrix"] = run_matrix(jax, timer, args, cases, report["baselines"], anchors)
    if args.mode in ("step", "all"):
        flt = parse_filter(args.step_cases)
        for k, v in parse_filter(args.cases).items():  # both filters apply
            flt[k] = flt[k] & v if k in flt else v
        cases = select_cases(grid, flt)
        print(f"\n[step] {len(cases)} cases, {args.layers} layers each")
        report["step"] = run_step(jax, timer, args, cases)

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    print_summary(report, anchors)
    if args.markdown:
        print("\n" + markdown(report, anchors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
