#!/usr/bin/env bash
# Installs jax_flashmla from this checkout with everything its examples and tests need.
# The extension is compiled here: the CPU handlers always, the SM90 kernels when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
# Build requirements, installed up front so the build reuses them (no isolated env, incremental build/).
python3 -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4" "jax>=0.6"
python3 -m pip install -q --no-build-isolation ".[test,examples]"
cd / && python3 -c "import jax_flashmla as j; print('jax_flashmla', j.__version__, '| decode path on', __import__('jax').default_backend(), '->', j.kernel_path())"
