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

# The CPU test suite (Triton through its interpreter), then every benchmark once with timing disabled so none
# rots, then the fallback run without the compiled extension.
test: install-test
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q bench -o python_files='bench_*.py' --benchmark-disable
	TRITON_INTERPRET=1 FAE_FAST_NO_EXT=1 $(PY) -m pytest -q tests -m "not slow" -k "elastic or stroke or corrupt or backend"
	# the anomalib integration in its own venv (torch 2.14.1 + torchvision 0.29.1 + anomalib 2.7.0, git-ignored
	# .venv-anomalib/): fails loudly if that venv cannot be built
	bash scripts/anomalib_ci.sh
	# Triton serving in its own venv (PyTriton 0.7.0 needs numpy<2; git-ignored .venv-serve/, CPU torch 2.13.0):
	# real servers on loopback; fails loudly if that venv cannot be built
	bash scripts/serve_ci.sh

bench:
	$(PY) -m pytest bench -o python_files='bench_*.py' --benchmark-json=bench/results/latest.json

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build *.egg-info fae_fast/*.so demo_out
