# The two commands of the README: `make demo` and `make test`.
PY ?= python3
export PYTHON := $(PY)

.PHONY: install install-test demo test bench gpu-check clean

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test

demo: install
	fae-fast demo --out demo_out

# scripts/test.sh: the CPU suite (Triton through its interpreter), every benchmark once with timing disabled, the
# fallback run without the compiled extension, then anomalib and Triton serving in their own venvs (built in the
# background meanwhile); fails loudly if a venv cannot be built
test: install-test
	bash scripts/test.sh

bench:
	$(PY) -m pytest bench -o python_files='bench_*.py' --benchmark-json=bench/results/latest.json

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build *.egg-info fae_fast/*.so demo_out
