#!/usr/bin/env bash
# The test run of `make test` (after `make install-test`), and of CI through it:
#   1. the CPU suite (Triton through its interpreter),
#   2. every benchmark once with timing disabled, so none rots,
#   3. the fallback run without the compiled extension,
#   4. the anomalib integration in its own venv (torch 2.14.1 + torchvision 0.29.1 + anomalib 2.7.0, git-ignored
#      .venv-anomalib/, scripts/anomalib_ci.sh),
#   5. Triton serving in its own venv (PyTriton 0.7.0 needs numpy<2; git-ignored .venv-serve/, CPU torch 2.13.0;
#      real servers on loopback, scripts/serve_ci.sh).
# Building the two venvs is mostly unpacking wheels (~6 GB for anomalib's CUDA torch): they are built in the
# background while 1-3 run (several minutes of a fresh 2-core machine's wall clock otherwise), their output in
# build/test-venvs.log. A venv that cannot be built fails the run with that log; so does any failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=1
mkdir -p build
LOG=build/test-venvs.log
BUILD='bash scripts/anomalib_env.sh && bash scripts/serve_env.sh'
# in its own process group where setsid exists, so that a failing suite stops pip and its children too
if command -v setsid >/dev/null 2>&1; then
    setsid bash -c "$BUILD" >"$LOG" 2>&1 &
else
    bash -c "$BUILD" >"$LOG" 2>&1 &
fi
VENVS=$!
trap 'kill -- -"$VENVS" 2>/dev/null || kill "$VENVS" 2>/dev/null || true' EXIT

"$PY" -m pytest -q tests
"$PY" -m pytest -q bench -o python_files='bench_*.py' --benchmark-disable
FAE_FAST_NO_EXT=1 "$PY" -m pytest -q tests -m "not slow" -k "elastic or stroke or corrupt or backend"

if ! wait "$VENVS"; then
    cat "$LOG" >&2
    echo "test.sh: FAILED: building .venv-anomalib or .venv-serve (the log above, $LOG)" >&2
    exit 1
fi
trap - EXIT
cat "$LOG"
# each re-runs its env script first: on the venv just built pip finds everything installed
bash scripts/anomalib_ci.sh
bash scripts/serve_ci.sh
