"""bf16 in triton's interpreter, made right for the tests.

Triton's interpreter holds a bf16 tensor as its raw bits (numpy has no bf16: uint16), and gets
two things wrong with them (triton 3.6 and 3.8):

- its ``tl.dot`` multiplies the bits as integers: garbage;
- its fp32 -> bf16 cast (``x.to(tl.bfloat16)``) truncates, where a GPU rounds to nearest even.

:func:`emulate_bf16` mends both in this process. A bf16 operand of ``tl.dot`` becomes fp32
first, exactly (bf16 is fp32 with its low 16 bits zero), and the interpreter's own fp32 product
follows: every product of two bf16 values is exact in fp32 and the sums are fp32, as in a GPU's
bf16 MMA but for the order of the sums. A cast from fp32 to bf16 with the default rounding (or
asked to round to nearest even) rounds to nearest even, NaN kept NaN, as torch and a GPU do.
With that, the kernels' bf16 paths run against the float64 oracle on the CPU.
"""

import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def _bf16_bits_as_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _fp32_as_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


def emulate_bf16() -> bool:
    """Installs both mends in this process (once); False where this triton's interpreter lacks what
    they build on."""
    builder = getattr(interpreter, "InterpreterBuilder", None)
    plain_dot = getattr(builder, "create_dot", None)
    plain_convert = getattr(interpreter, "_convert_float", None)
    if plain_dot is None or plain_convert is None or not hasattr(interpreter, "TensorHandle"):
        return False
    if getattr(plain_dot, "emulates_bf16", False):
        return True
    nearest_even = getattr(getattr(interpreter, "_ir", None), "ROUNDING_MODE", None)
    nearest_even = getattr(nearest_even, "RTNE", None)

    def as_fp32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle(_bf16_bits_as_fp32(handle.data), tl.float32)

    def create_dot(self, a, b, d, *options):
        return plain_dot(self, as_fp32(a), as_fp32(b), d, *options)

    def convert_float(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode in (None, nearest_even):
            return _fp32_as_bf16_bits(values.view(np.float32)).reshape(values.shape)
        return plain_convert(values, input_dtype, output_dtype, rounding_mode)

    create_dot.emulates_bf16 = True
    builder.create_dot = create_dot
    interpreter._convert_float = convert_float
    return True
