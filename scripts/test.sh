#!/usr/bin/env bash
# Run the whole test suite on the CPU, building the virtual environment first
# when it is missing (fresh machine: a few minutes; CPU torch from the pinned wheel).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${VENV:-.venv}/bin/python" -m pytest tests "$@"
