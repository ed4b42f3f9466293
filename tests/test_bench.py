"""benchmarks/: the case filter, FlashMLA's formulas, the trace parser on a synthetic GPU trace, the
report, the benchmark's cache pool, and a tiny run of the command line on the CPU."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax_flashmla as jfm

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))
import bench_decode  # noqa: E402
import mla_bench  # noqa: E402


def test_standard_matrix_and_filters():
    cases = mla_bench.select_cases(mla_bench.STANDARD, {})
    assert len(cases) == 24
    assert {(c.b, c.h_kv) for c in cases} == {(128, 1)}
    assert {c.s_k for c in cases} == {4096, 8192, 16384} and {c.h_q for c in cases} == {16, 32, 64, 128}
    subset = mla_bench.select_cases(mla_bench.STANDARD, mla_bench.parse_filter("s_k=4096,h_q=64/128"))
    assert [(c.s_k, c.h_q, c.s_q) for c in subset] == [(4096, 64, 1), (4096, 64, 2), (4096, 128, 1), (4096, 128, 2)]
    # A value outside the matrix adds it: the same matrix with two latent heads.
    assert {c.h_kv for c in mla_bench.select_cases(mla_bench.STANDARD, mla_bench.parse_filter("h_kv=2"))} == {2}
    with pytest.raises(ValueError, match="bad case filter"):
        mla_bench.parse_filter("d=64")


def test_flops_and_bytes_are_flashmla_formulas():
    flops, nbytes = mla_bench.flops_and_bytes([100, 300], b=2, s_q=2, h_q=16, h_kv=1)
    assert flops == 2 * 2 * 400 * 16 * (576 + 512)
    assert nbytes == 2 * (400 * 1 * 576 + 2 * 2 * 16 * (576 + 512))


def _ev(meta, start_us, dur_us, *stats):
    s = " ".join(f"stats {{ metadata_id: {sid} {kind}: {val} }}" for sid, kind, val in stats)
    return f"events {{ metadata_id: {meta} offset_ps: {int(start_us * 1e6)} duration_ps: {int(dur_us * 1e6)} {s} }}"


def _synthetic_trace():
    """A GPU-shaped XSpace: two timed iterations of decode + combine (overlapping in the first), an
    L2 flush and an allocation between them, and a CUPTI-overhead line that must not count."""
    cls = mla_bench._profile_data_class()
    if cls is None or not hasattr(cls, "from_text_proto"):
        pytest.skip("jax.profiler.ProfileData.from_text_proto is not available in this jax")
    kd, mod, mal = (1, "ref_value", 9), 2, (3, "ref_value", 9)
    call = (mod, "str_value", '"jit_bench_kernel_call"')
    gpu = [_ev(1, 20, 10, kd, call), _ev(2, 28, 7, kd, call),                      # iteration 0
           _ev(3, 150, 50, kd, (mod, "str_value", '"jit_bench_l2_flush"')), _ev(4, 160, 1, mal),
           _ev(1, 220, 12, kd, call), _ev(2, 240, 5, kd, call)]                    # iteration 1
    host = [_ev(10, 0, 100), _ev(11, 200, 100)]
    p = mla_bench.ANNOTATION_PREFIX
    text = f"""
planes {{ id: 1 name: "/host:CPU"
  lines {{ id: 1 name: "python3" timestamp_ns: 0 {' '.join(host)} }}
  event_metadata {{ key: 10 value {{ id: 10 name: "{p}|kernel|0" }} }}
  event_metadata {{ key: 11 value {{ id: 11 name: "{p}|kernel|1" }} }}
}}
planes {{ id: 2 name: "/device:GPU:0"
  lines {{ id: 7 name: "Stream #7(Kernel,MemoryAlloc)" timestamp_ns: 0 {' '.join(gpu)} }}
  lines {{ id: 8 name: "CUPTI overhead" timestamp_ns: 0 {_ev(1, 50, 99, kd)} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "mla_decode_kernel" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "mla_combine_kernel" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "loop_add_fusion" }} }}
  event_metadata {{ key: 4 value {{ id: 4 name: "MemoryAlloc" }} }}
  stat_metadata {{ key: 1 value {{ id: 1 name: "kernel_details" }} }}
  stat_metadata {{ key: 2 value {{ id: 2 name: "hlo_module" }} }}
  stat_metadata {{ key: 3 value {{ id: 3 name: "memalloc_details" }} }}
  stat_metadata {{ key: 9 value {{ id: 9 name: "regs:128" }} }}
}}"""
    return mla_bench.parse_trace(cls.from_text_proto(text))


def _rounded(xs):
    return [round(x, 6) for x in xs]


def test_trace_parser_attributes_kernels_to_iterations():
    events, windows, info = _synthetic_trace()
    assert [w.index for w in windows] == [0, 1]
    assert any("skipped" in line for line in info["device_lines"])  # the CUPTI overhead line
    t = mla_bench.attribute(events, windows, "kernel", "bench_kernel_call")
    assert t.method == "window+module"
    assert _rounded(t.span_ms) == [0.015, 0.025]  # first start to last end; the flush is not in it
    assert _rounded(t.busy_ms) == [0.015, 0.017]  # overlapping kernels count once
    assert _rounded(t.sum_ms) == [0.017, 0.017]
    assert t.names == {"mla_decode_kernel": 1, "mla_combine_kernel": 1}
    assert {n: _rounded(v) for n, v in t.name_ms.items()} == {
        "mla_decode_kernel": [0.01, 0.012], "mla_combine_kernel": [0.007, 0.005]}
    assert _rounded(t.tail_ms) == [0.005, 0.013]  # after the decode kernel's end
    no_windows = mla_bench.attribute(events, [], "kernel", "bench_kernel_call")
    assert no_windows.method == "module-runs" and _rounded(no_windows.span_ms) == [0.015, 0.025]


def test_report_ratios_to_the_same_runs_ceilings():
    base = {"copy": {"gbps": 4000.0, "src": "trace"}, "matmul": {"tflops": 800.0, "src": "trace"}}
    rec = dict(b=128, s_k=4096, h_q=16, s_q=1, h_kv=1, kernel_ms=0.25, gbps=3000.0, tflops=80.0, src="trace")
    row = mla_bench.with_ratios(rec, base)
    assert row["bw_pct"] == pytest.approx(75.0) and row["flop_pct"] == pytest.approx(10.0)
    text = mla_bench.markdown({"env": {"device": "gpu:H100"}, "baselines": base, "matrix": [rec]})
    assert "| s_k | h_q | s_q | kernel ms |" in text  # b and h_kv are fixed: no columns of their own
    assert "| 4096 | 16 | 1 | 0.250 | n/a | n/a | 80 | 3000 | 75.0 | 10.0 |" in text


def test_pool_holds_exactly_the_pages_in_use_shuffled():
    import jax
    pool = mla_bench.Pool(jax, b=8, s_k=200, h_kv=1, min_len=2, seed=0)
    lengths = np.asarray(pool.cache_seqlens)
    assert (lengths >= 2).all() and lengths.sum() == pool.lengths.sum()
    pages = -(-lengths // jfm.PAGE_SIZE)
    table = np.asarray(pool.block_table)
    used = np.concatenate([table[i, :n] for i, n in enumerate(pages)])
    assert sorted(used) == list(range(pool.num_blocks)) and pool.num_blocks == pages.sum()
    assert not np.array_equal(used, np.arange(pool.num_blocks))  # shuffled
    assert pool.cache.shape == (pool.num_blocks, jfm.PAGE_SIZE, 1, jfm.HEAD_DIM)


def test_command_line_runs_a_case_on_the_cpu_and_rerenders_its_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_decode.main(["--smoke", "--cases", "s_k=128,h_q=16,s_q=2", "--no-trace", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (rec,) = report["matrix"]
    assert (rec["b"], rec["s_k"], rec["h_q"], rec["s_q"], rec["h_kv"]) == (4, 128, 16, 2, 1)
    assert rec["src"] == "wall" and rec["kernel_ms"] > 0 and rec["call_ms"] > 0
    flops, nbytes = mla_bench.flops_and_bytes([rec["sum_len"]], rec["b"], 2, 16, 1)
    assert rec["tflops"] == pytest.approx(flops / (rec["kernel_ms"] * 1e-3) / 1e12)
    assert rec["cos_diff_vs_reference"] < 1e-5  # the timed call computes the right thing
    assert report["baselines"]["copy"]["gbps"] > 0 and report["baselines"]["matmul"]["tflops"] > 0
    capsys.readouterr()
    assert bench_decode.main(["--from-json", str(out), "--markdown"]) == 0
    assert "| 128 | 16 | 2 |" in capsys.readouterr().out


def test_harness_times_a_build_without_the_testing_module(tmp_path):
    """An older build first on PYTHONPATH lacks jax_flashmla.testing: the harness takes this checkout's."""
    package = pathlib.Path(jfm.__file__).parent
    shutil.copytree(package, tmp_path / "jax_flashmla", ignore=shutil.ignore_patterns("testing.py", "__pycache__"))
    bench_dir = pathlib.Path(__file__).parent.parent / "benchmarks"
    code = "import mla_bench, jax_flashmla; print(jax_flashmla.__file__); print(mla_bench.testing.__file__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{bench_dir}"})
    assert result.returncode == 0, result.stderr
    imported, generator = result.stdout.split()
    assert imported.startswith(str(tmp_path))
    assert pathlib.Path(generator).resolve() == (bench_dir.parent / "jax_flashmla" / "testing.py").resolve()


def test_side_by_side_summary_and_wall_bandwidth():
    recs = [{"s_k": 4096, "h_q": 16, "s_q": 1, "fm_over_ours": 1.02, "ours_wall_ms": 0.5, "bytes": 1.5e9},
            {"s_k": 4096, "h_q": 128, "s_q": 2, "fm_over_ours": 0.95},
            {"s_k": 8192, "h_q": 128, "s_q": 2, "fm_over_ours": 1.10},
            {"s_k": 8192, "h_q": 16, "s_q": 1, "fm_error": "RuntimeError: no"}]
    lines = mla_bench.side_by_side_summary(recs)
    geo = (1.02 * 0.95 * 1.10) ** (1 / 3)
    assert f"geomean {geo:.3f} over 3 rows, min 0.950 (s_k=4096 h_q=128 s_q=2)" in lines[0]
    assert lines[1] == "h_q 128, s_q 2: s_k 4096 0.950, s_k 8192 1.100"
    assert lines[2].startswith("FlashMLA failed on 1 rows")
    # 1.5 GB in 0.5 ms is 3000 GB/s: 75% of a 4000 GB/s copy.
    row = mla_bench.with_ratios(recs[0], {"copy": {"gbps": 4000.0}})
    assert row["wall_bw_pct"] == pytest.approx(75.0)
    assert mla_bench.side_by_side_summary([{"s_k": 1, "h_q": 1, "s_q": 1}]) == []
    assert "FM/ours" in [h for h, _, _ in mla_bench._columns(recs)]
    assert "FM/ours" not in [h for h, _, _ in mla_bench._columns([{"s_k": 1}])]
