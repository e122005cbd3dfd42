"""Triton kernels of the fused heads (installed as ``mtlfast.kernels``)."""
