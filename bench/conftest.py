"""Benchmark configuration shared by every bench/bench_<op>.py.

Run: ``python -m pytest bench -o python_files='bench_*.py' --benchmark-json=bench/results/<name>.json``.
CI runs them once with ``--benchmark-disable`` so none rots. Every benchmark records the machine, versions,
dtype and git sha in ``extra_info`` (fixture ``bench_info``); time GPU work with :func:`sync` inside the
timed call.
"""
import os

import pytest
import torch

# importing torch does not import triton: on a CPU-only machine the kernels run through the interpreter
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from bench._common import machine_info  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="session")
def machine():
    """The machine and versions, read once per session (the commit takes two git calls)."""
    return machine_info()


@pytest.fixture
def bench_info(benchmark, machine):
    """Fills benchmark.extra_info with the machine and versions; returns the dict for op-specific keys."""
    benchmark.extra_info.update(machine)
    return benchmark.extra_info


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
