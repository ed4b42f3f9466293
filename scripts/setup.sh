#!/usr/bin/env bash
# Installs jax_flashmla from this checkout with everything its examples and tests need.
# The extension is compiled here: the CPU handlers always, the SM90 kernels when nvcc is found.
# The build prints one line per compile step and one ptxas line per kernel (registers, stack, spills);
# the full pip/CMake/compiler log goes to build/setup.log. A failed build exits non-zero after
# printing the end of that log.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python3 -m pip install -q --upgrade pip
# Build requirements, installed up front so the build reuses them (no isolated env, incremental build/).
python3 -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4" "jax>=0.6" "nvidia-cutlass>=4.2"

# Reads the verbose build log on stdin and prints its progress: scikit-build-core's steps, the
# CUDA decision, "[n/N] compile <source>" per Ninja step, and per kernel the ptxas summary.
progress() {
  awk -v root="$PWD/" '
    function short(path) {
      if (index(path, root) == 1) path = substr(path, length(root) + 1)
      sub(/.*site-packages\//, "", path)
      return path
    }
    function show(line) { print line; fflush() }
    /^ *\*\*\* / || /-- jax_flashmla:/ { sub(/^ +/, ""); show($0); next }
    /^ *\[[0-9]+\/[0-9]+\] / {
      what = ""
      for (i = 2; i < NF && what == ""; i++) if ($i == "-c") what = "compile " short($(i + 1))
      for (i = 2; i < NF && what == ""; i++) if ($i == "-o" || $i == "qc") what = "link " short($(i + 1))
      show("  " $1 " " what); next
    }
    /Compiling entry function/ { n = split($0, part, "\047"); if (n >= 3) kernel = part[2]; next }
    /bytes stack frame/ { props = $0; sub(/^[ \t]+/, "", props); next }
    /Used [0-9]+ registers/ {
      match($0, /Used [0-9]+ registers/)
      name = kernel
      if (kernel != "") { cmd = "c++filt " kernel; if ((cmd | getline demangled) > 0) name = demangled; close(cmd) }
      show("    ptxas: " substr($0, RSTART + 5, RLENGTH - 5) ", " props ": " substr(name, 1, 120)); next
    }
    /ptxas (warning|error)|[1-9][0-9]* bytes spill|error:|Successfully installed/ { sub(/^ +/, ""); show($0) }
  '
}

mkdir -p build
log=build/setup.log
echo "building jax_flashmla (full log: $log)"
if ! python3 -m pip install -v --no-build-isolation ".[test,examples]" 2>&1 | tee "$log" | progress; then
  echo "setup.sh: pip install failed; the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
echo "installed in $((SECONDS - start)) s"
cd / && python3 -c "import jax_flashmla as j; print('jax_flashmla', j.__version__, '| decode path on', __import__('jax').default_backend(), '->', j.kernel_path())"
