"""Builds only the C++/CUDA extension ``fae_fast._C``; all metadata is in pyproject.toml.

* C++ (CPU, OpenMP) always, unless ``FAE_FAST_NO_EXT=1``;
* CUDA sources too when torch has CUDA and a toolkit is found (``CUDA_HOME``), or ``FORCE_CUDA=1``.
It prints what it chose.
"""
import glob
import os
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
