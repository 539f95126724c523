"""Kernels: pure-torch references (reference.py) and the device-agnostic Triton mailbox
kernels (CUDA, Intel XPU) that are tested against them."""
