#!/usr/bin/env bash
# CI job of the anomalib integration (issue 13): builds or reuses .venv-anomalib (scripts/anomalib_env.sh) and runs
# tests/anomalib plus the lazy-import test in it. Any failure, including a venv that cannot be built, fails the job.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ANOMALIB_VENV:-.venv-anomalib}
bash scripts/anomalib_env.sh
# the extension in the checkout was built for the main environment's torch: not loaded here
FAE_FAST_NO_EXT=1 TRITON_INTERPRET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/anomalib tests/test_integrations.py
