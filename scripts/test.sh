#!/usr/bin/env bash
# The project's test command (README "Quick start"; .ci/run calls it): install, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Run from tests/ so the installed package, not the source folder, is imported.
cd tests && python3 -m pytest -q -p no:cacheprovider .
