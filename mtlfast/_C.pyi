"""Type stub of the optional CUDA extension built from ``csrc/`` (absent on CPU-only installs).
Its op, ``torch.ops.mtlfast_C.accumulate_fp32_``, is registered with torch rather than here."""

def build_info() -> dict[str, object]: ...
