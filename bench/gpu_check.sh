#!/usr/bin/env bash
# One prepared run on the lent GPU machine (an H200): every GPU claim of docs/RESULTS.md measured in <= 9 minutes,
# cheap steps first, compile-heavy ones last, each with its own time budget under one overall deadline.
#
# Run it from the `run` device tool like this (the commit literally, since .git does not travel):
#
#   run(command="FAE_FAST_COMMIT=<git rev-parse HEAD here> bash bench/gpu_check.sh", timeout_s=560)
#
# summary.txt also names a hash of the sources (TREE_HASH_ONLY=1 bash bench/gpu_check.sh prints it here): equal
# hashes say the run measured exactly that commit, uncommitted changes included.
#
# Carry nothing: the script builds the extension there and reads only tracked files. (Optional: `gpu_wheels`,
# small wheels to install with --no-index, e.g. for a later DALI run; the whole carry must stay < 64 MiB, so the
# first run goes without DALI: its tests and loader provider skip.) The defaults stop by BUDGET_S=530 s, which
# with a machine start of 1-2 minutes leaves about 3 minutes of the 15-minute device budget for ONE immediate
# rerun of what failed (within the 30 s the machine stays warm: the built extension and Inductor's cache in /tmp
# are still there), e.g.
#
#   run(command="FAE_FAST_COMMIT=<sha> ONLY='train_step engine' BUDGET_S=150 bash bench/gpu_check.sh", timeout_s=170)
#
# What comes back ($OUT: at most 8 files are returned, so there are only these, each updated the moment a step
# ends): summary.txt and summary.json (machine, commit, each step's rc / seconds / budget, every target with its
# measured number), log.txt (all output, live), results.tar.gz (every JSON, the profiles, the junit XML files and
# machine.json; `tar xzf` it into bench/results/). The run's output tail ends with summary.txt.
#
# Modes: DRY_RUN=1 prints the steps with their budgets and commands; CPU_SMOKE=1 runs the cheap steps here on the
# CPU at tiny sizes (no build, nothing compiled) to test the plumbing; ONLY='a b' runs those steps (env always);
# BUDGET_S=N the overall deadline; WORK (default a fresh /tmp folder), OUT (default $WORK.out), PY (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
WORK=${WORK:-$(mktemp -d -u /tmp/gpu_check.XXXXXX)}
OUT=${OUT:-$WORK.out}
BUDGET_S=${BUDGET_S:-530}
SMOKE=${CPU_SMOKE:-}
DRY=${DRY_RUN:-}
ONLY=${ONLY:-}
SEEN=""
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
[ -z "$DRY" ] && mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

tree_hash() {  # the sources' identity, comparable with a checkout here (.git does not travel)
    find fae_fast kernels csrc bench tests setup.py pyproject.toml -type f \( -name '*.py' -o -name '*.cpp' \
        -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.toml' -o -name '*.sh' \) \
        -not -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
[ -n "${TREE_HASH_ONLY:-}" ] && { tree_hash; exit 0; }
FAE_FAST_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo "${FAE_FAST_COMMIT:-unknown}")
TREE_HASH=$(tree_hash)
export FAE_FAST_COMMIT TREE_HASH

if [ -n "$SMOKE" ]; then  # tiny CPU sizes (the bench files pick them without CUDA), interpreted Triton
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    BENCH="--benchmark-max-time=0.05 --benchmark-min-rounds=1 --benchmark-warmup=off"
    OPS_K="[1-16-" OPS_COMPILED_K="[1-16-"
    ENGINE="--quick --device cpu"
else
    export TRITON_INTERPRET=0
    BENCH="--benchmark-max-time=0.5 --benchmark-min-rounds=5"
    OPS_K="[1-256- or [64-256- or [256-256-" OPS_COMPILED_K="[64-256-"  # the compiled reference at the target's batch
    ENGINE=""
fi
PYTEST=("$PY" -m pytest -p no:cacheprovider)
BPYTEST=("${PYTEST[@]}" -q -o "python_files=bench_*.py" $BENCH)
KERNEL_TESTS="tests/test_anomaly_map.py tests/test_corrupt_and_noise.py tests/test_noisy_target_loss.py
    tests/test_corruption.py tests/test_elastic_warp.py tests/test_rasterize_strokes.py tests/test_data.py
    tests/test_dali.py"
XDIST=""  # the compile-heavy tests in 4 processes (16 cores there); pytest-timeout: one hung test cannot eat a step
$PY -c "import xdist" 2>/dev/null && [ -z "$SMOKE" ] && XDIST="-n 4 --dist loadfile"
$PY -c "import pytest_timeout" 2>/dev/null && XDIST="$XDIST --timeout 120"

summarize() {
    $PY bench/gpu_summary.py summary "$WORK" "$OUT" 2>>"$OUT/log.txt"
    tar -C "$WORK" -czf "$OUT/results.tar.gz.tmp" . 2>>"$OUT/log.txt" && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

# step NAME BUDGET_S CMD...: runs CMD under min(BUDGET_S, time left), output appended to log.txt, then the summary
step() {
    local name=$1 budget=$2; shift 2
    SEEN="$SEEN $name"
    if [ -n "$ONLY" ] && [ "$name" != env ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if [ -n "$DRY" ]; then printf '%-18s %4ss  %s\n' "$name" "$budget" "${*@Q}"; return; fi
    local left=$((DEADLINE - $(date +%s) - 5)) t0 rc status
    if [ "$left" -lt 15 ]; then
        printf '%s\t-\t0\t%s\tskipped: %ss left of BUDGET_S=%s\n' "$name" "$budget" "$left" "$BUDGET_S" >>"$WORK/steps.tsv"
        echo "== $name skipped (${left}s left)"; summarize; return
    fi
    local t=$((budget < left ? budget : left))
    t0=$(date +%s)
    echo "== $name (budget ${t}s): $*" | tee -a "$OUT/log.txt"
    # timeout signals the whole process group: compile workers and xdist workers end with the step
    timeout -k 10 "$t" bash -c '"$@"' "$name" "$@" >>"$OUT/log.txt" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status="timeout after ${t}s" ;; 5) status="no tests ran" ;; *) status=failed ;; esac
    [ "$t" -lt "$budget" ] && [ "$rc" = 124 ] && status="$status (cut by BUDGET_S)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$t" "$status" >>"$WORK/steps.tsv"
    echo "== $name rc=$rc $(($(date +%s) - t0))s $status" | tee -a "$OUT/log.txt"
    summarize
}

# steps that are shell functions run in `bash -c` under timeout: exported, with the variables they read
env_step() {
    nvidia-smi || true
    $PY bench/gpu_summary.py machine "$WORK"
}

build_step() {
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
        $PY setup.py build_ext --inplace || return
    $PY -c "import fae_fast._ext as e; print(e.describe())"
}

export -f env_step build_step
export PY WORK
if [ -z "$DRY" ]; then
    echo "gpu_check: commit $FAE_FAST_COMMIT tree $TREE_HASH budget ${BUDGET_S}s out $OUT work $WORK"
    if ls gpu_wheels/*.whl >/dev/null 2>&1; then  # optional carried wheels (e.g. DALI in a later run)
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site gpu_wheels/*.whl >>"$OUT/log.txt" 2>&1
        export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    # fae_fast.kernels lives in ./kernels (pyproject's package-dir): without an editable install, a link
    $PY -c "import fae_fast.kernels" 2>/dev/null || ln -sfn ../kernels fae_fast/kernels
fi
[ -n "$DRY" ] && echo "gpu_check steps (budget s, command); overall deadline BUDGET_S=${BUDGET_S}s:"
# --- cheap: the machine, the extension, Triton kernels and the corruption generator, no torch.compile ----------
step env 30 env_step
if [ -z "$SMOKE$DRY" ] && ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device here, stopping (CPU_SMOKE=1 checks the plumbing on a CPU)" | tee -a "$OUT/log.txt"
    exit 1
fi
[ -z "$SMOKE" ] && step build 150 build_step
step ops 90 "${BPYTEST[@]}" bench/bench_anomaly_map.py bench/bench_corrupt_and_noise.py bench/bench_noisy_target_loss.py \
    -k "not torch_compile and ($OPS_K)" --benchmark-json="$WORK/ops.json"
step corruption 75 "${BPYTEST[@]}" bench/bench_corruption.py bench/bench_elastic_warp.py bench/bench_rasterize_strokes.py \
    -k "not torch_compile" --benchmark-json="$WORK/corruption.json"
# -v: each test's result is in log.txt the moment it ends, also when the step is cut short
step gpu_tests_kernels 100 "${PYTEST[@]}" -v -m gpu $KERNEL_TESTS $XDIST --durations=10 \
    --junitxml="$WORK/gpu_tests_kernels.xml"
# torchrun with 1 CUDA process (NCCL, DDP, SyncBatchNorm; one GPU cannot hold two NCCL ranks) vs a plain run, and
# the keyed Triton noise on CUDA: 2 short trainings at 32x32, no compile
step torchrun 40 "${PYTEST[@]}" -v -m gpu tests/test_distributed.py --durations=5 --junitxml="$WORK/torchrun.xml"
# --- compile-heavy: training, the engine, the compiled references, the engine and export tests -------------------
step train_step 150 env BENCH_PROFILE_DIR="$WORK" "${BPYTEST[@]}" -s bench/bench_train_step.py \
    --benchmark-json="$WORK/train_step.json"  # -s: each provider's img/s is in log.txt as soon as it is measured
step engine 180 $PY -m fae_fast bench $ENGINE --providers eager_fp32,engine --batch-sizes 64 --host-batch 16 \
    --note gpu_check.sh --json "$WORK/engine.json"
step ops_compiled 100 "${BPYTEST[@]}" bench/bench_anomaly_map.py bench/bench_corrupt_and_noise.py \
    bench/bench_noisy_target_loss.py -k "torch_compile and ($OPS_COMPILED_K)" --benchmark-json="$WORK/ops_compiled.json"
step profile_engine 60 $PY -m bench.profile_engine --out "$WORK" ${SMOKE:+--quick}
step gpu_tests_heavy 200 "${PYTEST[@]}" -v -m gpu tests \
    $(printf -- '--ignore=%s ' $KERNEL_TESTS tests/test_distributed.py) $XDIST --durations=10 \
    --junitxml="$WORK/gpu_tests_heavy.xml"
# --- if time is left: the plain compiled baseline of the engine, the loader without DALI --------------------------
[ -z "$SMOKE" ] && step engine_compiled 120 $PY -m fae_fast bench --providers compiled_bf16 --batch-sizes 64 \
    --scenarios gpu_resident --note gpu_check.sh --json "$WORK/engine_compiled.json"
[ -z "$SMOKE" ] && step loader 60 "${BPYTEST[@]}" bench/bench_loader.py -k cv2 --benchmark-json="$WORK/loader.json"

for w in $ONLY; do [[ " $SEEN " == *" $w "* ]] || echo "gpu_check: warning: ONLY names no step '$w' (steps:$SEEN)"; done
[ -n "$DRY" ] && exit 0
echo "gpu_check: done in $(($(date +%s) - START))s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.txt"
