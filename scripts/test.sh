#!/usr/bin/env bash
# Set up (idempotent) and run the linter and the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${GMLP_VENV:-.venv}
# The tests never need a model or dataset hub: fail fast instead of waiting on the network.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/python" -m pytest -q -n "${GMLP_TEST_WORKERS:-2}" "$@"
