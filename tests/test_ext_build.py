"""Loading the C++ extension: fallback with one warning naming versions, FAE_FAST_STRICT, version mismatch.

The fallback runs in subprocesses (environment variables are read at import and the registry caches what it
loaded), so each case sees a fresh interpreter.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fae_fast import _ext_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full = dict(os.environ)
    for k in ("FAE_FAST_NO_EXT", "FAE_FAST_STRICT", "FAE_FAST_BACKEND"):
        full.pop(k, None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


_FALLBACK = """
import warnings, torch
from fae_fast import ops, reference
{prelude}
mask = torch.rand(2, 1, 12, 12)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    out = ops.elastic_warp(mask, 1.0, 2.0, seed=3)
    ops.elastic_warp(mask, 1.0, 2.0, seed=3)
    strokes = ops.rasterize_strokes(torch.rand(2, 2, 4, 2) * 12, torch.ones(2, 2), 12, 12)
print("BACKEND", ops.last_backend("elastic_warp"), ops.last_backend("rasterize_strokes"))
print("EQUAL", torch.equal(out, reference.elastic_warp(mask, torch.ones(2), torch.full((2,), 2.0), 3)))
msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
print("NWARN", len(msgs))
for m in msgs:
    print("WARN", m)
"""


def test_no_ext_falls_back_with_one_warning():
    r = _run(_FALLBACK.format(prelude=""), FAE_FAST_NO_EXT="1")
    assert r.returncode == 0, r.stderr
    assert "BACKEND torch torch" in r.stdout
    assert "EQUAL True" in r.stdout  # the fallback is the reference itself
    assert "NWARN 1" in r.stdout, r.stdout  # one warning for both ops and both calls
    warn = r.stdout.split("WARN ", 2)[-1]
    assert "FAE_FAST_NO_EXT=1" in warn
    assert f"run-time torch {torch.__version__}" in warn
    assert "build-time torch" in warn or "not built" in warn


def test_unloadable_extension_warning_says_how_to_build_it():
    # as when the binary is missing or has undefined symbols after a torch upgrade
    prelude = "import sys; sys.modules['fae_fast._C'] = None  # makes `from . import _C` fail"
    r = _run(_FALLBACK.format(prelude=prelude))
    assert r.returncode == 0, r.stderr
    assert "BACKEND torch torch" in r.stdout and "NWARN 1" in r.stdout, r.stdout
    warn = r.stdout.split("WARN ", 2)[-1]
    assert "fae_fast._C cannot be loaded" in warn and f"run-time torch {torch.__version__}" in warn
    assert f"{sys.executable} -m pip install --no-build-isolation -e {ROOT}" in warn, warn


def test_strict_turns_the_fallback_into_an_error():
    r = _run(_FALLBACK.format(prelude=""), FAE_FAST_NO_EXT="1", FAE_FAST_STRICT="1")
    assert r.returncode != 0
    assert "BackendUnavailable" in r.stderr and "FAE_FAST_STRICT=1" in r.stderr
    assert f"run-time torch {torch.__version__}" in r.stderr


def test_explicit_ext_backend_raises_when_disabled():
    r = _run("""
        import torch
        from fae_fast import ops
        try:
            ops.elastic_warp(torch.rand(1, 1, 4, 4), 1.0, 1.0, seed=0, backend="ext")
        except Exception as exc:
            print("RAISED", type(exc).__name__, exc)
    """, FAE_FAST_NO_EXT="1")
    assert "RAISED BackendUnavailable" in r.stdout and "FAE_FAST_NO_EXT=1" in r.stdout, r.stdout + r.stderr


def test_check_versions_names_both_sides():
    _ext_status.check_versions("2.13.0+cu130", "13.0", "2.13.0+cu130", "13.0")  # equal: no error
    with pytest.raises(ImportError) as info:
        _ext_status.check_versions("2.12.0+cu128", "12.8", "2.13.0+cu130", "13.0")
    msg = str(info.value)
    assert "built against torch 2.12.0+cu128, CUDA 12.8" in msg and "runs torch 2.13.0+cu130, CUDA 13.0" in msg
    with pytest.raises(ImportError, match="CUDA none"):
        _ext_status.check_versions("2.13.0", "", "2.13.0", "13.0")


def test_describe_without_loading():
    line = _ext_status.describe()
    assert f"run-time torch {torch.__version__}" in line
    assert "build-time torch" in line or "not built" in line


def _built_or_skip():
    if _ext_status.library_path() is None:
        pytest.skip("fae_fast._C is not built (python setup.py build_ext --inplace)")
    if os.environ.get("FAE_FAST_NO_EXT", "0") not in ("", "0"):
        pytest.skip("FAE_FAST_NO_EXT=1 disables the extension in this run")


@pytest.mark.ext
def test_build_info_read_from_binary_matches_module():
    _built_or_skip()
    from fae_fast import _C, _ext

    info = _ext_status.build_info()
    assert info["torch"] == _C.torch_version == torch.__version__
    assert info["with_cuda"] == bool(_C.with_cuda)
    assert _ext.device_supported(torch.device("cpu"))
    assert _ext.device_supported(torch.device("cuda")) == bool(_C.with_cuda)
    assert f"build-time torch {torch.__version__}" in _ext.describe()


@pytest.mark.ext
def test_version_mismatch_falls_back_naming_both_versions():
    _built_or_skip()
    prelude = "torch.__version__ = '0.0.1+fake'  # as if torch had been upgraded after the build"
    r = _run(_FALLBACK.format(prelude=prelude))
    assert r.returncode == 0, r.stderr
    assert "BACKEND torch torch" in r.stdout and "NWARN 1" in r.stdout, r.stdout
    warn = r.stdout.split("WARN ", 2)[-1]
    assert "runs torch 0.0.1+fake" in warn
    assert f"built against torch {_ext_status.build_info()['torch']}" in warn
    assert "pip install --no-build-isolation -e" in warn  # the warning says how to fix it


# ---- building against the installed torch (issue 11: the GPU machine build)

def _setup_py(tmp_path, pythonpath=None):
    env = dict(os.environ)
    for k in ("FAE_FAST_NO_EXT", "FORCE_CUDA", "PYTHONNOUSERSITE"):
        env.pop(k, None)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_setup_refuses_an_isolated_build_with_another_torch(tmp_path):
    # what pip's build isolation does: its own environment, with the torch it downloaded, first on PYTHONPATH
    env_dir = tmp_path / "pip-build-env"
    (env_dir / "torch").mkdir(parents=True)
    (env_dir / "torch" / "__init__.py").write_text("__version__ = '9.9.9+downloaded'\n")
    dist = env_dir / "torch-9.9.9+downloaded.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 9.9.9+downloaded\n")
    r = _setup_py(tmp_path, pythonpath=env_dir)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    from importlib.metadata import version

    assert "sees torch 9.9.9+downloaded" in err and f"torch {version('torch')} is installed" in err, r.stderr
    assert "pip install --no-build-isolation -e ." in err
    assert "Traceback" not in r.stderr


def test_setup_accepts_the_installed_torch(tmp_path):
    r = _setup_py(tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"against torch {torch.__version__}" in r.stderr


def test_fix_command_names_no_build_isolation_and_this_checkout():
    cmd = _ext_status.fix_command()
    assert "-m pip install --no-build-isolation -e" in cmd and cmd.endswith(ROOT)
    assert sys.executable in cmd


def test_ext_status_never_imports_ext():
    r = _run("""
        import sys, torch
        from fae_fast import _ext_status
        print("SUPPORTED", _ext_status.device_supported(torch.device("cpu")))
        print("IMPORTED", "fae_fast._ext" in sys.modules, "fae_fast._C" in sys.modules)
    """)
    assert "SUPPORTED False" in r.stdout and "IMPORTED False False" in r.stdout, r.stdout + r.stderr
    import ast

    src = open(os.path.join(ROOT, "fae_fast", "_ext_status.py")).read()
    imported = {a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "_ext" not in imported  # one direction only: _ext imports _ext_status
