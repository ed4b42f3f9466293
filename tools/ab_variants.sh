#!/usr/bin/env bash
# A/B benchmark of builds of this package on one GPU machine, in one command: each variant is built,
# optionally checked, and timed with the same harness (this tree's benchmarks/bench_decode.py, or
# AB_BENCH),
# the variants' runs interleaved; per-row ratios and their geomean go to $OUT/ab_summary.md.
#
#   VARIANTS="old=git:v0.1 base" AB_REF=old bash tools/ab_variants.sh      # a git ref against this tree
#   VARIANTS="base v1 v2" CHECK_VARIANTS="v1 v2" bash tools/ab_variants.sh  # overlays on this tree
#   mkdir -p tools/variants/nopipe && echo JAX_FLASHMLA_SPARSE_DECODE_PIPELINE=0 >tools/variants/nopipe/cmake.txt
#   VARIANTS="base nopipe" AB_BENCH=benchmarks/bench_sparse.py bash tools/ab_variants.sh  # a build option
#   (tools/ab_trees.sh is the first form with defaults that fit a 9-minute call.)
#
# A variant is a word of VARIANTS:
#   base            this tree as it is (tracked and untracked-but-not-ignored files)
#   NAME=tree       this tree as it is, under another name
#   NAME=git:REF    the tree of git ref REF of this repository (`git archive`; needs .git)
#   NAME=dir:PATH   the tree in folder PATH (e.g. an unpacked `git archive`)
#   NAME            this tree plus the overlays in $AB_VARIANTS_DIR/NAME/: cuda/ -> csrc/cuda/,
#                   common/ -> csrc/common/, py/ -> jax_flashmla/, tree/ -> repository root (relative
#                   paths kept), and delete.txt (optional): paths relative to the root, one a line,
#                   removed from the copy. A loose source file directly in $AB_VARIANTS_DIR/NAME/
#                   (*.cu *.cuh *.h *.hpp *.cc *.py) replaces the one file of that name under csrc/ or
#                   jax_flashmla/ (ignored, with a warning, when the name is not unique). cmake.txt
#                   (optional): NAME=VALUE lines, each passed to the variant's build as
#                   -C cmake.define.NAME=VALUE (e.g. JAX_FLASHMLA_SPARSE_DECODE_PIPELINE=0); a folder
#                   may hold only that file.
#
# Steps: 1. copy each variant to /tmp/ab/src_N and build them all in parallel with
#   `pip install --target /tmp/ab/site_N` (skipped when /tmp/ab/site_N holds a build of the same
#   source hash: a warm machine); ptxas registers/spills per kernel go into the summary.
#   2. correctness: the variant's benchmarks/quick_check.py --check-only per CHECK_VARIANTS (+ its
#   GPU pytest subset PYTEST_K); a failing variant is still benchmarked, marked FAILED.
#   3. $AB_BENCH $BENCH_ARGS, REPS times over all variants (interleaved), nvidia-smi clocks
#   logged beside it. 4. $OUT/ab_summary.md (also printed at the end) and $OUT/ab_logs.tgz.
# Every python runs from an empty directory with PYTHONPATH=/tmp/ab/site_N, so the variant's build,
# not the source folder or a pip-installed copy, is imported (checked: jax_flashmla.__file__).
#
# Environment:
#   VARIANTS        default "base"
#   AB_REF          the variant the others are compared with (default base, else the first built)
#   CHECK_VARIANTS  default "" (none)
#   SKIP_QUICK      1: skip quick_check.py in the check step (only the pytest subset runs)
#   AB_VARIANTS_DIR where the overlays are (default tools/variants, git-ignored)
#   PYTEST_K        pytest -k expression for $PYTEST_FILE (default: no pytest)
#   PYTEST_FILE     the GPU test files of the check step, space-separated (default test_gpu_decode.py)
#   PYTEST_ARGS     more pytest arguments of the check step (default -x: stop at the first failure)
#   AB_BENCH        the timing script (default benchmarks/bench_decode.py; benchmarks/bench_sparse.py
#                   times the sparse decode, its rows keyed by format, s_k, topk, h_q, s_q)
#   PYTEST_TIMEOUT  default 200;  CHECK_TIMEOUT default 150;  BUILD_TIMEOUT default 300
#   BENCH_ARGS      default "--no-ref --cases s_k=4096/8192 --iters 30" (bench_sparse.py: "--suite v32 --iters 30")
#   BENCH_TIMEOUT   per bench run, default 240
#   REPS            default 2;  BENCH_ORDER: same (default: v1 v2 v1 v2) or abba (v1 v2 v2 v1)
#   AB_BUDGET_S     no new step starts after this many seconds (default 540); a bench run is not
#                   started either when the previous run's duration would carry it past AB_HARD_S
#   AB_HARD_S       every timeout is capped so that the script ends by then (default 585)
#   AB_FIELD        the record field compared (default kernel_ms, the profiler span)
#   AB_FORCE_BUILD  1: rebuild even when the source hash matches
#   AB_DRY_RUN      1: prepare the sources, print each variant's build options, and stop
#   AB_DIR          the scratch folder (default /tmp/ab)
#   OUT             default /tmp/ab_out
set -uo pipefail
SECONDS=0
cd "$(dirname "$0")/.."
REPO=$PWD
EXP=${AB_VARIANTS_DIR:-$REPO/tools/variants}
OUT=${OUT:-/tmp/ab_out}
AB=${AB_DIR:-/tmp/ab}
W=$AB/run                       # this call's logs, results and state (fresh every call)
CWD=$AB/cwd                     # an empty working directory for every python process
mkdir -p "$OUT" "$AB"
rm -rf "$W" "$CWD"
mkdir -p "$W/logs" "$W/json" "$CWD"
export PYTHONUNBUFFERED=1

VARIANTS=${VARIANTS:-base}
CHECK_VARIANTS=${CHECK_VARIANTS:-}
AB_BENCH=${AB_BENCH:-benchmarks/bench_decode.py}
case "$AB_BENCH" in
  *bench_sparse.py) BENCH_ARGS=${BENCH_ARGS:---suite v32 --iters 30} ;;
  *) BENCH_ARGS=${BENCH_ARGS:---no-ref --cases s_k=4096/8192 --iters 30} ;;
esac
PYTEST_FILE=${PYTEST_FILE:-test_gpu_decode.py}
REPS=${REPS:-2}
BUDGET=${AB_BUDGET_S:-540}
HARD=${AB_HARD_S:-585}
NPROC=$(nproc 2>/dev/null || echo 4)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$NPROC}

log() { echo "[ab $(printf '%3d' $SECONDS)s] $*" | tee -a "$W/logs/main.log"; }
st() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$W/status.tsv"; }   # variant, key, value
cap() {  # a timeout of at most $1 s that still ends 15 s before AB_HARD_S
  local t=$1 left=$((HARD - SECONDS - 15))
  [ "$left" -lt "$t" ] && t=$left
  [ "$t" -lt 5 ] && t=5
  echo "$t"
}
in_budget() { [ "$SECONDS" -lt "$BUDGET" ]; }
pyrun() {  # pyrun VARIANT CMD...: from the empty directory, with the variant's install first on the path
  local n=$1; shift
  (cd "$CWD" && PYTHONPATH="$AB/site_$n${PYTHONPATH:+:$PYTHONPATH}" "$@")
}
smi_pid=""
cleanup() { if [ -n "$smi_pid" ]; then kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null; smi_pid=""; fi; }
trap cleanup EXIT

finish() {  # summary + logs archive; safe to call more than once
  python3 "$REPO/tools/ab_summary.py" --dir "$W" --field "${AB_FIELD:-kernel_ms}" --ref "${AB_REF:-base}" \
    --elapsed "$SECONDS" --budget "$BUDGET" >"$W/ab_summary.md" 2>"$W/logs/ab_summary.err" \
    || { echo "ab_summary.py failed:"; cat "$W/logs/ab_summary.err"; } >>"$W/ab_summary.md"
  cp "$W/ab_summary.md" "$OUT/ab_summary.md"
  tar -czf "$OUT/ab_logs.tgz" -C "$AB" run 2>/dev/null
}

# ---- environment -------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "repo: $REPO  git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(git status --porcelain 2>/dev/null | wc -l) changed paths, maybe a stale .git)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || true
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
  echo "nproc: $NPROC  CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL"
  (cd "$CWD" && python3 -c "
import sys, importlib.util as u, jax
s = u.find_spec('jax_flashmla')
print('python', sys.version.split()[0], '| jax', jax.__version__, '| devices', jax.devices())
print('jax_flashmla without PYTHONPATH:', s.origin if s else 'not installed')") 2>&1
  echo "VARIANTS=$VARIANTS | AB_REF=${AB_REF:-base} | CHECK_VARIANTS=$CHECK_VARIANTS | PYTEST_K=${PYTEST_K:-} | REPS=$REPS | BENCH_ORDER=${BENCH_ORDER:-same}"
  echo "AB_BENCH=$AB_BENCH | BENCH_ARGS=$BENCH_ARGS | AB_BUDGET_S=$BUDGET | AB_HARD_S=$HARD"
} >"$W/env.txt" 2>&1
cat "$W/env.txt"

# ---- 1. sources: copy + overlays ----------------------------------------------------------------
list_tree() {  # NUL-separated files of the tree: tracked + untracked-not-ignored, those that exist
  if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z -co --exclude-standard |
      while IFS= read -r -d '' f; do
        case "$f" in tools/variants/*|shared/*) continue ;; esac
        [ -f "$f" ] && printf '%s\0' "$f"
      done
  else  # no git: everything but VCS, the overlays and build outputs
    find . -type f -not -path './.git/*' -not -path './tools/variants/*' -not -path './shared/*' \
      -not -path './build/*' -not -path './bazel-*' -not -name '*.so' -not -path '*/__pycache__/*' \
      -printf '%P\0'
  fi
}

srchash() {  # sha256 over the paths and contents of what the build reads
  (cd "$1" && find csrc jax_flashmla CMakeLists.txt pyproject.toml -type f -not -path '*/__pycache__/*' -print0 |
     LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

declare -a OK=()          # variants still in the race
declare -A HASH=()
declare -A DEFINES=()     # variant -> its build's -C cmake.define.NAME=VALUE arguments (cmake.txt)
prepare() {  # prepare N [SOURCE]: /tmp/ab/src_N = this tree + overlays, or SOURCE (tree, git:REF, dir:PATH)
  local n=$1 from=${2:-} src=$AB/src_$1 d=$EXP/$1 sub dst f lines nfiles=0
  rm -rf "$src"; mkdir -p "$src"
  case "$from" in
    git:*)
      if ! git -C "$REPO" archive --format=tar "${from#git:}" | tar -x -C "$src"; then
        log "$n: git archive ${from#git:} failed (no .git here, or no such ref): dropped; dir:PATH takes a folder"
        st "$n" build "DROPPED (git archive ${from#git:})"; return 1
      fi
      st "$n" overlay "$from ($(git -C "$REPO" rev-parse --short "${from#git:}" 2>/dev/null))" ;;
    dir:*)
      if [ ! -f "${from#dir:}/CMakeLists.txt" ]; then
        log "$n: ${from#dir:} holds no source tree (no CMakeLists.txt): dropped"; st "$n" build "DROPPED (no tree)"; return 1
      fi
      (cd "${from#dir:}" && find . -type f -not -path './.git/*' -not -path '*/__pycache__/*' -not -path './build/*' \
         -not -name '*.so' -print0 | xargs -0 -r cp --parents -t "$src")
      st "$n" overlay "$from" ;;
    *) list_tree | xargs -0 -r cp --parents -t "$src"
       [ "$from" = tree ] && st "$n" overlay "(this tree)" ;;
  esac
  if [ "$n" != base ] && [ -z "$from" ]; then
    if [ ! -d "$d" ]; then log "$n: no overlay folder $d: dropped"; st "$n" build "DROPPED (no $d)"; return 1; fi
    for sub in "$d"/*; do
      [ -e "$sub" ] || continue
      if [ -f "$sub" ]; then  # a loose file: replaces the one file of that name under csrc/ or jax_flashmla/
        case "$(basename "$sub")" in
          *.cu|*.cuh|*.h|*.hpp|*.cc|*.py)
            mapfile -t hits < <(cd "$src" && find csrc jax_flashmla -type f -name "$(basename "$sub")")
            if [ ${#hits[@]} -eq 1 ]; then
              if cmp -s "$sub" "$src/${hits[0]}"; then echo "  same    ${hits[0]} (loose file, identical to base: no-op)"
              else echo "  replace ${hits[0]} (loose file $(basename "$sub"))"; fi >>"$W/logs/overlay_$n.txt"
              cp "$sub" "$src/${hits[0]}"; nfiles=$((nfiles + 1))
            else
              log "$n: WARNING: loose file $(basename "$sub") matches ${#hits[@]} files under csrc/ jax_flashmla/: ignored (put it in cuda/ common/ py/ tree/)"
              st "$n" warn "ignored loose $(basename "$sub")"
            fi ;;
        esac
        continue
      fi
      case "$(basename "$sub")" in
        cuda) dst=csrc/cuda ;; common) dst=csrc/common ;; py) dst=jax_flashmla ;; tree) dst=. ;;
        delete.txt|*.md|*.txt|*.patch|*.diff|notes*) continue ;;
        *) log "$n: WARNING: $(basename "$sub") is not an overlay folder (cuda common py tree): ignored"
           st "$n" warn "ignored $(basename "$sub")"; continue ;;
      esac
      while IFS= read -r -d '' f; do
        local rel=$dst/$f; rel=${rel#./}
        if [ ! -e "$src/$rel" ]; then echo "  add     $rel"
        elif cmp -s "$sub/$f" "$src/$rel"; then echo "  same    $rel (identical to base: no-op)"
        else echo "  replace $rel"; fi
        mkdir -p "$(dirname "$src/$rel")"
        cp "$sub/$f" "$src/$rel"
        nfiles=$((nfiles + 1))
      done < <(cd "$sub" && find . -type f -not -path '*/__pycache__/*' -printf '%P\0') >>"$W/logs/overlay_$n.txt"
    done
    if [ -f "$d/delete.txt" ]; then
      while IFS= read -r f; do
        f=${f%%#*}; f=$(echo "$f" | xargs); [ -n "$f" ] || continue
        if [ -e "$src/$f" ]; then rm -rf "${src:?}/$f"; echo "  delete  $f"; else echo "  delete  $f (not there)"; fi
      done <"$d/delete.txt" >>"$W/logs/overlay_$n.txt"
    fi
    if [ -f "$d/cmake.txt" ]; then
      mapfile -t lines <"$d/cmake.txt"
      for f in "${lines[@]}"; do
        f=${f%%#*}; f=$(echo "$f" | xargs); [ -n "$f" ] || continue
        if [[ ! "$f" =~ ^[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.+-]*$ ]]; then
          log "$n: cmake.txt line '$f' is not NAME=VALUE: dropped"; st "$n" build "DROPPED (cmake.txt: $f)"; return 1
        fi
        DEFINES[$n]="${DEFINES[$n]:-} -C cmake.define.$f"
        echo "  define  $f" >>"$W/logs/overlay_$n.txt"; nfiles=$((nfiles + 1))
      done
    fi
    [ "$nfiles" -eq 0 ] && log "$n: WARNING: no overlay files in $d (same as base)"
  fi
  HASH[$n]=$(srchash "$src")
  # The build options are part of what is built: a changed cmake.txt rebuilds.
  [ -n "${DEFINES[$n]:-}" ] && HASH[$n]=$(echo "${HASH[$n]}${DEFINES[$n]}" | sha256sum | cut -c1-16)
  st "$n" hash "${HASH[$n]}"
  touch "$W/logs/overlay_$n.txt"
  [ -z "$from" ] && st "$n" overlay "$(grep -E '^  (add|replace|delete|define) ' "$W/logs/overlay_$n.txt" | awk '{print $1 " " $2}' | paste -sd ';' -)"
  log "$n: source $src hash ${HASH[$n]}"
  cat "$W/logs/overlay_$n.txt"
  return 0
}

seen=" "
for word in $VARIANTS; do
  n=${word%%=*} from=""
  [ "$n" != "$word" ] && from=${word#*=}
  if [[ ! "$n" =~ ^[A-Za-z0-9_.-]+$ ]]; then log "bad variant name '$n': dropped"; continue; fi
  case "$from" in ""|tree|git:?*|dir:?*) ;; *) log "$n: unknown source '$from' (tree, git:REF or dir:PATH): dropped"; continue ;; esac
  case "$seen" in *" $n "*) log "$n listed twice: once is enough"; continue ;; esac
  seen="$seen$n "
  echo "$n" >>"$W/variants.txt"
  prepare "$n" "$from" && OK+=("$n")
done

if [ "${AB_DRY_RUN:-0}" = 1 ]; then
  for n in "${OK[@]}"; do log "$n: would build $AB/src_$n with -C cmake.define.JAX_FLASHMLA_CUDA=ON${DEFINES[$n]:-}"; done
  exit 0
fi

# ---- 1b. builds, in parallel ----------------------------------------------------------------------
build_one() {  # runs in the background; writes $AB/site_N, its log, and rc to $W/build_N.rc
  local n=$1 site=$AB/site_$1 t0=$SECONDS rc
  rm -rf "$site" "$AB/build_$n"     # a fresh build dir: copied sources have new mtimes anyway
  timeout -k 10 "$(cap "${BUILD_TIMEOUT:-300}")" \
    python3 -m pip install --no-build-isolation --no-deps -v --disable-pip-version-check \
      --target "$site" -C cmake.define.JAX_FLASHMLA_CUDA=ON ${DEFINES[$n]:-} -C "build-dir=$AB/build_$n" "$AB/src_$n" \
      >"$AB/build_$n.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] && echo "${HASH[$n]}" >"$site/.ab_srchash"
  echo "$rc $((SECONDS - t0))" >"$W/build_$n.rc"
}

declare -A BPID=()
for n in "${OK[@]}"; do
  if [ "${AB_FORCE_BUILD:-0}" != 1 ] && [ -f "$AB/site_$n/.ab_srchash" ] && [ -f "$AB/build_$n.log" ] &&
     [ "$(cat "$AB/site_$n/.ab_srchash")" = "${HASH[$n]}" ]; then
    log "$n: $AB/site_$n already holds source hash ${HASH[$n]}: build reused"
    echo "0 0 reused" >"$W/build_$n.rc"
  else
    log "$n: building (background)"
    build_one "$n" &
    BPID[$n]=$!
  fi
done
for n in "${!BPID[@]}"; do wait "${BPID[$n]}"; done

declare -a BUILT=()
for n in "${OK[@]}"; do
  read -r rc secs reused <"$W/build_$n.rc" 2>/dev/null || { rc=99; secs=0; reused=; }
  cp "$AB/build_$n.log" "$W/logs/build_$n.log" 2>/dev/null
  bash "$REPO/tools/ptxas_report.sh" "$AB/build_$n.log" "WARN " >"$W/ptxas_$n.txt" 2>/dev/null
  if [ "$rc" != 0 ]; then
    log "$n: build FAILED (rc=$rc, ${secs} s$([ "$rc" = 124 ] && echo ', timed out')): dropped. End of its log:"
    st "$n" build "FAILED rc=$rc (${secs} s)"
    { grep -nE "error|Error|FAILED" "$AB/build_$n.log" | head -n 15; tail -n 15 "$AB/build_$n.log"; } | cut -c1-300 | tee -a "$W/logs/main.log"
    continue
  fi
  st "$n" build "ok ${reused:+(reused) }${secs} s"
  # Which package does python import with this PYTHONPATH?
  # Public names only, so that any build of the package answers.
  info=$(pyrun "$n" python3 -c "
import jax_flashmla as j
print(j.__file__, j.kernel_path())" 2>"$W/logs/import_$n.err" | tail -n 1)
  log "$n: import: $info"
  read -r file kpath <<<"$info"
  st "$n" import "${file:-?} | ${kpath:-?}"
  if [[ "${file:-}" != "$AB/site_$n/"* ]]; then
    log "$n: DROPPED: imported ${file:-nothing} instead of $AB/site_$n"; cat "$W/logs/import_$n.err"
    st "$n" build "DROPPED (import: ${file:-failed})"; continue
  fi
  if [ "$kpath" != cuda-sm90 ]; then
    log "$n: DROPPED: decode lowers to ${kpath:-?}, not the SM90 kernel"; st "$n" build "DROPPED (kernel_path=${kpath:-?})"; continue
  fi
  BUILT+=("$n")
done
log "built: ${BUILT[*]:-none}"
finish

# ---- 2. correctness -------------------------------------------------------------------------------
is_built() { local x; for x in "${BUILT[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
for n in $CHECK_VARIANTS; do
  if ! is_built "$n"; then log "$n: check skipped (not built / not in VARIANTS)"; st "$n" check "not built"; continue; fi
  if ! in_budget; then log "$n: check skipped (budget)"; st "$n" check "skipped (budget)"; continue; fi
  t0=$SECONDS
  if [ -z "${SKIP_QUICK:-}" ]; then
  pyrun "$n" timeout -k 10 "$(cap "${CHECK_TIMEOUT:-150}")" python3 "$AB/src_$n/benchmarks/quick_check.py" --check-only \
    >"$W/logs/check_$n.log" 2>&1
  rc=$?
  line=$(grep -m 1 "^correctness:" "$W/logs/check_$n.log")
  if ! grep -q "path cuda-sm90" "$W/logs/check_$n.log"; then res="FAILED (not on cuda-sm90; rc=$rc)"
  elif [ $rc -eq 0 ]; then res="PASS (${line#correctness: })"
  else res="FAILED rc=$rc$([ $rc = 124 ] && echo ' timeout') (${line:-no result line})"; fi
  st "$n" check "$res ($((SECONDS - t0)) s)"
  log "$n: quick_check --check-only: $res ($((SECONDS - t0)) s)"
  grep -E "^BAD" "$W/logs/check_$n.log" | head -n 5
  if [ $rc -ne 0 ]; then tail -n 8 "$W/logs/check_$n.log"; fi
  fi

  if [ -n "${PYTEST_K:-}" ]; then
    if ! in_budget; then st "$n" pytest "skipped (budget)"; log "$n: pytest skipped (budget)"; continue; fi
    t0=$SECONDS
    xla_flags="${XLA_FLAGS:-}"
    [[ "$xla_flags" == *xla_gpu_autotune_level* ]] || xla_flags="$xla_flags --xla_gpu_autotune_level=0"
    # The variant's own tests/ (a tree/ overlay may change them); cwd tests/ holds no package.
    (cd "$AB/src_$n/tests" && PYTHONPATH="$AB/site_$n${PYTHONPATH:+:$PYTHONPATH}" XLA_FLAGS="$xla_flags" \
       timeout -k 10 "$(cap "${PYTEST_TIMEOUT:-200}")" python3 -m pytest -q -p no:cacheprovider -m gpu \
       $PYTEST_FILE -k "$PYTEST_K" ${PYTEST_ARGS--x} -rfEs) >"$W/logs/pytest_$n.log" 2>&1
    rc=$?
    last=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$W/logs/pytest_$n.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [ $rc -eq 0 ] && [[ "$last" == *passed* ]]; then res="PASS ($last)"
    else res="FAILED rc=$rc$([ $rc = 124 ] && echo ' timeout') ($last)"; fi
    st "$n" pytest "$res ($((SECONDS - t0)) s)"
    log "$n: pytest -k '$PYTEST_K': $res ($((SECONDS - t0)) s)"
    grep -E "^(FAILED|ERROR)" "$W/logs/pytest_$n.log" | cut -c1-200 | head -n 5
  fi
done
finish

# ---- 3. bench ----------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -lms 500 >"$W/clocks.csv" 2>&1 &
  smi_pid=$!
fi
est=0   # the longest bench run so far
printf 'variant\trep\trc\tstart\tend\tsecs\tjson\n' >"$W/runs.tsv"
for ((rep = 1; rep <= REPS; rep++)); do
  order=("${BUILT[@]}")
  if [ "${BENCH_ORDER:-same}" = abba ] && [ $((rep % 2)) -eq 0 ]; then
    order=(); for ((i = ${#BUILT[@]} - 1; i >= 0; i--)); do order+=("${BUILT[$i]}"); done
  fi
  for n in "${order[@]}"; do
    if ! in_budget || [ $((SECONDS + est)) -gt $((HARD - 15)) ]; then
      log "$n rep $rep: not started (budget: ${SECONDS} s used, last run took ${est} s)"
      printf '%s\t%s\t%s\t\t\t\t\n' "$n" "$rep" "skipped" >>"$W/runs.tsv"; continue
    fi
    t0=$SECONDS; start=$(date +%s.%N)
    json=$W/json/${n}_rep$rep.json
    # shellcheck disable=SC2086
    pyrun "$n" timeout -k 10 "$(cap "${BENCH_TIMEOUT:-240}")" python3 "$REPO/$AB_BENCH" $BENCH_ARGS \
      --json "$json" >"$W/logs/bench_${n}_rep$rep.log" 2>&1
    rc=$?
    secs=$((SECONDS - t0)); [ $secs -gt $est ] && est=$secs
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$rep" "$rc" "$start" "$(date +%s.%N)" "$secs" "$json" >>"$W/runs.tsv"
    log "$n rep $rep: rc=$rc$([ $rc = 124 ] && echo ' (timeout)') ${secs} s"
    [ $rc -ne 0 ] && tail -n 8 "$W/logs/bench_${n}_rep$rep.log"
    finish >/dev/null 2>&1
  done
done
cleanup

# ---- 4. summary ----------------------------------------------------------------------------------------
finish
log "done in ${SECONDS} s; files: $OUT/ab_summary.md, $OUT/ab_logs.tgz"
echo
cat "$OUT/ab_summary.md"
