#!/usr/bin/env bash
# One command for a GPU machine (run from anywhere; it works in the repository root):
# build and install the package, run the GPU tests, run the benchmark; logs and results in $OUT.
#
#   bash tools/device_check.sh [build] [test] [bench] [prefill] [quick] [sanitize] [mesh] [all] [-- PYTEST_ARGS...]
#
#   no step named = all (build, test, bench). quick runs benchmarks/quick_check.py (nine correctness
#   cases, then three wall-clock timings) in a process of its own under a timeout.
#   sanitize runs quick_check.py's correctness cases under compute-sanitizer (memcheck, synccheck,
#   racecheck; decode kernel only) once per tool: out-of-bounds accesses, misused barriers and
#   shared-memory races that a passing test can hide. XLA's command buffers and GEMM autotuning are
#   off there (see do_sanitize). Racecheck's reports on this kernel: docs/kernel.md, "Verification".
#   prefill runs benchmarks/bench_prefill.py (the sparse prefill's forward and backward; with
#   PREFILL_ARGS=--flashmla and a FlashMLA build on PYTHONPATH, FlashMLA's forward side by side) under
#   PREFILL_TIMEOUT.
#   mesh runs the sharding and transformation tests (test_sharding.py, test_transforms.py) on this
#   machine's GPUs: data- and head-parallel decode on real meshes against the reference, with the
#   no-all-gather checks on the HLO. Each test skips when it needs more devices than there are, so
#   a 2-GPU machine runs the 1-D meshes of 2 and a 1-GPU machine only the single-device ones.
#   test, bench, prefill, quick, sanitize and mesh build first when the installed package
#   is missing or lacks the CUDA kernels (a fresh machine). Arguments after `--` go to pytest
#   (e.g. -- -x -k heavy). Environment:
#     BENCH_ARGS   extra benchmark arguments, e.g. BENCH_ARGS="--cases s_k=4096 --mode matrix"
#     PREFILL_ARGS extra arguments of the prefill step, e.g. PREFILL_ARGS="--flashmla --suite v32"
#     PREFILL_TIMEOUT seconds the prefill step may run (default 540)
#     BUILD_ARGS   extra pip arguments (default: -C cmake.define.JAX_FLASHMLA_CUDA=ON)
#     ANCHORS      FlashMLA's figures (markdown; tools/flashmla_anchors.py) to set beside the bench's
#     OUT          where logs go (default /tmp/jax_flashmla_device_out)
#     TEST_TIMEOUT seconds the GPU tests (and, separately, the mesh tests) may run (default 540)
#     QUICK_TIMEOUT seconds the quick step may run (default 180)
#     SANITIZE_TOOLS the sanitize step's tools (default: "memcheck synccheck racecheck"), each run
#                  stopped after SANITIZE_TIMEOUT seconds (default 240)
#
# Time on an H100 (2026-11-25): the build takes about 25 s; with XLA's GEMM autotuning off the 67
# test_matches_reference cases took 104 s.
#
# Files in $OUT: env.txt, build.log (full pip/CMake/ptxas log), ptxas.txt (register and spill report
# per kernel), gpu_tests.log, bench.log, bench.json, prefill.log, prefill.json, clocks.csv (SM clock and power during the bench,
# every 200 ms), quick.log, sanitize_<tool>.log, mesh_tests.log. The last lines printed
# are short summaries.
set -uo pipefail
[ -n "${ANCHORS:-}" ] && ANCHORS=$(realpath -m "$ANCHORS")  # relative to where the script was started
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-${TMPDIR:-/tmp}/jax_flashmla_device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

steps=()
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    build|test|bench|prefill|quick|sanitize|mesh) steps+=("$1") ;;
    all) steps+=(build test bench) ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (steps: build test bench prefill quick sanitize mesh all; pytest args after --)"; exit 2 ;;
  esac
  shift
done
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)
want() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

declare -A rc dur
SECONDS=0

# ---- environment -----------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed paths"
  # A copy of the tree can carry an older .git than its files, so the line above may name an old
  # commit; this hash of the sources (compare with the same command locally) names the tree built.
  echo "sources: $(cat $(find csrc CMakeLists.txt -type f | LC_ALL=C sort) | sha256sum | cut -c1-12) (sha256 of csrc/ and CMakeLists.txt)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || true
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
  python3 -c "import sys, jax; print('python', sys.version.split()[0], '| jax', jax.__version__, '| devices', jax.devices())" 2>&1
} | tee "$OUT/env.txt"

installed_ok() {  # the installed package (not the source folder) imports and carries the CUDA kernels
  (cd /tmp && python3 -c "import jax_flashmla as j, sys; sys.exit(0 if j.kernel_path() == 'cuda-sm90' else 1)") >/dev/null 2>&1
}

# ---- build -----------------------------------------------------------------------------------------
do_build() {
  local t0=$SECONDS
  echo; echo "==== build ===="
  # shellcheck disable=SC2086
  python3 -m pip install --no-build-isolation --no-deps -v ${BUILD_ARGS:--C cmake.define.JAX_FLASHMLA_CUDA=ON} . \
    >"$OUT/build.log" 2>&1
  rc[build]=$?
  bash tools/ptxas_report.sh "$OUT/build.log" >"$OUT/ptxas.txt"
  if [ "${rc[build]}" -ne 0 ]; then
    echo "build FAILED (rc=${rc[build]}); end of build.log:"
    grep -nE "error|Error|FAILED" "$OUT/build.log" | head -20
    tail -n 30 "$OUT/build.log"
  fi
  (cd /tmp && python3 -c "import jax_flashmla as j; print('installed:', j.__file__, '| kernel_path:', j.kernel_path())") 2>&1 | tail -n 3
  dur[build]=$((SECONDS - t0))
}

ensure_built() {
  if ! want build && [ -z "${rc[build]+x}" ] && ! installed_ok; then
    echo "(package not installed with CUDA kernels here: building first)"
    do_build
  fi
}

# ---- tests -----------------------------------------------------------------------------------------
# run_pytest LOG PYTEST_ARGS...: pytest from tests/, so the installed package, not the source folder,
# is imported. -v names each test as it starts, so a kernel that hangs shows which case; TEST_TIMEOUT
# (seconds) stops it before any outer time limit, so the summary below still prints.
# Every case compiles the reference for new shapes; XLA's GEMM autotuning (seconds per shape, and
# nothing the comparison needs) is switched off unless XLA_FLAGS already sets it.
run_pytest() {
  local log=$1; shift
  local xla_flags="${XLA_FLAGS:-}"
  [[ "$xla_flags" == *xla_gpu_autotune_level* ]] || xla_flags="$xla_flags --xla_gpu_autotune_level=0"
  (cd tests && XLA_FLAGS="$xla_flags" timeout -k 10 "${TEST_TIMEOUT:-540}" python3 -m pytest -v -p no:cacheprovider \
     -rfEs "$@" "${pytest_args[@]}") >"$OUT/$log" 2>&1
}

do_test() {
  local t0=$SECONDS
  echo; echo "==== test ===="
  ensure_built
  run_pytest gpu_tests.log -m gpu test_gpu_decode.py test_gpu_sparse_decode.py test_gpu_sparse_prefill.py \
    test_gpu_sparse_prefill_bwd.py test_gpu_indexer.py --durations=8
  rc[test]=$?
  [ "${rc[test]}" = 124 ] && echo "pytest stopped by TEST_TIMEOUT=${TEST_TIMEOUT:-540} s (a hang, or too many cases for one call)"
  dur[test]=$((SECONDS - t0))
  echo "pytest rc=${rc[test]} (${dur[test]} s); log: gpu_tests.log"
}

# ---- sharding and transformations on this machine's GPUs ------------------------------------------
do_mesh() {
  local t0=$SECONDS
  echo; echo "==== mesh ===="
  ensure_built
  run_pytest mesh_tests.log test_sharding.py test_transforms.py
  rc[mesh]=$?
  dur[mesh]=$((SECONDS - t0))
  echo "mesh pytest rc=${rc[mesh]} (${dur[mesh]} s) on $(nvidia-smi -L 2>/dev/null | wc -l) GPU(s); log: mesh_tests.log"
}

# ---- benchmark -------------------------------------------------------------------------------------
do_bench() {
  local t0=$SECONDS
  echo; echo "==== bench ===="
  ensure_built
  local smi_pid=""
  # The SM clock and power beside the run, every 200 ms: sustained (queued) runs may lower the clock,
  # which the queued columns would otherwise show as overhead.
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 200 \
      >"$OUT/clocks.csv" 2>&1 &
    smi_pid=$!
  fi
  # shellcheck disable=SC2086
  (cd /tmp && python3 "$REPO/benchmarks/bench_decode.py" --json "$OUT/bench.json" --markdown \
     ${BENCH_ARGS:-}) >"$OUT/bench.log" 2>&1
  rc[bench]=$?
  [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null
  if [ -n "${ANCHORS:-}" ] && [ -f "$OUT/bench.json" ]; then
    python3 tools/flashmla_anchors.py "$ANCHORS" "$OUT/bench.json" >>"$OUT/bench.log" 2>&1
  fi
  dur[bench]=$((SECONDS - t0))
  echo "bench rc=${rc[bench]} (${dur[bench]} s); log: bench.log, results: bench.json"
}

# ---- sparse prefill benchmark --------------------------------------------------------------------
do_prefill() {
  local t0=$SECONDS
  echo; echo "==== prefill ===="
  ensure_built
  # shellcheck disable=SC2086
  (cd /tmp && timeout -k 10 "${PREFILL_TIMEOUT:-540}" python3 "$REPO/benchmarks/bench_prefill.py" \
     --json "$OUT/prefill.json" --markdown ${PREFILL_ARGS:-}) >"$OUT/prefill.log" 2>&1
  rc[prefill]=$?
  dur[prefill]=$((SECONDS - t0))
  echo "prefill rc=${rc[prefill]}$([ "${rc[prefill]}" = 124 ] && echo ' (timed out)') (${dur[prefill]} s); log: prefill.log, results: prefill.json"
}

# ---- quick check ----------------------------------------------------------------------------------
do_quick() {
  local t0=$SECONDS
  echo; echo "==== quick ===="
  ensure_built
  (cd /tmp && timeout -k 10 "${QUICK_TIMEOUT:-180}" python3 "$REPO/benchmarks/quick_check.py") >"$OUT/quick.log" 2>&1
  rc[quick]=$?
  dur[quick]=$((SECONDS - t0))
  echo "quick rc=${rc[quick]}$([ "${rc[quick]}" = 124 ] && echo ' (timed out: a hang?)') (${dur[quick]} s); log: quick.log"
}

# ---- compute-sanitizer ----------------------------------------------------------------------------
do_sanitize() {
  local t0=$SECONDS tool r log
  echo; echo "==== sanitize ===="
  ensure_built
  rc[sanitize]=0
  for tool in ${SANITIZE_TOOLS:-memcheck synccheck racecheck}; do
    log="$OUT/sanitize_$tool.log"
    # Command buffers (CUDA graphs) and GEMM autotuning off: with them on, the memcheck process
    # itself segfaulted 15 s in (2026-11-25); with them off all three tools run to the end.
    (cd /tmp && XLA_PYTHON_CLIENT_PREALLOCATE=false \
       XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer=" \
       timeout -k 10 "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --kernel-name kns=decode_kernel \
       --error-exitcode 9 python3 "$REPO/benchmarks/quick_check.py" --check-only) >"$log" 2>&1
    r=$?
    [ $r -ne 0 ] && rc[sanitize]=$r
    echo "sanitize $tool: rc=$r$([ $r = 9 ] && echo ' (errors reported)')$([ $r = 124 ] && echo ' (timed out)') ($((SECONDS - t0)) s); $(grep -m 1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log")"
  done
  dur[sanitize]=$((SECONDS - t0))
}

want build && do_build
want test && do_test
want bench && do_bench
want prefill && do_prefill
want quick && do_quick
want sanitize && do_sanitize
want mesh && do_mesh

# ---- summaries (the device reply shows only the end of the output) --------------------------------
echo
echo "================================ summary ================================"
head -n 5 "$OUT/env.txt"
if [ -n "${rc[build]+x}" ]; then
  echo "-- build: rc=${rc[build]} (${dur[build]} s). ptxas (registers | stack/spills | kernel):"
  head -n 24 "$OUT/ptxas.txt"
  n=$(wc -l <"$OUT/ptxas.txt"); [ "$n" -gt 24 ] && echo "   ... $n lines in ptxas.txt"
fi
if [ -n "${rc[test]+x}" ]; then
  echo "-- test: rc=${rc[test]} (${dur[test]} s)"
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-200 | head -n 25
  grep -m 1 -E "^SKIPPED" "$OUT/gpu_tests.log" | cut -c1-200
  sed -n '/slowest/,/^$/p' "$OUT/gpu_tests.log" | grep -E "^[0-9.]+s " | head -n 5
  tail -n 1 "$OUT/gpu_tests.log"
fi
if [ -n "${rc[mesh]+x}" ]; then
  echo "-- mesh: rc=${rc[mesh]} (${dur[mesh]} s)"
  grep -E "^(FAILED|ERROR)" "$OUT/mesh_tests.log" | cut -c1-200 | head -n 25
  grep -E "^SKIPPED" "$OUT/mesh_tests.log" | cut -c1-200 | head -n 5
  tail -n 1 "$OUT/mesh_tests.log"
fi
if [ -n "${rc[bench]+x}" ]; then
  echo "-- bench: rc=${rc[bench]} (${dur[bench]} s)"
  if [ -s "$OUT/clocks.csv" ]; then  # "timestamp, 1980 MHz, 350.12 W, 45" per sample
    pmax=$(awk -F', ' '$3 ~ / W$/ { w = $3 + 0; if (w > m) m = w } END { printf "%.0f", m }' "$OUT/clocks.csv")
    awk -F', ' '$2 ~ / MHz$/ { print $2 + 0 }' "$OUT/clocks.csv" | sort -n | awk -v pmax="$pmax" '
      { c[NR] = $1 } END { if (NR) printf "   SM clock over %d samples (clocks.csv): min %d, median %d, max %d MHz; power max %s W\n",
        NR, c[1], c[int((NR + 1) / 2)], c[NR], pmax }'
  fi
  grep -E "^  (copy|matmul):|^NOTE|no GPU plane|\[trace\].*(no |unavailable|iterations)" "$OUT/bench.log" | cut -c1-200 | head -n 10
  if grep -q "^Device: " "$OUT/bench.log"; then
    sed -n '/^Device: /,$p' "$OUT/bench.log"
  else
    tail -n 30 "$OUT/bench.log"
  fi
fi
if [ -n "${rc[prefill]+x}" ]; then
  echo "-- prefill: rc=${rc[prefill]} (${dur[prefill]} s)"
  grep -E "^NOTE|_error: " "$OUT/prefill.log" | cut -c1-200 | head -n 5
  if grep -q "^Device: " "$OUT/prefill.log"; then
    sed -n '/^Device: /,$p' "$OUT/prefill.log"
  else
    tail -n 30 "$OUT/prefill.log"
  fi
fi
if [ -n "${rc[quick]+x}" ]; then
  echo "-- quick: rc=${rc[quick]} (${dur[quick]} s)"
  tail -n 5 "$OUT/quick.log" | sed 's/^/   /'
fi
if [ -n "${rc[sanitize]+x}" ]; then
  echo "-- sanitize: rc=${rc[sanitize]} (${dur[sanitize]} s)"
  for log in "$OUT"/sanitize_*.log; do
    [ -e "$log" ] || continue
    echo "   $(basename "$log"): $(grep -m 1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" || echo 'no summary line')"
  done
fi
echo "total ${SECONDS} s"
status=0
for s in "${!rc[@]}"; do [ "${rc[$s]}" -ne 0 ] && status=1; done
exit $status
