"""The serving tests: the server tests run only where PyTriton is installed (its own environment, built by
scripts/serve_ci.sh: PyTriton needs numpy<2); elsewhere they are not collected at all. The Triton repository
export needs no PyTriton (onnx + onnxruntime) and runs in the main suite too."""
import importlib.util
import socket

import pytest

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    collect_ignore_glob = ["test_server*.py"]


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ports():
    return {"grpc_port": free_port(), "http_port": free_port()}
