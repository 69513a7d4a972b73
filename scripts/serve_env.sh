#!/usr/bin/env bash
# Builds (or updates) the separate virtual environment of the Triton serving integration: .venv-serve/ (git-ignored),
# never the main one. PyTriton (nvidia-pytriton 0.7.0, which ships the Triton server binary) requires numpy<2, the
# main environment runs numpy 2: this venv takes the main environment's CPU torch 2.13.0 (installed FIRST, on its
# own: a bare `torch` requirement would pull a multi-GB CUDA build), numpy<2, an opencv-python-headless that
# accepts it, fae_fast through its `serve` extra (nvidia-pytriton, tritonclient) plus the CPU engine (onnxruntime,
# onnxscript, onnx) and pytest, and fae_fast itself (editable, without the C++ extension: every op falls back to its
# pure-PyTorch reference; serving does not use the extension). On an existing venv pip finds everything installed
# and finishes in seconds; a fresh one takes a few minutes (wheels from the local mirror or pip's cache).
#   scripts/serve_env.sh                   build or update, then print the versions
#   SERVE_VENV=dir                         another place for the venv
# Fails (exit 1, with the reason) when a requirement cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SERVE_VENV:-.venv-serve}
TORCH=(torch==2.13.0)
NUMPY=("numpy>=1.24,<2")
TEST_NEEDS=(pytest "pytest-benchmark>=4")

SCRIPT=serve_env.sh
source scripts/_venv.sh
make_venv
# torch first, on its own (the CPU wheel), then numpy<2: every later requirement is resolved against both
pipi "${TORCH[@]}" "${NUMPY[@]}" || fail "${TORCH[*]} ${NUMPY[*]} into $VENV"
FAE_FAST_NO_EXT=1 pipi --no-build-isolation -e ".[serve,cpu]" "${TORCH[@]}" "${NUMPY[@]}" "${TEST_NEEDS[@]}" \
    || fail "fae_fast[serve,cpu] (nvidia-pytriton==0.7.0, numpy<2) and ${TEST_NEEDS[*]} into $VENV"
"$VENV/bin/python" -c "
import numpy, torch, cv2, onnxruntime, pytriton, tritonclient, fae_fast
from importlib.metadata import version
print('serve_env.sh:', '$VENV', 'nvidia-pytriton', version('nvidia-pytriton'), 'tritonclient', version('tritonclient'),
      'torch', torch.__version__, 'numpy', numpy.__version__, 'opencv', cv2.__version__, 'onnxruntime',
      onnxruntime.__version__, 'fae_fast', fae_fast.__file__)" \
    || fail "$VENV does not import numpy, torch, cv2, onnxruntime, pytriton, tritonclient and fae_fast"
