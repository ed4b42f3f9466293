#!/usr/bin/env bash
# Builds FlashMLA's SM90 kernels (deepseek-ai/FlashMLA, a source folder brought to the GPU machine)
# into a scratch prefix, for benchmarks/bench_sparse.py and bench_prefill.py --flashmla; nothing of
# FlashMLA is part of this repository, and nothing is fetched: the machine needs no package registry.
#
#   bash tools/flashmla_build.sh [SRC]            # then: export PYTHONPATH=$PREFIX/site:$PYTHONPATH
#
#   SRC      FlashMLA's source: a checkout or an unpacked `git archive` (default $FLASHMLA_SRC, else
#            ${TMPDIR:-/tmp}/flashmla). Outside this repository, or in a git-ignored folder of it
#            (what a run's carry brings). It is copied, never changed.
#   PREFIX   scratch folder (default ${TMPDIR:-/tmp}/flashmla_build): src/ (the copy), cutlass/,
#            site/ (the installed flash_mla package), build.log, env.sh
#   CUTLASS  a folder holding CUTLASS's include/ and tools/util/include/; else SRC's csrc/cutlass when
#            its submodule is checked out; else an installed nvidia-cutlass (cutlass_library/source);
#            else the wheel named by CUTLASS_WHEEL (default: the first nvidia_cutlass-*.whl in SRC,
#            its parent, or .whl/ of this repository), unpacked under PREFIX
#   MAX_JOBS, NVCC_THREADS   parallel compiles (defaults: cores, and 4 threads per nvcc)
#   FORCE=1  rebuild even when site/ holds a build of the same sources
#
# What the build needs, and what the CUDA image of this workplace's GPU machines has:
#   - torch with CUDA (FlashMLA's setup.py is torch's CUDAExtension and its API takes torch
#     tensors): in the image (2.11.0+cu130). Where it is not, the side by side needs a torch wheel
#     of the machine's CUDA version (about 1 GB: too large to carry in a run), so there the
#     comparison cannot run; there is no torch-free way to call FlashMLA's kernels short of
#     writing a launcher for them, which this project does not do.
#   - nvcc >= 12.9 only for SM100 (built here with FLASH_MLA_DISABLE_SM100=1: SM90 only), setuptools,
#     ninja, pybind11 (torch ships its headers): in the image.
#   - CUTLASS headers (the csrc/cutlass submodule): NOT in the image. Carry the nvidia-cutlass 4.2
#     wheel (nvidia_cutlass-4.2.0.0-py3-none-any.whl, 6.4 MB; unpacked, not installed).
# FlashMLA's source without its submodule is about 0.25 MB packed (git archive HEAD).
#
# Time: every source of setup.py compiles (the SM100 ones to nearly empty objects); FP16 dense
# decode is left out (FLASH_MLA_DISABLE_FP16=1). The build is cached in PREFIX: a second run of
# the same sources only checks the import.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(realpath -m "${1:-${FLASHMLA_SRC:-${TMPDIR:-/tmp}/flashmla}}")
PREFIX=$(realpath -m "${PREFIX:-${TMPDIR:-/tmp}/flashmla_build}")
PY=${PYTHON:-python3}

die() { echo "flashmla_build.sh: $*" >&2; exit 1; }

[ -f "$SRC/setup.py" ] && [ -d "$SRC/flash_mla" ] && [ -d "$SRC/csrc/sm90" ] ||
  die "no FlashMLA source at $SRC (setup.py, flash_mla/, csrc/sm90/ expected)"
case "$SRC/" in
  "$REPO"/*) git -C "$REPO" check-ignore -q "$SRC" ||
    die "$SRC lies inside this repository and is not ignored: keep FlashMLA's source out of it" ;;
esac
case "$PREFIX/" in
  "$REPO"/*) git -C "$REPO" check-ignore -q "$PREFIX" || die "PREFIX $PREFIX lies inside this repository and is not ignored" ;;
esac
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null ||
  die "$PY has no CUDA torch: FlashMLA's build and API need one (see this script's header)"
command -v nvcc >/dev/null || die "no nvcc on PATH"

mkdir -p "$PREFIX"
LOG=$PREFIX/build.log
# The sources' hash names the build: a copy of the same tree is not rebuilt.
hash=$(cd "$SRC" && find setup.py flash_mla csrc -path csrc/cutlass -prune -o -type f -print | LC_ALL=C sort |
       xargs cat | sha256sum | cut -c1-16)
stamp=$PREFIX/site/.flashmla_sources
if [ "${FORCE:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
  echo "flashmla_build.sh: $PREFIX/site already holds a build of these sources ($hash)"
else
  # ---- CUTLASS headers ----------------------------------------------------------------------------
  cutlass=${CUTLASS:-}
  if [ -z "$cutlass" ] && [ -f "$SRC/csrc/cutlass/include/cutlass/cutlass.h" ]; then
    cutlass=$SRC/csrc/cutlass
  fi
  if [ -z "$cutlass" ]; then
    cutlass=$("$PY" -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))" 2>/dev/null || true)
    [ -n "$cutlass" ] && [ -f "$cutlass/include/cutlass/cutlass.h" ] || cutlass=
  fi
  if [ -z "$cutlass" ]; then
    wheel=${CUTLASS_WHEEL:-$(ls "$SRC"/nvidia_cutlass-*.whl "$SRC"/../nvidia_cutlass-*.whl "$REPO"/.whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1 || true)}
    [ -n "$wheel" ] && [ -f "$wheel" ] || die "no CUTLASS headers: set CUTLASS, or carry the nvidia-cutlass wheel (CUTLASS_WHEEL)"
    rm -rf "$PREFIX/cutlass" && mkdir -p "$PREFIX/cutlass"
    "$PY" - "$wheel" "$PREFIX/cutlass" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("cutlass_library/source/")])
EOF
    cutlass=$PREFIX/cutlass/cutlass_library/source
  fi
  [ -f "$cutlass/include/cutlass/cutlass.h" ] && [ -d "$cutlass/include/cute" ] || die "no CUTLASS/CuTe headers under $cutlass/include"
  echo "flashmla_build.sh: CUTLASS headers from $cutlass"

  # ---- a clean copy of the source, CUTLASS linked in as its submodule -------------------------------
  rm -rf "$PREFIX/src" "$PREFIX/site"
  mkdir -p "$PREFIX/src"
  (cd "$SRC" && tar --exclude=./csrc/cutlass --exclude=./.git --exclude=./build -cf - .) | (cd "$PREFIX/src" && tar -xf -)
  rm -rf "$PREFIX/src/csrc/cutlass"
  ln -s "$cutlass" "$PREFIX/src/csrc/cutlass"

  # setup.py runs `git submodule update`: keep git from finding a repository around the copy.
  export GIT_CEILING_DIRECTORIES=$PREFIX
  export FLASH_MLA_DISABLE_SM100=1 FLASH_MLA_DISABLE_FP16=1
  export MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-4}
  # CUDA 13 keeps libcu++ (cuda/std/..., which CUTLASS includes) under include/cccl, off nvcc's and
  # the host compiler's default paths.
  cccl=$(dirname "$(dirname "$(command -v nvcc)")")/include/cccl
  if [ -d "$cccl" ]; then
    export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-I$cccl"
    export CPLUS_INCLUDE_PATH="$cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
  fi
  echo "flashmla_build.sh: building $SRC ($hash) into $PREFIX/site, MAX_JOBS=$MAX_JOBS; log: $LOG"
  t0=$SECONDS
  if ! "$PY" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir --target "$PREFIX/site" \
       "$PREFIX/src" >"$LOG" 2>&1; then
    # pip's own tail is its setup.py wrapper; the compiler's messages come earlier in the log
    grep -n -E "error|Error|Killed|No space" "$LOG" | grep -v -E "except ImportError|not a git repository" | head -n 30
    tail -n 15 "$LOG"
    die "the build failed (log: $LOG)"
  fi
  echo "flashmla_build.sh: built in $((SECONDS - t0)) s"
  grep -E "registers|spill" "$LOG" | grep -i -E "sparse|splitkv|combine" | sort -u | head -n 20 || true
  echo "$hash" >"$stamp"
fi

echo "export PYTHONPATH=$PREFIX/site\${PYTHONPATH:+:\$PYTHONPATH}" >"$PREFIX/env.sh"
(cd /tmp && PYTHONPATH=$PREFIX/site${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "
import torch, flash_mla
meta, _ = flash_mla.get_mla_metadata()
print('flashmla_build.sh: import ok:', flash_mla.__file__, '| torch', torch.__version__, '| GPU',
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)") ||
  die "the build does not import (log: $LOG)"
echo "flashmla_build.sh: source $PREFIX/env.sh (or PYTHONPATH=$PREFIX/site) before benchmarks/bench_sparse.py or bench_prefill.py --flashmla"
