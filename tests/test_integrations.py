"""fae_fast.integrations: importing fae_fast never imports a framework; a missing framework is one clear error.

Runs in the main environment and again in the anomalib job's environment (scripts/anomalib_ci.sh), where
anomalib, Lightning and torchvision are installed and an eager import would show up, and in the serving job's
(scripts/serve_ci.sh), where PyTriton and tritonclient are.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("anomalib", "lightning", "pytorch_lightning", "torchvision", "pytriton", "tritonclient")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_import_fae_fast_imports_no_framework():
    code = ("import sys, fae_fast, fae_fast.integrations, fae_fast.serving, fae_fast.serving.schema; "
            "fae_fast.Detector; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import fae_fast pulled in {r.stdout.strip()}"


@pytest.mark.skipif(importlib.util.find_spec("anomalib") is not None, reason="anomalib is installed here")
def test_anomalib_adapter_without_anomalib_names_the_extra():
    r = _run("import fae_fast.integrations.anomalib")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fae_fast.integrations.anomalib needs anomalib 2.x") \
        and "fae_fast[anomalib]" in last, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is not None, reason="PyTriton is installed here")
def test_serving_without_pytriton_names_the_extra():
    r = _run("import fae_fast.serving.server")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fae_fast.serving.server needs PyTriton") and "fae_fast[serve]" in last, \
        r.stderr
    r = _run("from fae_fast.cli import main; import sys; sys.exit(main(['serve', '--model', 'tests/__init__.py']))")
    assert r.returncode == 2 and "fae-fast serve: error: fae_fast.serving.server needs PyTriton" in r.stderr, r.stderr
