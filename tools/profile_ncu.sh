#!/usr/bin/env bash
# Nsight Compute on the decode kernel, for the GPU machine: one memory-bound and one compute-bound
# case of the standard matrix (benchmarks/quick_check.py's timing cases), one decode launch each,
# with the sections that say where the time goes (throughput vs peak, memory traffic, tensor-pipe
# use, warp stall reasons). Text reports in $OUT/ncu_<h_q>_<s_q>.txt.
#
#   bash tools/profile_ncu.sh [H_Q,S_Q ...]     (default: 16,1 128,2; the package must be installed,
#                                                   e.g. by `bash tools/device_check.sh build`)
#   NCU_ARGS: extra ncu arguments (e.g. "--set full").
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/device_out}
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
if [ -z "$NCU" ]; then
  echo "profile_ncu.sh: ncu not found (PATH or /usr/local/cuda/bin)"
  exit 1
fi
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(16,1 128,2)
status=0
for c in "${cases[@]}"; do
  report="$OUT/ncu_${c/,/_}.txt"
  # --iters 1: one warm-up and one timed call; the first decode launch is profiled.
  (cd /tmp && "$NCU" --target-processes all --kernel-name regex:decode_kernel --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
      --section InstructionStats --section SourceCounters ${NCU_ARGS:-} \
      python3 "$REPO/benchmarks/quick_check.py" --time-only --iters 1 --case "$c") >"$report" 2>&1 || status=1
  echo "== $c: $report"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per Thread|Stall|Issued Warp|No Eligible" \
    "$report" | head -n 20
done
exit $status
