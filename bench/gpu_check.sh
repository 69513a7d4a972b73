#!/usr/bin/env bash
# One prepared run on a GPU machine (the lent H200): build the CUDA extension, run the GPU tests, the
# benchmarks and the engine benchmark, writing logs and JSON under $OUT (default ./gpu_out).
#   bash bench/gpu_check.sh            # full
#   QUICK=1 bash bench/gpu_check.sh    # build + GPU tests only
# It keeps going after a failing step so one run collects everything; the summary lists each step's status.
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

# the extension with its CUDA sources, in place (no network there: no pip resolution)
step build 300 env TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 python setup.py build_ext --inplace
python -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || ln -sfn ../kernels fae_fast/kernels   # fall back to a link when an editable install is impossible
python -c "import fae_fast._ext as e; print(e.describe())" >>"$OUT/machine.txt" 2>&1

step gpu_tests 240 python -m pytest -q -m gpu tests -x --no-header -p no:cacheprovider
[ -n "${QUICK:-}" ] && { printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"; exit 0; }

step bench_ops 300 python -m pytest bench -q -o python_files='bench_*.py' -k "not engine and not loader" \
    --benchmark-json="$OUT/bench_ops.json" --benchmark-min-rounds=20
step bench_engine 300 python -m fae_fast bench --json "$OUT/bench_engine.json"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
