"""Triton kernels of fae_fast, installed as ``fae_fast.kernels``.

Import a kernel module only through :mod:`fae_fast._backend` (or directly in tests): importing this package
never imports Triton.
"""
