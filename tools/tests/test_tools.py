"""The lab tools' scripts parse, the ptxas report reads a build log, the A/B preset refuses to run
without the tree to compare, and the FlashMLA comparison reads its markdown."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

TOOLS = pathlib.Path(__file__).parent.parent
SCRIPTS = sorted(TOOLS.glob("*.sh"))
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")

sys.path.insert(0, str(TOOLS))
import flashmla_anchors  # noqa: E402


@needs_bash
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shell_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_bash
def test_ptxas_report_reads_a_build_log(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(
        "ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z6kernelv\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 7 barriers\n")
    result = subprocess.run(["bash", str(TOOLS / "ptxas_report.sh"), str(log), "WARN "],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Used 255 registers | 8 bytes stack frame, 4 bytes spill stores")
    assert "kernel" in lines[0]
    assert any(line.startswith("WARN ") and "4 bytes spill stores" in line for line in lines[1:])


@needs_bash
def test_ab_trees_needs_the_old_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OLD"}
    result = subprocess.run(["bash", str(TOOLS / "ab_trees.sh")], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 2 and "OLD=git:REF" in result.stdout


ANCHORS = """# FlashMLA on some GPU
Same run: device-to-device copy 3000 GB/s, bf16 8192^3 matmul 750 TFLOPS.

| s_k | h_q | s_q | FlashMLA ms | TFLOPS | GB/s | plain XLA ms |
|---|---|---|---|---|---|---|
| 4096 | 16 | 1 | 0.250 | 75 | 2400 | 3.0 |
| 4096 | 128 | 2 | 0.500 | 600 | 1500 | 5.0 |

| s_k | h_q | s_q | FlashMLA ms |
|---|---|---|---|
| 4096 | 16 | 1 | 9.999 |
"""


def test_anchor_rows_and_ratios_to_each_runs_own_ceilings(tmp_path, capsys):
    anchors = flashmla_anchors.read_anchors(ANCHORS)
    assert anchors["copy_gbps"] == 3000 and anchors["matmul_tflops"] == 750
    assert anchors["rows"][(4096, 16, 1)]["FlashMLA ms"] == 0.25  # the first table's row wins
    base = {"copy": {"gbps": 4000.0}, "matmul": {"tflops": 800.0}}
    rec = dict(b=128, s_k=4096, h_q=16, s_q=1, h_kv=1, kernel_ms=0.2, gbps=3200.0, tflops=80.0)
    row = flashmla_anchors.compare(anchors, rec, base)
    assert row["fm_over_ours"] == pytest.approx(1.25)
    assert row["fm_bw_pct"] == pytest.approx(80.0) and row["bw_pct"] == pytest.approx(80.0)
    assert row["fm_flop_pct"] == pytest.approx(10.0) and row["flop_pct"] == pytest.approx(10.0)
    assert flashmla_anchors.compare(anchors, dict(rec, h_kv=2), base) == {}  # not a standard-matrix row
    (tmp_path / "a.md").write_text(ANCHORS)
    (tmp_path / "b.json").write_text(json.dumps({"baselines": base, "matrix": [rec]}))
    assert flashmla_anchors.main([str(tmp_path / "a.md"), str(tmp_path / "b.json")]) == 0
    assert "| 4096 | 16 | 1 | 0.200 | 0.250 | 1.25 | 80.0 | 80.0 | 10.0 | 10.0 |" in capsys.readouterr().out


@needs_bash
def test_ab_variants_passes_a_variants_cmake_defines_to_its_build(tmp_path):
    """A variant folder's cmake.txt (NAME=VALUE lines) becomes -C cmake.define.NAME=VALUE of that
    variant's build alone; a line that is not NAME=VALUE drops the variant. Dry run: nothing built."""
    variants = tmp_path / "variants"
    (variants / "nopipe").mkdir(parents=True)
    (variants / "nopipe" / "cmake.txt").write_text("# the unpipelined sparse decode\n"
                                                  "JAX_FLASHMLA_SPARSE_DECODE_PIPELINE=0  # A/B\n")
    (variants / "bad").mkdir()
    (variants / "bad" / "cmake.txt").write_text("JAX_FLASHMLA_SPARSE_DECODE_PIPELINE 0\n")
    env = dict(os.environ, VARIANTS="base nopipe bad", AB_VARIANTS_DIR=str(variants), AB_DIR=str(tmp_path / "ab"),
               OUT=str(tmp_path / "out"), AB_DRY_RUN="1")
    result = subprocess.run(["bash", str(TOOLS / "ab_variants.sh")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.endswith("nopipe: would build " + str(tmp_path / "ab" / "src_nopipe") +
                             " with -C cmake.define.JAX_FLASHMLA_CUDA=ON -C "
                             "cmake.define.JAX_FLASHMLA_SPARSE_DECODE_PIPELINE=0") for line in lines), result.stdout
    assert any(line.endswith("base: would build " + str(tmp_path / "ab" / "src_base") +
                             " with -C cmake.define.JAX_FLASHMLA_CUDA=ON") for line in lines), result.stdout
    assert any("bad: cmake.txt line 'JAX_FLASHMLA_SPARSE_DECODE_PIPELINE 0' is not NAME=VALUE: dropped" in line
               for line in lines), result.stdout
    assert not any("bad: would build" in line for line in lines)


@needs_bash
def test_side_by_side_refuses_an_unknown_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    result = subprocess.run(["bash", str(TOOLS / "side_by_side.sh"), "decode", "dense"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2
    assert "unknown step 'dense' (decode sparse prefill pdl seesaw pproducer tests)" in result.stdout
    assert not (tmp_path / "flashmla_build.log").exists()  # nothing was started
