"""The repository's shell scripts parse (`bash -n`): most of them only run on the device machine,
so a syntax error would otherwise first show there, at the cost of device time."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parent.parent
SCRIPTS = sorted(ROOT.glob("scripts/*.sh")) + [ROOT / ".ci" / "run"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(ROOT)) for s in SCRIPTS])
def test_shell_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ptxas_report_reads_a_build_log(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(
        "ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z6kernelv\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 7 barriers\n")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "ptxas_report.sh"), str(log), "WARN "],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Used 255 registers | 8 bytes stack frame, 4 bytes spill stores")
    assert "kernel" in lines[0]
    assert any(line.startswith("WARN ") and "4 bytes spill stores" in line for line in lines[1:])
