#!/usr/bin/env bash
# One prepared run on a GPU machine (e.g. the lent H200): build the CUDA extension, run the GPU tests, the op
# benchmarks and the engine benchmark, writing logs and JSON under $OUT (default ./gpu_out).
#
#   bash bench/gpu_check.sh            # everything (about 10 minutes on an H200, compiles included: an estimate)
#   QUICK=1 bash bench/gpu_check.sh    # build + GPU tests only
#
# That machine has torch (CUDA), triton, opencv, pytest and pytest-benchmark but no network: nothing is pip-
# resolved here. DALI is optional: carry its wheels (nvidia-dali-cuda130 and its nvidia-* / optree / astunparse /
# gast / makefun / libcst / nvtx dependencies) in gpu_wheels/ and they are installed with --no-index --no-deps.
# It keeps going after a failing step so that one run collects everything; summary.txt lists each step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=()
step() {  # step NAME TIMEOUT CMD...
    local name=$1 t=$2; shift 2
    local t0=$(date +%s)
    timeout "$t" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    status+=("$name rc=$rc $(( $(date +%s) - t0 ))s")
    echo "== $name rc=$rc ($(( $(date +%s) - t0 )) s)"; tail -n 5 "$OUT/$name.log"
}

{ nvidia-smi -L; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ls gpu_wheels/*.whl >/dev/null 2>&1; then
    python -m pip install --no-index --no-deps --target /tmp/site gpu_wheels/*.whl >"$OUT/dali_install.log" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# the extension with its CUDA sources, in place
step build 400 env TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 python setup.py build_ext --inplace
python -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || ln -sfn ../kernels fae_fast/kernels   # fae_fast.kernels without an editable install
python -c "import fae_fast._ext as e; print(e.describe())" >>"$OUT/machine.txt" 2>&1

# every gpu-marked test: kernels vs reference at full size, no graph break under torch.compile, CUDA extension
# vs CPU, no host sync in the corruption generator, engine parity and CUDA graphs, streams, DALI mixed decode
step gpu_tests 300 python -m pytest -q -m gpu tests --no-header -p no:cacheprovider
[ -n "${QUICK:-}" ] && { printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"; exit 0; }

step bench_ops 400 python -m pytest bench -q -o python_files='bench_*.py' -k "not engine" \
    --benchmark-json="$OUT/bench_ops.json"
step bench_engine 400 python -m fae_fast bench --json "$OUT/bench_engine.json"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
