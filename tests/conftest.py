"""Test configuration. TRITON_INTERPRET must be set before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


BSDATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bsdata", "bsd_type2")


@pytest.fixture
def bsdata_dir():
    """Path of the real BSData category beside the checkout; skips cleanly when it is absent."""
    path = os.path.abspath(BSDATA)
    if not os.path.isdir(os.path.join(path, "train", "good")):
        pytest.skip(f"BSData not found at {path}")
    return path


@pytest.fixture(scope="module")
def ext():
    """The loaded extension module ``fae_fast._ext``; skips with the reason when it is not built or disabled."""
    try:
        from fae_fast import _ext
    except ImportError as exc:
        pytest.skip(f"compiled extension fae_fast._C not available: {exc}")
    return _ext
