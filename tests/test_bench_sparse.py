"""benchmarks/bench_sparse.py: the sparse matrix and its filters, FlashMLA's FLOP and byte counts by
hand, the problem generator, the side-by-side timer's order, the summary, a tiny run of the command
line on the CPU with its JSON, and tools/flashmla_build.sh's refusals."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_sparse  # noqa: E402
import mla_bench  # noqa: E402


def _plan(*argv):
    return bench_sparse.plan(bench_sparse.parser().parse_args(list(argv)))


def test_the_issues_sparse_matrix():
    sparse, dense = _plan()
    assert dense == []
    by_suite = {s: [c for c in sparse if c.suite == s] for s in ("v32", "v4", "peak")}
    assert len(by_suite["v32"]) == 16 and len(by_suite["v4"]) == 16 and len(by_suite["peak"]) == 4
    v32 = by_suite["v32"]
    assert {(c.fmt, c.s_k, c.topk, c.page, c.extra_topk, c.d_qk) for c in v32} == {("v32", 32768, 2048, 64, 0, 576)}
    assert {c.b for c in v32} == {64, 128} and {c.h_q for c in v32} == {16, 32, 64, 128}
    assert {c.s_q for c in v32} == {1, 2}
    v4 = by_suite["v4"]
    assert {(c.fmt, c.d_qk, c.topk, c.page, c.extra_s_k, c.extra_page) for c in v4} == {
        ("model1", 512, 128, 256, 16384, 64)}
    assert {c.extra_topk for c in v4} == {512, 1024} and {c.h_q for c in v4} == {16, 32, 64, 128}
    assert {(c.b, c.s_q, c.s_k, c.topk, c.fmt) for c in by_suite["peak"]} == {
        (148, 2, 32768, 16384, "v32"), (148, 2, 32768, 16384, "model1")}
    # Consecutive cases share a pool.
    keys = [(c.fmt, c.b, c.s_k, c.page) for c in sparse]
    assert len(keys) - sum(a != b for a, b in zip(keys, keys[1:])) > len(set(keys))
    # FlashMLA runs 64 or 128 heads: a caller pads the rest.
    assert [bench_sparse.SparseCase("v32", "v32", 1, h, 1, 1, 1, 64).flashmla_h_q for h in (1, 16, 32, 64, 96, 128)] == [
        64, 64, 64, 64, 128, 128]


def test_filters_and_suites():
    sparse, _ = _plan("--suite", "v32", "--cases", "h_q=16/32,s_q=2,b=64")
    assert [(c.b, c.h_q, c.s_q) for c in sparse] == [(64, 32, 2), (64, 16, 2)]
    sparse, _ = _plan("--suite", "v4", "--cases", "extra_topk=1024,h_q=8")  # h_q 8 is added to the grid
    assert {c.h_q for c in sparse} == {8} and {c.extra_topk for c in sparse} == {1024}
    sparse, _ = _plan("--suite", "peak,v32", "--cases", "d_qk=512")
    assert {(c.suite, c.fmt) for c in sparse} == {("peak", "model1")}
    sparse, _ = _plan("--suite", "v32,v4", "--cases", "topk=4096,b=128,h_q=64,s_q=2")  # a topk sweep point
    assert [(c.suite, c.topk, c.extra_topk) for c in sparse] == [("v32", 4096, 0), ("v4", 4096, 512), ("v4", 4096, 1024)]
    sparse, dense = _plan("--suite", "none", "--dense-fp8", "--dense-cases", "s_k=4096,h_q=16/32")
    assert sparse == [] and [(c.b, c.s_k, c.h_q, c.s_q) for c in dense] == [
        (128, 4096, 16, 1), (128, 4096, 16, 2), (128, 4096, 32, 1), (128, 4096, 32, 2)]
    with pytest.raises(ValueError, match="--suite: unknown suite 'v3'"):
        _plan("--suite", "v3")
    with pytest.raises(ValueError, match="--cases: bad case filter term 'fmt=v32'"):
        _plan("--cases", "fmt=v32")
    with pytest.raises(ValueError, match="--dense-cases: bad case filter term 'h_kv=2'"):
        _plan("--dense-fp8", "--dense-cases", "h_kv=2")


def test_flops_and_bytes_are_flashmlas_counts():
    # V3.2, b 64, h_q 128, s_q 2, topk 2048 (an anchor row: 0.1918 ms, 381 TFLOPS, KV 897 GB/s).
    c = bench_sparse.SparseCase("v32", "v32", 64, 128, 2, 32768, 2048, 64)
    n = bench_sparse.sparse_flops_and_bytes(c, unique_tokens=250_000)
    assert n["flops"] == 2 * 128 * (64 * 2 * 2048) * (576 + 512) == 73_014_444_032
    assert n["bytes"] == 2 * 64 * 2 * 128 * 576 + 250_000 * 656 + 2 * 64 * 2 * 128 * 512
    assert n["kv_bytes"] == 64 * 2 * 2048 * 656
    assert n["flops"] / 0.1918e-3 / 1e12 == pytest.approx(381, abs=0.5)
    assert n["kv_bytes"] / 0.1918e-3 / 1e9 == pytest.approx(897, abs=0.5)
    # V4 with an extra pool: both index sets attended; FlashMLA counts 576 bytes a retrieved token,
    # the pool holds 584.
    c = bench_sparse.SparseCase("v4", "model1", 128, 64, 2, 16384, 128, 256, 512, 16384, 64)
    n = bench_sparse.sparse_flops_and_bytes(c, unique_tokens=1000)
    assert n["attended_tokens"] == 128 * 2 * (128 + 512)
    assert n["flops"] == 2 * 64 * 128 * 2 * 640 * (512 + 512)
    assert n["bytes"] == 2 * 128 * 2 * 64 * 512 + 1000 * 576 + 2 * 128 * 2 * 64 * 512
    assert n["kv_bytes"] == 128 * 2 * 640 * 584
    # Dense FP8: FlashMLA's dense count with 656 bytes a token.
    assert bench_sparse.dense_fp8_bytes([100, 300], 2, 2, 16) == 400 * 656 + 2 * 2 * 2 * 16 * 1088
    assert bench_sparse.unique_valid(np.array([[3, 3, -1, 7]]), np.array([[3, -1]]), None) == 3


def test_problem_indices_name_distinct_tokens_of_their_request():
    import jax
    pool = bench_sparse.SparsePool(jax, "model1", b=3, s_k=300, page=256, min_len=2, seed=0)
    lengths = pool.lengths
    assert pool.pool.shape == (pool.num_blocks, 256 + 4, 1, 576)  # model1 rows: 256 tokens + scales/padding
    assert pool.num_blocks == int((-(-lengths // 256)).sum())
    used = np.concatenate([pool.block_table[i, :-(-n // 256)] for i, n in enumerate(lengths)])
    assert sorted(used) == list(range(pool.num_blocks))
    topk = int(lengths.min()) + 5  # the shortest request pads with -1
    idx = pool.indices(np.random.default_rng(0), s_q=2, topk=topk)
    assert idx.shape == (3, 2, topk) and idx.dtype == np.int32
    for i, n in enumerate(lengths):
        mine = {int(p) * 256 + o for p in pool.block_table[i, :-(-n // 256)] for o in range(256)}
        mine = {s for s in mine if (list(pool.block_table[i]).index(s // 256)) * 256 + s % 256 < n}
        for s in range(2):
            row = idx[i, s]
            valid = row[row >= 0]
            assert len(set(valid)) == valid.size == min(n, topk) and set(valid) <= mine
            assert (row[valid.size:] == -1).all()
    assert not np.array_equal(idx[:, 0], idx[:, 1])


def test_side_by_side_alternates_and_times_each_side_alike():
    calls = []
    sides = {"ours": (lambda: calls.append("o"), lambda _: calls.append("so")),
             "flashmla": (lambda: calls.append("f"), lambda _: calls.append("sf"))}
    times = mla_bench.interleaved_wall_ms(sides, calls=3, repeats=2)
    assert {k: len(v) for k, v in times.items()} == {"ours": 2, "flashmla": 2}
    timed = [c for c in calls if c in ("o", "f")]
    assert timed == ["o"] * 3 + ["f"] * 3 + ["f"] * 3 + ["o"] * 3  # reversed every other repeat
    assert all(t >= 0 for v in times.values() for t in v)


def test_summary_geomeans_and_targets():
    rows = [dict(fmt="v32", b=64, h_q=h, s_q=2, topk=2048, extra_topk=0, fm_over_ours=r)
            for h, r in ((128, 1.2), (64, 1.05), (16, 2.0), (32, 1.4))]
    dense = [dict(s_k=4096, h_q=16, s_q=1, fp8_over_bf16=0.6, meets_target=True),
             dict(s_k=4096, h_q=128, s_q=2, fp8_over_bf16=1.1, meets_target=False)]
    lines = bench_sparse.summary_lines({"sparse": rows, "dense_fp8": dense})
    assert lines[0].startswith(f"FlashMLA/ours, h_q 64/128: geomean {np.sqrt(1.2 * 1.05):.3f} over 2 rows, min 1.050")
    assert lines[1].startswith(f"FlashMLA/ours, h_q < 64 (FlashMLA padded to 64): geomean {np.sqrt(2.8):.3f}")
    assert lines[2] == ("dense FP8 / bf16: 1 of 2 rows within target (0.62 where h_q*s_q <= 32, else 1.0); "
                        "misses: s_k=4096 h_q=128 s_q=2 1.100")


def test_command_line_runs_on_the_cpu_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "sparse.json"
    assert bench_sparse.main(["--smoke", "--suite", "v32,v4", "--cases", "h_q=16,s_q=2", "--no-trace", "--iters", "2",
                              "--dense-fp8", "--dense-cases", "s_k=128,h_q=16,s_q=1", "--flashmla",
                              "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"env", "settings", "baselines", "sparse", "dense_fp8", "flashmla"} <= set(report)
    assert report["flashmla"].startswith("not run: ")  # no FlashMLA build on a CPU machine
    assert report["baselines"]["copy"]["gbps"] > 0 and report["baselines"]["matmul"]["tflops"] > 0
    assert [(r["suite"], r["fmt"], r["h_q"], r["s_q"], r["extra_topk"]) for r in report["sparse"]] == [
        ("v32", "v32", 16, 2, 0), ("v4", "model1", 16, 2, 32)]
    for rec in report["sparse"]:
        assert rec["src"] == "wall" and rec["kernel_ms"] > 0 and rec["path"] == "ffi" and rec["attn_sink"]
        case = bench_sparse.SparseCase(**{k: rec[k] for k in (
            "suite", "fmt", "b", "h_q", "s_q", "s_k", "topk", "page", "extra_topk", "extra_s_k", "extra_page")})
        want = bench_sparse.sparse_flops_and_bytes(case, rec["unique_tokens"])
        assert {k: rec[k] for k in want} == want
        seconds = rec["kernel_ms"] * 1e-3
        assert rec["tflops"] == pytest.approx(want["flops"] / seconds / 1e12)
        assert rec["gbps"] == pytest.approx(want["bytes"] / seconds / 1e9)
        assert rec["kv_gbps"] == pytest.approx(want["kv_bytes"] / seconds / 1e9)
        assert 0 < rec["unique_tokens"] <= rec["attended_tokens"]
    (d,) = report["dense_fp8"]
    assert (d["b"], d["s_k"], d["h_q"], d["s_q"], d["target"]) == (4, 128, 16, 1, 0.62)
    assert d["fp8_over_bf16"] == pytest.approx(d["fp8_ms"] / d["bf16_ms"])
    assert d["meets_target"] == (d["fp8_over_bf16"] <= 0.62)
    assert d["cos_diff_fp8_vs_bf16"] < 5e-3  # the FP8 call reads the same requests, quantised
    assert d["fp8_bytes"] == bench_sparse.dense_fp8_bytes([d["sum_len"]], 4, 1, 16)
    capsys.readouterr()
    assert bench_sparse.main(["--from-json", str(out), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| suite | fmt | b | h_q | s_q | topk | ms | TFLOPS | GB/s | KV GB/s | BW% | FLOP% |" in text
    assert "| v4 | model1 | 2 | 16 | 2 | 16+32 |" in text
    assert "| 128 | 16 | 1 |" in text and "dense FP8 / bf16: " in text


def test_flashmla_build_refuses_a_missing_source_and_one_inside_the_repository(tmp_path):
    script = ROOT / "tools" / "flashmla_build.sh"
    env = {**os.environ, "PREFIX": str(tmp_path / "prefix")}
    r = subprocess.run(["bash", str(script), str(tmp_path / "none")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "no FlashMLA source" in r.stderr
    inside = ROOT / "benchmarks" / "flashmla_src_for_test"
    try:
        for d in ("flash_mla", "csrc/sm90"):
            (inside / d).mkdir(parents=True)
        (inside / "setup.py").write_text("")
        r = subprocess.run(["bash", str(script), str(inside)], capture_output=True, text=True, env=env)
        assert r.returncode != 0 and "is not ignored" in r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(inside)], check=True)
