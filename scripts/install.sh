#!/usr/bin/env bash
# Installs fae_fast and what it needs on a fresh machine, choosing the torch build for the machine.
#   scripts/install.sh          the package (editable) and its runtime needs
#   scripts/install.sh test     the same plus the test needs (pytest, scikit-learn, triton, DALI CPU mode)
# A torch that already imports is kept (GPU machines bring their own CUDA build). Otherwise a machine with no
# NVIDIA driver gets the pinned torch==2.13.0, the CPU wheel on this project's machines: a bare `torch`
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pipi torch
    else
        pipi torch==2.13.0
    fi
fi
pipi "setuptools>=69" wheel
extras=""
if [ "${1:-}" = "test" ]; then
    extras="[test,dali]"
    # the HTML report is checked in headless Chromium (Debian's package, ~20 s); its test skips without it
    if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "install.sh: could not install chromium; the report's browser test will be skipped" >&2
    fi
fi
# --no-build-isolation: the extension must be built against the torch installed above, not a fresh one
pipi --no-build-isolation -e ".${extras}"
"$PY" -c "import fae_fast, torch; print('fae_fast', fae_fast.__version__, 'with torch', torch.__version__)"
# the extension must load with this torch (else every op silently takes the slow path): say so and fail here
if [ "${FAE_FAST_NO_EXT:-0}" = 0 ]; then
    "$PY" -c "
try:
    from fae_fast import _ext
except ImportError as exc:
    raise SystemExit(f'install.sh: the fae_fast C++ extension does not load: {exc}')
print(_ext.describe())"
fi
