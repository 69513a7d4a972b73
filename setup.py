"""Builds only the C++/CUDA extension ``fae_fast._C``; all metadata is in pyproject.toml.

* C++ (CPU, OpenMP) always, unless ``FAE_FAST_NO_EXT=1``;
* CUDA sources too when torch has CUDA and a toolkit is found (``CUDA_HOME``), or ``FORCE_CUDA=1``.
It prints what it chose.

The extension only loads with the exact torch it was compiled against, so it must be built against the torch
installed where it will run: ``pip install --no-build-isolation -e .`` (what scripts/install.sh runs). Without
``--no-build-isolation`` pip builds in a fresh environment with whatever torch it downloads; this script refuses
that build when the downloaded torch differs from the installed one, instead of producing an extension that is
rejected at run time.
"""
import glob
import os
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FAE_FAST_NO_EXT", "0") not in ("", "0"):
        print("fae_fast setup: FAE_FAST_NO_EXT=1, building no extension", file=sys.stderr)
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpp:
        print("fae_fast setup: no C++ sources, building no extension", file=sys.stderr)
        return [], {}
    _check_build_torch()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    force = os.environ.get("FORCE_CUDA", "0") not in ("", "0")
    use_cuda = bool(cu) and (force or (torch.version.cuda is not None and CUDA_HOME is not None))
    omp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # No FMA contraction and no fast-math on either side: the CPU and CUDA kernels evaluate the same float
    # expressions (fae_common.h) and should agree to the last bits, and with the reference's operation order.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno"] + omp
    nvcc = ["-O3", "-std=c++20", "--fmad=false"]
    macros = [("FAE_FAST_TORCH_VERSION", f'"{torch.__version__}"'),
              ("FAE_FAST_CUDA_VERSION", f'"{torch.version.cuda or ""}"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        macros.append(("FAE_FAST_WITH_CUDA", None))
        ext = CUDAExtension("fae_fast._C", cpp + cu, define_macros=macros, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=omp)
    else:
        ext = CppExtension("fae_fast._C", cpp, define_macros=macros, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=omp)
    print(f"fae_fast setup: building fae_fast._C with {'C++ + CUDA' if use_cuda else 'C++ only (CPU)'} "
          f"against torch {torch.__version__} (CUDA {torch.version.cuda}, CUDA_HOME {CUDA_HOME})", file=sys.stderr)
    # ninja compiles the sources in parallel when it is installed; torch falls back to setuptools without it
    return [ext], {"build_ext": BuildExtension}


def _check_build_torch():
    """Exit with one clear message when the torch this build imports is not the torch installed outside it.

    pip's build isolation puts its own environment on ``PYTHONPATH``; ``python -E`` ignores it and sees the
    installed packages.
    """
    import importlib.metadata

    try:
        build = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # no torch, or one without metadata: `import torch` tells
        return
    probe = subprocess.run([sys.executable, "-E", "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                           capture_output=True, text=True, cwd=ROOT)
    installed = probe.stdout.strip() if probe.returncode == 0 else ""
    if not installed:
        print(f"fae_fast setup: warning: no torch is installed outside this build; building against torch {build}, "
              "the extension will load only with that exact torch", file=sys.stderr)
    elif installed != build:
        sys.exit(f"fae_fast setup: error: this build sees torch {build} (pip's isolated build environment) but torch "
                 f"{installed} is installed, and an extension built against {build} would not load with it; build "
                 "against the installed torch with `pip install --no-build-isolation -e .` (or without -e), or "
                 "set FAE_FAST_NO_EXT=1 to install without the extension")


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
