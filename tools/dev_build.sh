#!/usr/bin/env bash
# Developer build: compiles the extension into build/dev and links it into the source tree, so
# `python -c "import jax_flashmla"` and pytest work from the checkout without `pip install`.
# Usage: tools/dev_build.sh [-DJAX_FLASHMLA_CUDA=OFF|ON|AUTO ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import jax, nanobind" 2>/dev/null || python3 -m pip install -q jax nanobind
cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE="$(command -v python3)" "$@" >/dev/null
ninja -C build/dev
for so in build/dev/_ext*.so; do ln -sf "../$so" jax_flashmla/; done
