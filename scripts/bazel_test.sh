#!/usr/bin/env bash
# Builds jax_flashmla with Bazel and runs its CPU test suite against the Bazel-built extension.
# Works from a fresh machine of the project's kind: installs Debian's bazel-bootstrap (Bazel 4.2.3)
# when `bazel` is missing and the Python packages pyproject.toml names when one is missing, then
# builds offline (docs/bazel.md) for python3 on PATH (a virtual environment's when one is active).
# Everything goes to stdout.
#
#   BAZEL_JOBS=2          parallel actions and CPU budget (default 2: CI and dev machines have 2 cores)
#   BAZEL=bazel           the bazel binary to use
#   BAZEL_KEEP_SERVER=1   leave the Bazel server running afterwards (default: shut it down, so
#                         its JVM does not sit idle on a shared machine; the cache stays on disk)
#   JFM_CUDA, CUDA_PATH, PYTHON_BIN_PATH, ...: see docs/bazel.md
# Extra arguments are passed to both `bazel build` and `bazel test`, e.g. --config=... or targets' flags.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 2>&1

jobs="${BAZEL_JOBS:-2}"
bazel="${BAZEL:-bazel}"
start=$SECONDS
stamp() { echo "[bazel_test.sh +$((SECONDS - start))s] $*"; }

if ! command -v "$bazel" >/dev/null 2>&1; then
  stamp "no $bazel on PATH: installing Debian's bazel-bootstrap"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends bazel-bootstrap
fi
stamp "$("$bazel" --version 2>/dev/null || echo bazel) from $(command -v "$bazel")"

# The repository rules ask this Python for headers and packages; tests run on it too. Exported so
# Bazel asks the interpreter checked here (a virtual environment's, when one is active).
python="${PYTHON_BIN_PATH:-$(command -v python3)}"
export PYTHON_BIN_PATH="$python"

# What the build and the suite need, read from pyproject.toml: the build requirements but
# scikit-build-core (Bazel builds here), the dependencies and the [test] extra. pip runs only when one
# is missing, so an externally managed interpreter that already has them is left alone.
missing="$("$python" - <<'PY'
import importlib.metadata, re
try:
    import tomllib
except ImportError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)
reqs = [r for r in meta["build-system"]["requires"] if not r.startswith("scikit-build-core")]
reqs += meta["project"]["dependencies"] + meta["project"]["optional-dependencies"]["test"]
for req in dict.fromkeys(reqs):
    try:
        importlib.metadata.distribution(re.split(r"[<>=!~;\[ ]", req, 1)[0])
    except importlib.metadata.PackageNotFoundError:
        print(req)
PY
)"
if [ -n "$missing" ]; then
  stamp "installing the Python packages the build and tests need:" $missing
  mapfile -t reqs <<<"$missing"
  "$python" -m pip install -q "${reqs[@]}"
fi

if [ "${BAZEL_KEEP_SERVER:-0}" != 1 ]; then
  trap '"$bazel" shutdown >/dev/null 2>&1 || true' EXIT
fi

# Plain, line-by-line output for CI logs; at most $jobs actions and cores at a time.
flags=(--jobs="$jobs" --local_cpu_resources="$jobs" --color=no --curses=no --show_progress_rate_limit=20)

stamp "bazel build //..."
"$bazel" build "${flags[@]}" "$@" //...
ext="$("$bazel" info "${flags[@]}" bazel-bin 2>/dev/null)/jax_flashmla/_ext.so"
stamp "built $ext"
"$python" - "$ext" <<'PY'
import importlib.machinery, importlib.util, sys
spec = importlib.util.spec_from_file_location("_ext", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
print("[bazel_test.sh] extension built with CUDA kernels:", bool(ext.built_with_cuda()))
PY

stamp "bazel test //..."
"$bazel" test "${flags[@]}" "$@" //...
stamp "done"
