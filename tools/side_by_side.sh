#!/usr/bin/env bash
# One GPU visit's comparisons with FlashMLA, in one command: FlashMLA's SM90 kernels are built in the
# background (tools/flashmla_build.sh) while this package builds, then the named benchmarks run with
# --flashmla on the same inputs in one process. Nothing of FlashMLA enters this repository.
#
#   bash tools/side_by_side.sh [decode] [sparse] [prefill] [pdl] [seesaw] [pproducer] [tests]   # default: decode
#
#   decode   bench_decode.py --no-ref --flashmla over the standard matrix (the dense decode, #31's table)
#   sparse   bench_sparse.py --flashmla --suite v32 (SPARSE_ARGS adds options, e.g. --cases s_q=2)
#   prefill  bench_prefill.py --flashmla --no-bwd --suite v32,v4 --cases s_kv=8192 (PREFILL_ARGS)
#   pdl      A/B of the dense decode launched as a programmatic dependent (JAX_FLASHMLA_DECODE_PDL=1)
#            against the default build, both beside FlashMLA: tools/ab_variants.sh with the field
#            ours_wall_ms (the side by side's wall clock of our call); summary in $OUT/ab/ab_summary.md
#   seesaw   the seesaw sparse FP8 decode, warpgroup fills (JAX_FLASHMLA_SPARSE_DECODE_SEESAW=1,
#            variant "seesaw") and producer warpgroup (=2, variant "producer"): each build runs
#            SEESAW_TESTS (default test_gpu_sparse_decode.py) first (the A/B's check), then
#            bench_sparse.py --flashmla (SEESAW_ARGS, default "--suite v32 --iters 20") times the
#            three builds beside FlashMLA; summary in $OUT/ab_seesaw/ab_summary.md (ours_wall_ms)
#   pproducer the sparse prefill with a producer warpgroup (JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER=1):
#            its build runs test_gpu_sparse_prefill.py first, then bench_prefill.py --flashmla --no-bwd
#            (PPRODUCER_ARGS, default "--suite v32,v4 --cases s_kv=8192 --iters 5") times both builds
#            beside FlashMLA; summary in $OUT/ab_pproducer/ab_summary.md (fwd_ms)
#   tests    the GPU test files named by TEST_FILES on this build (default: test_gpu_decode.py,
#            test_gpu_sparse_prefill.py, whose kernel runs the schedule the seesaw shares, and
#            test_gpu_indexer.py)
#
# Environment:
#   FLASHMLA_SRC  FlashMLA's source (a `git archive` of deepseek-ai/FlashMLA) in an ignored folder or
#                 outside the checkout; default .whl/flashmla. The nvidia-cutlass wheel as
#                 tools/flashmla_build.sh says (default: .whl/ of this repository)
#   OUT           logs and JSON (default /tmp/side_by_side_out)
#   DECODE_ARGS   extra bench_decode.py arguments (default "--iters 20")
#   TIME_LIMIT    seconds after which no further step starts (default 560)
#
# Time on a 16-core GPU machine: the FlashMLA build runs beside this package's (both compile all
# their SM90 instances); the decode table takes about 2 minutes once both are built.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-${TMPDIR:-/tmp}/side_by_side_out}
FLASHMLA_SRC=$(realpath -m "${FLASHMLA_SRC:-$REPO/.whl/flashmla}")
LIMIT=${TIME_LIMIT:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
SECONDS=0

steps=()
for a in "$@"; do
  case "$a" in
    decode|sparse|prefill|pdl|seesaw|pproducer|tests) steps+=("$a") ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
    *) echo "side_by_side.sh: unknown step '$a' (decode sparse prefill pdl seesaw pproducer tests)"; exit 2 ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=(decode)
want() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
left() { echo $((LIMIT - SECONDS)); }
log() { echo "[side_by_side $(printf '%3d' $SECONDS)s] $*"; }

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"

# ---- builds: FlashMLA in the background, this package (or the A/B's two builds) meanwhile ---------
(bash tools/flashmla_build.sh "$FLASHMLA_SRC" >"$OUT/flashmla_build.log" 2>&1; echo "rc $?" >"$OUT/flashmla_build.rc") &
fm_pid=$!
# The A/B variants: a folder of tools/variants (git-ignored) holding the build option.
variant() { mkdir -p "$REPO/tools/variants/$1" && echo "$2" >"$REPO/tools/variants/$1/cmake.txt"; }
want pdl && variant pdl JAX_FLASHMLA_DECODE_PDL=1
want seesaw && variant seesaw JAX_FLASHMLA_SPARSE_DECODE_SEESAW=1
want seesaw && variant producer JAX_FLASHMLA_SPARSE_DECODE_SEESAW=2
want pproducer && variant pproducer JAX_FLASHMLA_SPARSE_PREFILL_PRODUCER=1
ab_variants=()
want pdl && ab_variants+=(pdl)
want seesaw && ab_variants+=(seesaw producer)
want pproducer && ab_variants+=(pproducer)
if [ ${#ab_variants[@]} -gt 0 ]; then
  # REPS=0: build the variants only (in parallel); the timed runs follow once FlashMLA is built.
  VARIANTS="base ${ab_variants[*]}" REPS=0 OUT=$OUT/ab_build bash tools/ab_variants.sh >"$OUT/ab_build.log" 2>&1
  grep -E "registers|FAILED|error" "$OUT/ab_build.log" | head -n 12
fi
if want decode || want sparse || want prefill || want tests; then
  OUT=$OUT/device bash tools/device_check.sh build 2>&1 | tail -n 3
fi
wait "$fm_pid"
log "FlashMLA build: $(cat "$OUT/flashmla_build.rc")"; tail -n 3 "$OUT/flashmla_build.log"
# shellcheck disable=SC1091
[ -f "${TMPDIR:-/tmp}/flashmla_build/env.sh" ] && . "${TMPDIR:-/tmp}/flashmla_build/env.sh"

run_bench() {  # NAME SCRIPT ARGS...: from an empty folder, so the installed package is imported
  local name=$1 script=$2; shift 2
  if [ "$(left)" -lt 30 ]; then log "$name: not started (time limit)"; return; fi
  log "$name"
  (cd "$(mktemp -d)" && timeout "$(left)" python3 "$REPO/$script" "$@" --json "$OUT/$name.json" --markdown \
    >"$OUT/$name.log" 2>&1; echo "rc $?" >>"$OUT/$name.log")
  sed -n '/FlashMLA\/ours/,$p' "$OUT/$name.log" | head -n 8
  tail -n 2 "$OUT/$name.log"
}
# shellcheck disable=SC2086
want decode && run_bench decode benchmarks/bench_decode.py --no-ref --flashmla ${DECODE_ARGS:---iters 20}
# shellcheck disable=SC2086
want sparse && run_bench sparse benchmarks/bench_sparse.py --flashmla --suite v32 ${SPARSE_ARGS:-}
# shellcheck disable=SC2086
want prefill && run_bench prefill benchmarks/bench_prefill.py --flashmla --no-bwd ${PREFILL_ARGS:---suite v32,v4 --cases s_kv=8192}
if want pdl && [ "$(left)" -gt 60 ]; then
  log "A/B pdl against base"
  VARIANTS="base pdl" AB_REF=base SKIP_QUICK=1 REPS=2 BENCH_ORDER=abba AB_FIELD=ours_wall_ms \
    BENCH_ARGS="--no-ref --flashmla --iters 10 ${PDL_CASES:+--cases $PDL_CASES}" \
    AB_BUDGET_S=$(($(left) - 20)) AB_HARD_S=$(left) OUT=$OUT/ab bash tools/ab_variants.sh >"$OUT/ab.log" 2>&1
  head -n 40 "$OUT/ab/ab_summary.md"
fi
if want seesaw && [ "$(left)" -gt 60 ]; then
  log "A/B seesaw and producer against base (their GPU tests first)"
  VARIANTS="base seesaw producer" AB_REF=base CHECK_VARIANTS="seesaw producer" SKIP_QUICK=1 \
    PYTEST_FILE="${SEESAW_TESTS:-test_gpu_sparse_decode.py}" \
    PYTEST_K="not nothing" PYTEST_ARGS="--maxfail=10" PYTEST_TIMEOUT=300 REPS=1 AB_FIELD=ours_wall_ms AB_BENCH=benchmarks/bench_sparse.py \
    BENCH_ARGS="--flashmla ${SEESAW_ARGS:---suite v32 --iters 20}" \
    AB_BUDGET_S=$(($(left) - 20)) AB_HARD_S=$(left) OUT=$OUT/ab_seesaw bash tools/ab_variants.sh >"$OUT/ab_seesaw.log" 2>&1
  head -n 40 "$OUT/ab_seesaw/ab_summary.md"
fi
if want pproducer && [ "$(left)" -gt 60 ]; then
  log "A/B pproducer against base (its GPU tests first)"
  VARIANTS="base pproducer" AB_REF=base CHECK_VARIANTS=pproducer SKIP_QUICK=1 PYTEST_FILE=test_gpu_sparse_prefill.py \
    PYTEST_K="not nothing" PYTEST_ARGS="--maxfail=10" PYTEST_TIMEOUT=200 REPS=1 AB_FIELD=fwd_ms \
    AB_BENCH=benchmarks/bench_prefill.py \
    BENCH_ARGS="--flashmla --no-bwd ${PPRODUCER_ARGS:---suite v32,v4 --cases s_kv=8192 --iters 5}" \
    AB_BUDGET_S=$(($(left) - 20)) AB_HARD_S=$(left) OUT=$OUT/ab_pproducer bash tools/ab_variants.sh >"$OUT/ab_pproducer.log" 2>&1
  head -n 40 "$OUT/ab_pproducer/ab_summary.md"
fi
if want tests && [ "$(left)" -gt 30 ]; then
  test_files=${TEST_FILES:-test_gpu_decode.py test_gpu_sparse_prefill.py test_gpu_indexer.py}
  log "GPU tests: $test_files"
  # shellcheck disable=SC2086
  (cd tests && XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "$(left)" python3 -m pytest -q -m gpu -rfE \
    $test_files >"$OUT/tests.log" 2>&1; tail -n 4 "$OUT/tests.log")
fi
log "done; logs in $OUT"
