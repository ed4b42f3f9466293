#!/usr/bin/env bash
# The project's test command (README "Quick start"; .ci/run calls it, and only it): install with pip,
# build and test the Bazel build (docs/bazel.md), then run the suite on the pip-installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/bazel_test.sh
# Run from tests/ so the installed package, not the source folder, is imported; one pytest over the
# package's tests and the lab tools' (tools/tests/).
cd tests && python3 -m pytest -q -p no:cacheprovider . ../tools/tests
