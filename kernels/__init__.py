"""Triton kernels, installed as ``purify_fast.kernels`` (one module per op family)."""
