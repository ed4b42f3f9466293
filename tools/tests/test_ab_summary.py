"""tools/ab_summary.py (the A/B table of tools/ab_variants.sh) on a hand-made run folder."""

import contextlib
import importlib.util
import io
import json
import pathlib

SCRIPT = pathlib.Path(__file__).parent.parent / "ab_summary.py"


def _load():
    spec = importlib.util.spec_from_file_location("_ab_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(path, ms_by_case):
    matrix = [dict(b=128, s_k=s_k, h_q=h_q, s_q=1, h_kv=1, kernel_ms=ms, src="trace")
              for (s_k, h_q), ms in ms_by_case.items()]
    path.write_text(json.dumps({"env": {"kernel_path": "cuda-sm90"}, "matrix": matrix}))
    return str(path)


def _summary(tmp_path, variant_check="PASS (9 of 9)"):
    runs = ["variant\trep\trc\tstart\tend\tsecs\tjson"]
    ms = {"base": {(4096, 16): 0.200, (4096, 128): 0.500}, "fast": {(4096, 16): 0.100, (4096, 128): 0.400}}
    for rep in (1, 2):
        for variant in ("base", "fast"):
            json_path = _report(tmp_path / f"{variant}_{rep}.json", ms[variant])
            runs.append(f"{variant}\t{rep}\t0\t\t\t16\t{json_path}")
    (tmp_path / "runs.tsv").write_text("\n".join(runs) + "\n")
    (tmp_path / "variants.txt").write_text("base\nfast\n")
    (tmp_path / "status.tsv").write_text(f"fast\tcheck\t{variant_check}\n")
    (tmp_path / "ptxas_fast.txt").write_text(
        "Used 252 registers | 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads | "
        "void ns::decode_kernel<bf16>(ns::Params)\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _load().main(["--dir", str(tmp_path)]) == 0
    return out.getvalue()


def test_ratio_per_case_and_geometric_mean(tmp_path):
    text = _summary(tmp_path)
    # ratio = median(base) / median(variant): > 1 means the variant is faster
    assert "| 4096 | 16 | 1 | 0.200/0.200 | 0.100/0.100 | 2.000 |" in text
    assert "| 4096 | 128 | 1 | 0.500/0.500 | 0.400/0.400 | 1.250 |" in text
    assert (f"base/fast: geomean {(2.0 * 1.25) ** 0.5:.4f}, min 1.250 (s_k=4096 h_q=128 s_q=1), max 2.000 "
            "over 2 cases; 0 below 0.98") in text
    assert "| `ns::decode_kernel<bf16>` | - | 252 regs |" in text


def test_a_failed_check_is_marked(tmp_path):
    text = _summary(tmp_path, variant_check="FAILED rc=1")
    assert "**fast FAILED**" in text
    assert "(check FAILED)" in text


def test_a_run_folder_unpacked_elsewhere_finds_its_json(tmp_path):
    """runs.tsv names each JSON by its path on the device; a fetched copy has them under json/."""
    (tmp_path / "json").mkdir()
    runs = ["variant\trep\trc\tstart\tend\tsecs\tjson"]
    for variant, ms in (("base", 0.2), ("fast", 0.1)):
        _report(tmp_path / "json" / f"{variant}_rep1.json", {(4096, 16): ms})
        runs.append(f"{variant}\t1\t0\t\t\t16\t/nonexistent/ab/run/json/{variant}_rep1.json")
    (tmp_path / "runs.tsv").write_text("\n".join(runs) + "\n")
    (tmp_path / "variants.txt").write_text("base\nfast\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _load().main(["--dir", str(tmp_path)]) == 0
    assert "| 4096 | 16 | 1 | 0.200 | 0.100 | 2.000 |" in out.getvalue()


def test_sparse_rows_are_keyed_by_format_and_topk(tmp_path):
    """bench_sparse.py's rows (AB_BENCH=benchmarks/bench_sparse.py): one table row per format, s_k,
    topk, h_q and s_q, so the pipelined and unpipelined sparse decode builds line up."""
    runs = ["variant\trep\trc\tstart\tend\tsecs\tjson"]
    for variant, ms in (("base", 0.08), ("nopipe", 0.10)):
        rows = [dict(suite="v32", fmt="v32", b=64, h_q=64, s_q=1, s_k=8192, topk=2048, page=64, extra_topk=0,
                     kernel_ms=ms, src="trace"),
                dict(suite="v4", fmt="model1", b=64, h_q=64, s_q=1, s_k=8192, topk=512, page=256, extra_topk=512,
                     kernel_ms=2 * ms, src="trace")]
        path = tmp_path / f"{variant}.json"
        path.write_text(json.dumps({"env": {"kernel_path": "cuda-sm90"}, "sparse": rows}))
        runs.append(f"{variant}\t1\t0\t\t\t16\t{path}")
    (tmp_path / "runs.tsv").write_text("\n".join(runs) + "\n")
    (tmp_path / "variants.txt").write_text("base\nnopipe\n")
    (tmp_path / "status.tsv").write_text("nopipe\toverlay\tdefine JAX_FLASHMLA_SPARSE_DECODE_PIPELINE=0\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _load().main(["--dir", str(tmp_path)]) == 0
    text = out.getvalue()
    assert "| v32 8192 topk 2048 | 64 | 1 | 0.080 | 0.100 | 0.800 |" in text
    assert "| model1 8192 topk 512+512 | 64 | 1 | 0.160 | 0.200 | 0.800 |" in text
    assert "define JAX_FLASHMLA_SPARSE_DECODE_PIPELINE=0" in text


def test_prefill_rows_are_keyed_by_d_qk_s_kv_and_topk(tmp_path):
    """bench_prefill.py's rows (AB_BENCH=benchmarks/bench_prefill.py, AB_FIELD=fwd_ms): one table row per
    d_qk, s_kv, topk, h_q and s_q."""
    runs = ["variant\trep\trc\tstart\tend\tsecs\tjson"]
    for variant, ms in (("base", 5.0), ("pproducer", 4.0)):
        rows = [dict(suite="v32", d_qk=576, s_kv=8192, topk=2048, h_q=128, s_q=4096, fwd_ms=ms),
                dict(suite="v4", d_qk=512, s_kv=8192, topk=512, h_q=64, s_q=4096, fwd_ms=ms / 4)]
        path = tmp_path / f"{variant}.json"
        path.write_text(json.dumps({"env": {"kernel_path": "cuda-sm90"}, "prefill": rows}))
        runs.append(f"{variant}\t1\t0\t\t\t16\t{path}")
    (tmp_path / "runs.tsv").write_text("\n".join(runs) + "\n")
    (tmp_path / "variants.txt").write_text("base\npproducer\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _load().main(["--dir", str(tmp_path), "--field", "fwd_ms"]) == 0
    text = out.getvalue()
    assert "| d_qk 576 s_kv 8192 topk 2048 | 128 | 4096 | 5.000 | 4.000 | 1.250 |" in text, text
    assert "| d_qk 512 s_kv 8192 topk 512 | 64 | 4096 | 1.250 | 1.000 | 1.250 |" in text, text
