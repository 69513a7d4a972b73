#!/usr/bin/env bash
# Builds (or updates) the separate virtual environment of the anomalib integration: .venv-anomalib/ (git-ignored),
# never the main one. anomalib imports only with a torchvision that matches torch, and the main environment's CPU
# torch 2.13.0 wheel has none: this venv takes torch==2.14.1 + torchvision==0.29.1 (a CUDA build, ~5.5 GB, runs on
# the CPU), anomalib through fae_fast's `anomalib` extra, and fae_fast itself (editable, without the C++ extension:
# every op falls back to its pure-PyTorch reference). On an existing venv pip finds everything installed and
# finishes in seconds; a fresh one takes a few minutes (wheels from the local mirror or pip's cache).
#   scripts/anomalib_env.sh                build or update, then print the versions
#   ANOMALIB_VENV=dir                      another place for the venv
# Fails (exit 1, with the reason) when a requirement cannot be installed, e.g. the wheels are not in the mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ANOMALIB_VENV:-.venv-anomalib}
TORCH=(torch==2.14.1 torchvision==0.29.1)
TEST_NEEDS=(pytest "onnxruntime>=1.18")

SCRIPT=anomalib_env.sh
source scripts/_venv.sh
make_venv
# torch first, on its own: fae_fast's build (no isolation) and anomalib's requirements then see this torch
pipi "${TORCH[@]}" || fail "${TORCH[*]} into $VENV: are these wheels in the local mirror (pip download ${TORCH[*]})?"
FAE_FAST_NO_EXT=1 pipi --no-build-isolation -e ".[anomalib]" "${TORCH[@]}" "${TEST_NEEDS[@]}" \
    || fail "fae_fast[anomalib] (anomalib==2.7.0) and ${TEST_NEEDS[*]} into $VENV"
"$VENV/bin/python" -c "
import torch, torchvision, anomalib, fae_fast
print('anomalib_env.sh:', '$VENV', 'anomalib', anomalib.__version__, 'torch', torch.__version__,
      'torchvision', torchvision.__version__, 'fae_fast', fae_fast.__file__)" \
    || fail "$VENV does not import torch, torchvision, anomalib and fae_fast"
