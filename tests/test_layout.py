"""The style guide's "one op, one name, five places": kernel, reference, dispatcher, test, benchmark."""
import inspect
from pathlib import Path

import pytest

from fae_fast import _backend, ops, reference

ROOT = Path(__file__).resolve().parents[1]
OPS = sorted(_backend.IMPLS)


@pytest.mark.parametrize("op", OPS)
def test_reference_and_dispatcher_share_the_signature(op):
    ref = inspect.signature(getattr(reference, op))
    disp = inspect.signature(getattr(ops, op))
    disp_params = [p for name, p in disp.parameters.items() if name != "backend"]
    assert [p.name for p in ref.parameters.values()] == [p.name for p in disp_params]
    assert [p.kind for p in ref.parameters.values()] == [p.kind for p in disp_params]
    assert disp.parameters["backend"].default == "auto"


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_test_and_benchmark(op):
    assert (ROOT / "tests" / f"test_{op}.py").is_file(), f"tests/test_{op}.py missing"
    assert (ROOT / "bench" / f"bench_{op}.py").is_file(), f"bench/bench_{op}.py missing"


@pytest.mark.parametrize("op", OPS)
def test_every_fast_backend_has_its_source(op):
    impls = _backend.IMPLS[op]
    if "triton" in impls:
        assert (ROOT / "kernels" / f"{op}.py").is_file()
        assert impls["triton"] == f"fae_fast.kernels.{op}:{op}_triton"
    if "ext" in impls:
        assert (ROOT / "csrc" / "cpu" / f"{op}.cpp").is_file()
        assert (ROOT / "csrc" / "cuda" / f"{op}.cu").is_file()


def test_kernels_are_installed_as_a_subpackage():
    import fae_fast.kernels

    assert Path(fae_fast.kernels.__file__).resolve().parent == ROOT / "kernels"
