"""Adapters that plug fae_fast into other frameworks.

Each adapter is a subpackage imported only on request (``from fae_fast.integrations.anomalib import Fae``):
``import fae_fast`` never imports a framework (anomalib alone takes ~18 s and pulls torchvision and Lightning).
"""
