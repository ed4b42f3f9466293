#!/usr/bin/env bash
# This tree against an older one, in one GPU command of at most 9 minutes: both are built, then the
# standard matrix is timed with this tree's benchmarks/bench_decode.py, the two builds' runs
# interleaved (old new new old). The GPU suite takes about 2 minutes more than fits beside the
# matrix: run it as a command of its own (bash tools/device_check.sh build test), or name a subset
# with PYTEST_K.
# $OUT/ab_summary.md has ptxas registers and spills of both, and per row old ms / new ms (> 1: this
# tree is faster) with the geomean and the slowest row.
#
#   OLD=git:REF bash tools/ab_trees.sh        # REF: any git ref of this repository (needs .git)
#   OLD=dir:PATH bash tools/ab_trees.sh       # or a source tree in a folder (e.g. `git archive` unpacked)
#
# Environment: OLD (required); BENCH_ARGS (default: the whole matrix, --no-ref --iters 30); REPS
# (default 2); PYTEST_K (default "": no tests; e.g. "heavy" runs those of test_gpu_decode.py on this
# tree's build); any tools/ab_variants.sh setting.
set -uo pipefail
if [ -z "${OLD:-}" ]; then
  echo "ab_trees.sh: set OLD=git:REF or OLD=dir:PATH (the tree to compare this one with)"
  exit 2
fi
export VARIANTS="old=$OLD new=tree" AB_REF=old
export CHECK_VARIANTS=${CHECK_VARIANTS-new} SKIP_QUICK=${SKIP_QUICK-1} PYTEST_K=${PYTEST_K-}
export BENCH_ARGS=${BENCH_ARGS:---no-ref --iters 30} BENCH_ORDER=${BENCH_ORDER:-abba} REPS=${REPS:-2}
export BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-170}
exec bash "$(dirname "$0")/ab_variants.sh"
