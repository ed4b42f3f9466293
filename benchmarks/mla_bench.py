"""The decode benchmark's machinery: problems, timing, the same run's ceilings, and the report.

benchmarks/bench_decode.py is its command line; benchmarks/bench_sparse.py (sparse decode) and
benchmarks/bench_prefill.py (sparse prefill) share its timer, ceilings, filters, the FlashMLA side by
side's loader and timer, and the command lines' common options and report helpers (the end of this
file); docs/performance.md gives the method and figures.
Only the package's public API is used (plus jax_flashmla.testing, taken from this checkout when the
imported build predates it), so the same harness times any build put first on PYTHONPATH.

Per case (b, s_k, h_q, s_q, h_kv; bf16, causal; lengths ~ Normal(s_k, s_k/2), at least the largest
s_q, one draw per s_k from the seed; pages shuffled across a pool holding exactly the pages in use):

  kernel ms   device time of one decode call (decode + combine; the plan is made once, outside):
              from the JAX profiler, first kernel start to last kernel end of each iteration
              (kernels that overlap count once), median over the iterations, L2 flushed before each.
              kernel_parts_ms (JSON) is the median time per kernel name; tail us the part after
              the decode kernel's end (the combine's release, work and end).
  call ms     wall clock of the whole jitted call (metadata + decode + combine) with
              block_until_ready, median, L2 flushed before each.
  TFLOPS, GB/s  FlashMLA's formulas over kernel ms: FLOPs = 2 s_q sum(len) h_q (576 + 512),
              bytes = 2 (sum(len) h_kv 576 + b s_q h_q (576 + 512)).
  BW%, FLOP%  GB/s over the same run's device-to-device copy bandwidth (a buffer updated elementwise
              as bf16 x + 1 and as uint32 x ^ 1, the faster counting; bytes read + written) and
              TFLOPS over the same run's bf16 n^3 matmul.
  XLA ms      the plain-XLA reference (jitted mla_decode_reference), device time measured the same
              way; speedup = XLA ms / kernel ms; cos_diff of the kernel's output against it.

Device times come from `jax.profiler.trace`: its *.xplane.pb is read with jax.profiler.ProfileData.
Each timed iteration runs inside a TraceAnnotation; device events (planes "/device:GPU:N", lines
"Stream #..."; kernels carry a "kernel_details" stat) belong to the iteration whose annotation window
holds their start, keeping those whose "hlo_module" stat names the timed function. Where the trace
has no GPU plane (CPU runs), kernel ms falls back to the wall clock of the kernel-only call and the
"src" column says so.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import importlib.util
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

import jax_flashmla as jfm

try:
    from jax_flashmla import testing
except ImportError:  # a build older than jax_flashmla.testing: the generator of this checkout
    _spec = importlib.util.spec_from_file_location(
        "jax_flashmla_testing", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jax_flashmla",
                                             "testing.py"))
    testing = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
    _spec.loader.exec_module(testing)

HEAD_DIM = jfm.HEAD_DIM
HEAD_DIM_V = jfm.HEAD_DIM_V
PAGE = jfm.PAGE_SIZE
ANNOTATION_PREFIX = "jfm_bench"
TIMED_KINDS = ("kernel", "memcpy", "memset", "graph")
# Stat that marks what a device event is (XLA's CUPTI collector adds one of these per event).
KIND_STATS = {"kernel_details": "kernel", "memcpy_details": "memcpy", "memset_details": "memset",
              "cuda_graph_exec_id": "graph", "memalloc_details": "alloc", "memfree_details": "free",
              "memory_residency_details": "residency"}


@dataclasses.dataclass
class Settings:
    iters: int = 50  # timed iterations of the kernel and of the whole call
    ref_iters: int = 5  # of the plain-XLA reference
    baseline_iters: int = 20  # of the copy and the matmul
    copy_mib: int = 2048  # the copy-bandwidth buffer
    matmul_n: int = 8192
    flush_mib: int = 256  # L2 flush buffer touched before each iteration (0: off)
    flush_kind: str = "write"  # rewrite it (FlashMLA's way) or only read it
    seed: int = 0
    no_ref: bool = False  # skip the plain-XLA reference
    no_trace: bool = False  # wall clock only
    trace_dir: str | None = None  # keep the profiler traces here (default: temporary)
    verbose: bool = False

    @classmethod
    def smoke(cls, **kw):
        """Tiny sizes that run in seconds on the CPU."""
        return cls(**{**dict(iters=3, ref_iters=2, baseline_iters=3, copy_mib=16, matmul_n=256, flush_mib=4), **kw})


# ==== reading the profiler's trace ===============================================================

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
    """Wall-clock and profiler timing with the L2 flushed before every iteration."""

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


# The standard matrix: b = 128, varlen s_k, causal, h_kv = 1, bf16.
STANDARD = dict(b=[128], s_k=[4096, 8192, 16384], h_q=[16, 32, 64, 128], s_q=[1, 2], h_kv=[1])
SMOKE = dict(b=[4], s_k=[128, 320], h_q=[16, 32], s_q=[1, 2], h_kv=[1])
KEYS = ("b", "s_k", "h_q", "s_q", "h_kv")


def parse_filter(text: str | None, keys=KEYS) -> dict:
    """'s_k=4096,h_q=64/128' -> {'s_k': {4096}, 'h_q': {64, 128}} (integer values of `keys`)."""
    if not text:
        return {}
    out = {}
    for term in text.split(","):
        key, _, values = term.partition("=")
        key = key.strip()
        try:
            parsed = {int(v) for v in re.split(r"[/|]", values) if v}
        except ValueError:
            parsed = set()
        if key not in keys or not parsed:
            raise ValueError(f"bad case filter term {term!r} (keys {', '.join(keys)}; integer values separated by '/')")
        out[key] = parsed
    return out


def select_cases(grid: dict, flt: dict) -> list[Case]:
    """The grid's cases (s_k outermost, so that one cache serves consecutive cases) that pass `flt`;
    a filter value outside the grid adds it (e.g. h_kv=2)."""
    axes = {k: sorted(set(grid[k]) | flt.get(k, set())) if k in flt else grid[k] for k in KEYS}
    cases = [Case(b=b, s_k=s_k, h_q=h_q, s_q=s_q, h_kv=h_kv)
             for s_k in axes["s_k"] for h_q in axes["h_q"] for s_q in axes["s_q"] for b in axes["b"]
             for h_kv in axes["h_kv"]]
    return [c for c in cases if all(getattr(c, k) in v for k, v in flt.items())]


def flops_and_bytes(lengths, b, s_q, h_q, h_kv):
    """FlashMLA's formulas: each query row reads every visible key once (576 wide), writes 512."""
    total = int(np.sum(lengths, dtype=np.int64))
    flops = 2 * s_q * total * h_q * (HEAD_DIM + HEAD_DIM_V)
    nbytes = 2 * (total * h_kv * HEAD_DIM + b * s_q * h_q * (HEAD_DIM + HEAD_DIM_V))
    return flops, nbytes


class Pool:
    """The paged cache of one (b, s_k, h_kv): jax_flashmla.testing's lengths and shuffled pages, the
    values made on the device. The pool holds exactly the pages in use; padding ids are 0 (a valid
    page, never read)."""

    def __init__(self, jax, b, s_k, h_kv, min_len, seed):
        import jax.numpy as jnp
        self.lengths = testing.varlen_lengths(np.random.default_rng([seed, s_k]), b, s_k, min_len)
        layout = testing.page_layout(np.random.default_rng([seed, s_k, 1]), self.lengths, pad=0)
        self.block_table = jnp.asarray(layout.block_table)
        self.cache_seqlens = jnp.asarray(self.lengths)
        self.cache = jax.block_until_ready(testing.device_cache(
            jax.random.PRNGKey(seed * 7919 + s_k), layout.num_blocks, h_kv, jnp.bfloat16))
        self.num_blocks = layout.num_blocks

    @property
    def nbytes(self):
        return self.cache.size * self.cache.dtype.itemsize


# ==== the measurements ============================================================================

def measure_baselines(jax, timer: Timer, settings: Settings) -> dict:
    """This device's copy bandwidth and matmul rate, measured in this run. The copy is an elementwise
    update of a copy_mib buffer (bytes read + written), written two ways: bf16 `x + 1` and uint32
    `x ^ 1`; XLA's bf16 kernel can fall short of the device's bandwidth (on an H200: 3360 GB/s
    against 4264 for torch's in-place add), so the faster of the two is the ceiling reported."""
    import jax.numpy as jnp
    n_bytes = settings.copy_mib * (1 << 20)
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

    m = settings.matmul_n
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(ka, (m, m), jnp.bfloat16)
    b = jax.random.normal(kb, (m, m), jnp.bfloat16)

    def bench_matmul(a, b):
        return a @ b
    matmul = jax.jit(bench_matmul)

    fns = {"copy_bf16": copy_step("bf16"), "copy_u32": copy_step("u32"), "matmul": lambda: matmul(a, b)}
    sizes = {"copy_bf16": f"{settings.copy_mib} MiB, bf16 x + 1, read+write",
             "copy_u32": f"{settings.copy_mib} MiB, uint32 x ^ 1, read+write", "matmul": f"bf16 {m}^3"}
    amounts = {"copy_bf16": (2 * n_bytes, "gbps"), "copy_u32": (2 * n_bytes, "gbps"), "matmul": (2 * m ** 3, "tflops")}
    for fn in fns.values():
        jax.block_until_ready(fn())
    dev = timer.device_ms([(label, fn, settings.baseline_iters, "bench_" + label) for label, fn in fns.items()])
    measured = {}
    for label, fn in fns.items():
        amount, unit = amounts[label]
        t = dev.get(label)
        if t is None:
            ms, src = median(timer.wall_ms(fn, settings.baseline_iters)), "wall"
        else:
            ms, src = median(t.span_ms), "trace"
        rate = amount / (ms * 1e-3) / (1e9 if unit == "gbps" else 1e12)
        measured[label] = {"ms": ms, unit: rate, "src": src, "size": sizes[label]}
    copy = dict(max((measured["copy_bf16"], measured["copy_u32"]), key=lambda r: r["gbps"]))
    copy["variants"] = {label: measured[label]["gbps"] for label in ("copy_bf16", "copy_u32")}
    return {"copy": copy, "matmul": measured["matmul"]}


def run_matrix(jax, timer: Timer, settings: Settings, cases: list[Case], on_row=None, fm=None,
               sbs_calls: int = 30, sbs_repeats: int = 7) -> list[dict]:
    """One record per case (see the module's docstring); `on_row(rec, first_of_pool)` as each ends.
    `fm` = (flash_mla, torch) adds FlashMLA's dense decode on the same inputs (dense_side_by_side)."""
    import jax.numpy as jnp

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
    min_len = max(c.s_q for c in cases) if cases else 1
    by_pool = collections.OrderedDict()
    for c in cases:
        by_pool.setdefault((c.b, c.s_k, c.h_kv), []).append(c)
    for (b, s_k, h_kv), group in by_pool.items():
        pool = Pool(jax, b, s_k, h_kv, min_len, settings.seed)
        print(f"\n[pool] b={b} s_k={s_k} h_kv={h_kv}: sum(len)={int(pool.lengths.sum())}, "
              f"len min/mean/max={pool.lengths.min()}/{pool.lengths.mean():.0f}/{pool.lengths.max()}, "
              f"{pool.num_blocks} pages ({pool.nbytes / 2**30:.2f} GiB)")
        for c in group:
            q = jax.random.normal(jax.random.PRNGKey(c.h_q * 10 + c.s_q), (c.b, c.s_q, c.h_q, HEAD_DIM), jnp.bfloat16)
            md = jax.block_until_ready(jfm.get_mla_metadata(pool.cache_seqlens, c.s_q * c.h_q // c.h_kv, c.h_kv))
            call_args = (q, pool.cache, pool.block_table, pool.cache_seqlens)
            kernel = lambda: kernel_fn(*call_args, *md)  # noqa: E731
            whole = lambda: whole_fn(*call_args)  # noqa: E731
            out, _ = jax.block_until_ready(kernel())
            jax.block_until_ready(whole())

            ref_out, ref_err = None, None
            if not settings.no_ref:
                try:
                    ref_out, _ = jax.block_until_ready(ref_fn(*call_args))
                except Exception as e:  # noqa: BLE001  (e.g. out of memory for the gathered copy)
                    ref_err = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            jobs = [("kernel", kernel, settings.iters, "bench_kernel_call")]
            if ref_out is not None:
                jobs.append(("xla_reference", lambda: ref_fn(*call_args), settings.ref_iters, "bench_xla_reference"))
            dev = timer.device_ms(jobs)

            rec = dataclasses.asdict(c)
            flops, nbytes = flops_and_bytes(pool.lengths, c.b, c.s_q, c.h_q, c.h_kv)
            rec.update(sum_len=int(pool.lengths.sum()), flops=flops, bytes=nbytes,
                       max_splits=int(np.diff(np.asarray(md[1])).max()), num_sm_parts=int(md[0].shape[0]))
            t = dev.get("kernel")
            if t is not None:
                rec.update(kernel_ms=median(t.span_ms), kernel_min_ms=min(t.span_ms), kernel_iters=len(t.span_ms),
                           kernel_events=dict(t.names), kernel_parts_ms={n: median(v) for n, v in t.name_ms.items()},
                           tail_us=None if not t.tail_ms else 1000 * median(t.tail_ms), src="trace",
                           attribution=t.method)
            else:
                wall = timer.wall_ms(kernel, settings.iters)
                rec.update(kernel_ms=median(wall), kernel_min_ms=min(wall), kernel_iters=len(wall), src="wall")
            wall_call = timer.wall_ms(whole, settings.iters)
            rec.update(call_ms=median(wall_call), call_min_ms=min(wall_call))
            rec["tflops"] = flops / (rec["kernel_ms"] * 1e-3) / 1e12
            rec["gbps"] = nbytes / (rec["kernel_ms"] * 1e-3) / 1e9
            if ref_out is not None:
                rt = dev.get("xla_reference")
                if rt is not None:
                    rec.update(xla_ms=median(rt.span_ms), xla_src="trace")
                else:
                    rec.update(xla_ms=median(timer.wall_ms(lambda: ref_fn(*call_args), settings.ref_iters)),
                               xla_src="wall")
                rec["speedup"] = rec["xla_ms"] / rec["kernel_ms"]
                rec["cos_diff_vs_reference"] = float(cos_fn(out, ref_out))
            elif ref_err:
                rec["xla_error"] = ref_err
            if fm is not None:
                rec.update(dense_side_by_side(jax, fm, kernel, out, call_args, sbs_calls, sbs_repeats))
            results.append(rec)
            if on_row is not None:
                on_row(rec, c is group[0])
            del out, ref_out
        del pool
    return results


# ==== the report ==================================================================================

def _f(v, fmt):
    if v is None:
        return "n/a"
    if fmt == "num":  # rates: integers where large, 3 significant digits where small (CPU runs)
        return format(v, ".0f") if abs(v) >= 100 else format(v, ".3g")
    return format(v, fmt)


COLUMNS = [
    ("s_k", "s_k", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"),
    ("kernel ms", "kernel_ms", ".3f"), ("call ms", "call_ms", ".3f"), ("tail us", "tail_us", ".1f"),
    ("TFLOPS", "tflops", "num"), ("GB/s", "gbps", "num"), ("BW%", "bw_pct", ".1f"), ("FLOP%", "flop_pct", ".1f"),
    ("XLA ms", "xla_ms", ".2f"), ("speedup", "speedup", ".1f"), ("cos_diff", "cos_diff_vs_reference", ".1e"),
    ("src", "src", "s"),
]


SBS_COLUMNS = [("ours wall ms", "ours_wall_ms", ".4f"), ("wall BW%", "wall_bw_pct", ".1f"),
               ("FM wall ms", "fm_wall_ms", ".4f"), ("FM/ours", "fm_over_ours", ".3f"),
               ("cos_diff FM", "cos_diff_vs_flashmla", ".1e")]


def with_ratios(rec: dict, baselines: dict | None) -> dict:
    """The record plus BW% and FLOP%: its rates over the same run's copy bandwidth and matmul (and
    wall BW%: the bytes over the side by side's wall time of our call, over the copy bandwidth)."""
    row = dict(rec)
    copy = (baselines or {}).get("copy", {}).get("gbps")
    mm = (baselines or {}).get("matmul", {}).get("tflops")
    if rec.get("ours_wall_ms") and rec.get("bytes") and copy:
        row["wall_bw_pct"] = 100 * rec["bytes"] / (rec["ours_wall_ms"] * 1e-3) / 1e9 / copy
    if rec.get("gbps") and copy:
        row["bw_pct"] = 100 * rec["gbps"] / copy
    if rec.get("tflops") and mm:
        row["flop_pct"] = 100 * rec["tflops"] / mm
    return row


def _columns(records):
    """The columns; b and h_kv only where they vary (the standard matrix fixes them)."""
    cols = list(COLUMNS)
    if any("fm_wall_ms" in r or "fm_error" in r for r in records):
        cols += SBS_COLUMNS
    for key in ("h_kv", "b"):
        if len({r.get(key) for r in records}) > 1:
            cols.insert(0, (key, key, "d"))
    return cols


def format_row(rec: dict, baselines: dict | None, header=False, columns=None) -> str:
    cols = columns or _columns([rec])
    row = with_ratios(rec, baselines)
    widths = [max(len(h), 8) for h, _, _ in cols]
    line = "  ".join(_f(row.get(k), f).rjust(w) for (h, k, f), w in zip(cols, widths))
    if header:
        return "  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths)) + "\n" + line
    return line


def markdown(report: dict) -> str:
    env, base = report.get("env", {}), report.get("baselines", {})
    out = [f"Device: {env.get('device')} | jax {env.get('jax')} | decode path {env.get('kernel_path')} | "
           f"{env.get('date')}"]
    if base:
        c, m = base.get("copy", {}), base.get("matmul", {})
        others = ", ".join(f"{k} {_f(v, 'num')}" for k, v in c.get("variants", {}).items())
        out.append(f"Same run: device-to-device copy {_f(c.get('gbps'), 'num')} GB/s ({c.get('size')}"
                   f"{'; ' + others + ' GB/s' if others else ''}), {m.get('size')} matmul "
                   f"{_f(m.get('tflops'), 'num')} TFLOPS.")
    records = report.get("matrix", [])
    if records:
        cols = _columns(records)
        out += ["", "| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
        for rec in records:
            row = with_ratios(rec, base)
            out.append("| " + " | ".join(_f(row.get(k), f) for _, k, f in cols) + " |")
    out += side_by_side_summary(records)
    return "\n".join(out)


def side_by_side_summary(records: list[dict]) -> list[str]:
    """FlashMLA/ours over the rows that have it: geomean, minimum, and the h_q 128, s_q 2 rows."""
    sbs = [r for r in records if r.get("fm_over_ours")]
    out = []
    if sbs:
        worst = min(sbs, key=lambda r: r["fm_over_ours"])
        out.append(f"\nFlashMLA/ours (> 1: ours faster): geomean {geomean([r['fm_over_ours'] for r in sbs]):.3f} over "
                   f"{len(sbs)} rows, min {worst['fm_over_ours']:.3f} (s_k={worst['s_k']} h_q={worst['h_q']} "
                   f"s_q={worst['s_q']})")
        heavy = [r for r in sbs if r["h_q"] == 128 and r["s_q"] == 2]
        if heavy:
            out.append("h_q 128, s_q 2: " + ", ".join(f"s_k {r['s_k']} {r['fm_over_ours']:.3f}" for r in heavy))
    failed = [r for r in records if r.get("fm_error")]
    if failed:
        out.append(f"FlashMLA failed on {len(failed)} rows, first: {failed[0]['fm_error']}")
    return out


# ==== shared by the command lines ================================================================

SMOKE_SIZES = ("iters", "ref_iters", "baseline_iters", "copy_mib", "matmul_n", "flush_mib")  # Settings.smoke's


def add_settings_args(p, iters: int | None = None) -> None:
    """The options of Settings that every command line takes (timing, ceilings, flush, trace)."""
    d = Settings()
    p.add_argument("--iters", type=int, default=iters or d.iters, help="timed iterations of each call")
    p.add_argument("--baseline-iters", type=int, default=d.baseline_iters, help="of the copy and the matmul")
    p.add_argument("--copy-mib", type=int, default=d.copy_mib, help="the copy-bandwidth buffer")
    p.add_argument("--matmul-n", type=int, default=d.matmul_n, help="the bf16 n^3 matmul")
    p.add_argument("--flush-mib", type=int, default=d.flush_mib,
                   help="L2 flush buffer touched before each iteration (0: off)")
    p.add_argument("--flush-kind", choices=("write", "read"), default=d.flush_kind,
                   help="rewrite the flush buffer (FlashMLA's tests' way) or only read it (leaves no dirty lines)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-trace", action="store_true", help="wall clock only (no profiler)")
    p.add_argument("--trace-dir", help="keep the profiler traces here (default: temporary, deleted)")
    p.add_argument("--verbose", action="store_true", help="per-trace attribution of the kernels")


def settings_from(args, **fixed) -> Settings:
    """Settings from the parsed options (those it has) and `fixed`; --smoke takes Settings.smoke's sizes."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    given.update(fixed)
    if not getattr(args, "smoke", False):
        return Settings(**given)
    return Settings.smoke(**{k: v for k, v in given.items() if k not in SMOKE_SIZES})


def environment(jax, settings: Settings, **extra) -> dict:
    """What a report says of the machine, the versions and the settings."""
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}", "jax": jax.__version__,
            "jax_flashmla": getattr(jfm, "__version__", "?"), "jax_flashmla_file": jfm.__file__,
            "kernel_path": jfm.kernel_path(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "iters": settings.iters, "flush_mib": settings.flush_mib,
            "flush_kind": settings.flush_kind, "seed": settings.seed, **extra}


def replay(args, render) -> bool:
    """--from-json: print the saved report through render(report, markdown); True when it did."""
    if not args.from_json:
        return False
    with open(args.from_json, encoding="utf-8") as f:
        print(render(json.load(f), args.markdown))
    return True


def start_report(jax, args, settings: Settings, **fields) -> dict:
    """Print the environment line; the report's header: env, settings and `fields`."""
    env = environment(jax, settings, smoke=args.smoke)
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    return {"env": env, "settings": dataclasses.asdict(settings), **fields}


def finish_report(args, report: dict, text: str) -> int:
    """Write --json if asked, print the summary text; the exit code."""
    if args.json:
        write_json(args.json, report)
    print("\n==== summary ====")
    print(text)
    return 0


def run_baselines(jax, timer: Timer, settings: Settings) -> dict:
    """measure_baselines, printed as it ends."""
    print("\n[baselines]")
    base = measure_baselines(jax, timer, settings)
    for k, v in base.items():
        print(f"  {k}: {json.dumps(v)}")
    return base


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {path}")


def baselines_line(base: dict) -> str:
    c, m = base.get("copy", {}), base.get("matmul", {})
    return (f"Same run: device-to-device copy {_f(c.get('gbps'), 'num')} GB/s ({c.get('size')}), "
            f"{m.get('size')} matmul {_f(m.get('tflops'), 'num')} TFLOPS.")


def cell(v, fmt) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return _f(v, fmt)


def table(rows, columns, markdown=False) -> str:
    """rows (dicts) under columns [(heading, key, format)]: aligned text, or a markdown table."""
    cells = [[cell(r.get(k), f) for _, k, f in columns] for r in rows]
    heads = [h for h, _, _ in columns]
    if markdown:
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] +
                         ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [heads] + cells)


def geomean(xs):
    xs = [x for x in xs if x]
    return float(np.exp(np.mean(np.log(xs)))) if xs else None


def device_or_wall(timer: Timer, dev_times: dict, label: str, fn, iters: int) -> dict:
    """{ms, min_ms, iters, src, ...} of one timed call: the trace's device times (Timer.device_ms's
    result under `label`), else the wall clock of `iters` calls of fn."""
    t = dev_times.get(label)
    if t is not None:
        return {"ms": median(t.span_ms), "min_ms": min(t.span_ms), "iters": len(t.span_ms), "src": "trace",
                "events": dict(t.names), "parts_ms": {n: median(v) for n, v in t.name_ms.items()}}
    wall = timer.wall_ms(fn, iters)
    return {"ms": median(wall), "min_ms": min(wall), "iters": len(wall), "src": "wall"}


def cos_diff(x, y) -> float:
    """1 - 2<x, y> / (|x|^2 + |y|^2) in float64 (FlashMLA's tests' measure): 0 for equal arrays."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    return float(1 - 2 * np.dot(x, y) / max(np.dot(x, x) + np.dot(y, y), 1e-12))


def lowered_path(jitted, *args) -> str:
    """'ffi' when the jitted call lowers to one of this package's custom calls on the default
    backend, else 'jax' (the pure-JAX reference the GPU falls back to where there is no kernel)."""
    try:
        text = jitted.lower(*args).as_text()
    except Exception as e:  # noqa: BLE001
        return f"? ({type(e).__name__})"
    return "ffi" if "@jax_flashmla" in text or 'call_target_name = "jax_flashmla' in text else "jax"


# ---- FlashMLA in the same process (the side by side of bench_sparse.py and bench_prefill.py) ----------

def load_flashmla():
    """(flash_mla module, torch module, None) when a FlashMLA build and a CUDA torch import here,
    else (None, None, why)."""
    try:
        import torch
    except ImportError as e:
        return None, None, f"torch does not import ({e})"
    try:
        import flash_mla
    except ImportError as e:
        return None, None, f"flash_mla does not import ({e}); build it with tools/flashmla_build.sh"
    if not torch.cuda.is_available():
        return None, None, "torch sees no CUDA device"
    return flash_mla, torch, None


def open_flashmla(report: dict, calls: int, repeats: int):
    """--flashmla: (flash_mla, torch), or None when they do not import here; either way the report's
    "flashmla" entry says what ran (the build and the side by side's timing) or why not."""
    flash_mla, torch, why = load_flashmla()
    if why:
        report["flashmla"] = f"not run: {why}"
        print(f"NOTE: --flashmla: {why}; timing ours only")
        return None
    report["flashmla"] = (f"flash_mla {getattr(flash_mla, '__version__', '?')} ({flash_mla.__file__}), "
                          f"torch {torch.__version__}; wall clock per call over {calls} back-to-back "
                          f"calls, median of {repeats} alternating repeats, no L2 flush")
    print(f"FlashMLA: {report['flashmla']}")
    return flash_mla, torch


def dense_side_by_side(jax, fm, ours, out, call_args, calls: int, repeats: int) -> dict:
    """FlashMLA's dense decode (causal, its plan made by the first, untimed call) on our q, cache, block
    table and lengths shared through DLPack, and `ours` (our call, its plan made outside), timed alike
    (interleaved_wall_ms). Returns the record's side-by-side fields, or fm_error."""
    flash_mla, torch = fm
    try:
        q, cache, block_table, seqlens = (torch.from_dlpack(x) for x in call_args)
        meta, _ = flash_mla.get_mla_metadata()

        def theirs():
            return flash_mla.flash_mla_with_kvcache(q, cache, block_table, seqlens, HEAD_DIM_V, meta, None,
                                                    None, True)
        fm_out, _ = theirs()
        torch.cuda.synchronize()
        diff = cos_diff(np.asarray(out, np.float32), fm_out.float().cpu().numpy())
        times = interleaved_wall_ms({"ours": (ours, jax.block_until_ready),
                                     "flashmla": (theirs, lambda _: torch.cuda.synchronize())}, calls, repeats)
    except Exception as e:  # noqa: BLE001  (FlashMLA refuses or fails: the row keeps ours)
        return {"fm_error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    mine, fm_ms = median(times["ours"]), median(times["flashmla"])
    return {"ours_wall_ms": mine, "fm_wall_ms": fm_ms, "fm_over_ours": fm_ms / mine, "cos_diff_vs_flashmla": diff,
            "sbs_calls": calls, "sbs_repeats": repeats}


def interleaved_wall_ms(sides: dict, calls: int, repeats: int) -> dict:
    """sides: {name: (call, sync)}. Each repeat times `calls` back-to-back calls of every side (wall
    clock from a synchronised start to the last call's end, over calls), the order of the sides
    reversed every other repeat; returns {name: [ms per call of each repeat]}."""
    names = list(sides)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            call, sync = sides[n]
            for other in sides.values():
                other[1](None)
            t0 = time.perf_counter()
            last = None
            for _ in range(calls):
                last = call()
            sync(last)
            times[n].append((time.perf_counter() - t0) * 1e3 / calls)
    return times
