#!/usr/bin/env bash
# CI job of the Triton serving integration (issue 12): builds or reuses .venv-serve (scripts/serve_env.sh: PyTriton
# needs numpy<2, the main environment has numpy 2) and runs, in it, tests/serving (real Triton servers on the
# loopback interface), the lazy-import test, and the serving benchmark once with timing disabled so it does not rot.
# Any failure, including a venv that cannot be built, fails the job. About a minute on 2 cores once the venv exists.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SERVE_VENV:-.venv-serve}
bash scripts/serve_env.sh
# the extension in the checkout was built for the main environment; serving does not need it
export FAE_FAST_NO_EXT=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/serving tests/test_integrations.py
"$VENV/bin/python" -m pytest -q -p no:cacheprovider bench/bench_serving.py -o python_files='bench_*.py' \
    --benchmark-disable
