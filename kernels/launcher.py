"""Launches of compiled Triton kernels with little host time.

``kernel[grid](*args, **kwargs)`` binds and specializes every argument, builds the cache
key and looks the compiled variant up on each call (``JITFunction.run``): tens of
microseconds per launch for kernels of some fifty parameters, a large share of a small
training step, which is bound by the host. :class:`DirectLauncher` launches through triton
the first time a variant is seen, keeps the compiled kernel triton returns, and launches
later calls of that variant with the compiled kernel's own launcher, as
``JITFunction.run`` itself ends.

A variant is keyed on everything triton specializes on: the keyword arguments (constexprs
and launch options, through a key the caller gives), the device, each argument's type, each
tensor's dtype and whether its address is a multiple of 16, and each int's width, whether
it is 1 and whether it is a multiple of 16 (ints below 16 by value). The key is at least as
fine as triton's, so a kept kernel is the one triton would pick.

A caller whose ``variant`` already fixes everything but the tensors' addresses (their shapes,
strides and dtypes, the ints passed) says so with ``fixed=True``: such a launch is keyed on
the variant, the device and the tensors' alignment only, and skips building the full key
but on the variant's first launch at each alignment. Its tensors come first among its
arguments, and reach the compiled kernel's launcher as the addresses read for the key: the
launcher takes an int as the address itself, where for a tensor it calls ``data_ptr`` and asks
the driver about the address (``cuPointerGetAttribute``) once per tensor. Under the interpreter,
with a launch hook installed (a profiler's), or with ``MTLFAST_DIRECT_LAUNCH=0``, every
launch goes through triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from math import gcd
from operator import attrgetter
from typing import Any

import torch

from .tiling import INTERPRETED

try:
    from triton import knobs
except ImportError:  # triton before 3.4: every launch goes through triton
    knobs = None

ENABLED = os.environ.get("MTLFAST_DIRECT_LAUNCH", "1") != "0" and not INTERPRETED and knobs is not None
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_data_ptr = torch.Tensor.data_ptr
_dtype = attrgetter("dtype")
FIXED_KEYS_KEPT = 1024


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side grids: ``triton.cdiv`` is a constexpr function whose call
    costs microseconds."""
    return -(-a // b)


def _int_widths(values: Sequence[int]) -> tuple[int, ...]:
    """Each int's width in triton's terms: 0 for int32, 1 for int64, 2 for uint64."""
    return tuple(0 if -(2**31) <= v < 2**31 else 1 if v < 2**63 else 2 for v in values)


def _hooks_installed() -> bool:
    """Whether a launch hook is installed (a chain of hooks with members, or a plain callable)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(enter is not None and getattr(enter, "calls", True) or leave is not None and getattr(leave, "calls", True))


class DirectLauncher:
    """``launcher(grid, args, kwargs, variant)`` runs ``kernel[grid](*args, **kwargs)``: ``grid``
    a tuple of ints, ``args`` the kernel's leading positional arguments (tensors, ints, floats,
    bools), ``kwargs`` the rest of its parameters (constexprs) and the launch options
    (``num_warps``, ``num_stages``), and ``variant`` a hashable that the caller derives from
    ``kwargs`` and that differs whenever they do."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self._compiled: dict[tuple, tuple[Any, Any, Any, tuple]] = {}  # launcher, function, metadata, constexprs
        self._positions: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # tensors', ints' by types
        self._current_stream: Callable[[int], int] | None = None
        self._fixed_tensors: dict[Hashable, int] = {}  # the number of (leading) tensors by fixed variant
        self._fixed: dict[tuple, tuple[Any, Any, Any, tuple]] = {}  # kept kernels by fixed key
        # Tests set this: every fixed launch checks that its full key and keyword arguments are the
        # ones first seen for its fixed key.
        self.check_fixed = False
        self._fixed_full_keys: dict[tuple, tuple[tuple, dict]] = {}

    def _key(self, variant: Hashable, args: Sequence[Any]) -> tuple:
        types = tuple(map(type, args))
        positions = self._positions.get(types)
        if positions is None:
            positions = self._positions[types] = (
                tuple(i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)),
                tuple(i for i, arg in enumerate(args) if isinstance(arg, int) and not isinstance(arg, bool)),
            )
        tensors = [args[i] for i in positions[0]]
        pointers = tuple(map(_data_ptr, tensors))
        aligned = not gcd(*pointers) % 16 or tuple(p % 16 == 0 for p in pointers)
        ints = [args[i] for i in positions[1]]
        # what triton specializes an int on: 0..15 by value (1 is a constant), larger ones by
        # whether 16 divides them; and its width
        classes = tuple(v if 0 <= v < 16 else 16 + (v % 16 != 0) for v in ints)
        wide = bool(ints) and (max(ints) >= 2**31 or min(ints) < -(2**31)) and _int_widths(ints)
        return variant, _current_device(), types, tuple(map(_dtype, tensors)), aligned, classes, wide

    def _fixed_key(self, variant: Hashable, args: Sequence[Any]) -> tuple[tuple, tuple[int, ...]]:
        """The fixed launch's key and the addresses of its leading tensors."""
        count = self._fixed_tensors.get(variant)
        if count is None:
            if len(self._fixed_tensors) >= FIXED_KEYS_KEPT:  # many shapes (dynamic lengths): start over
                self._fixed_tensors.clear()
                self._fixed.clear()
                self._fixed_full_keys.clear()
            count = next((i for i, arg in enumerate(args) if not isinstance(arg, torch.Tensor)), len(args))
            if any(isinstance(arg, torch.Tensor) for arg in args[count:]):
                raise ValueError(f"fixed launch variant {variant!r} passes a tensor after a non-tensor argument")
            self._fixed_tensors[variant] = count
        pointers = tuple(map(_data_ptr, args[:count]))
        aligned = not gcd(*pointers) % 16 or tuple(p % 16 == 0 for p in pointers)
        return (variant, _current_device(), aligned), pointers

    def __call__(self, grid: Sequence[int], args: Sequence[Any], kwargs: dict[str, Any], variant: Hashable,
                 fixed: bool = False) -> None:  # fmt: skip
        if not ENABLED or _hooks_installed():
            self.kernel[grid](*args, **kwargs)
            return
        if fixed:
            fixed_key, pointers = self._fixed_key(variant, args)
            kept = self._fixed.get(fixed_key)
            if kept is None or self.check_fixed:
                key = self._key(variant, args)
                if self._fixed_full_keys.setdefault(fixed_key, (key, kwargs)) != (key, kwargs):
                    raise AssertionError(f"fixed launch variant {variant!r} does not fix its arguments' specialization "
                                         "and its keyword arguments")  # fmt: skip
                kept = self._compiled.get(key) or self._launch_through_triton(grid, args, kwargs, key)
                if kept is None:  # launched through triton
                    return
                self._fixed[fixed_key] = kept
            args = (*pointers, *args[len(pointers) :])
        else:
            key = self._key(variant, args)
            kept = self._compiled.get(key) or self._launch_through_triton(grid, args, kwargs, key)
            if kept is None:
                return
        run, function, packed_metadata, constexprs = kept
        if self._current_stream is None:
            from triton.runtime import driver

            self._current_stream = driver.active.get_current_stream
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        run(grid[0], grid_1, grid_2, self._current_stream(_current_device()), function, packed_metadata, None, None, None,
            *args, *constexprs)  # fmt: skip

    def _launch_through_triton(self, grid: Sequence[int], args: Sequence[Any], kwargs: dict[str, Any], key: tuple):
        """Launches through triton, which compiles the variant on its first launch, and keeps the
        compiled kernel under ``key``; returns None (the launch is done)."""
        compiled = self.kernel[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # a compile future
            compiled = compiled.result()
        names = self.kernel.arg_names[len(args) :]
        if compiled is not None and all(name in kwargs for name in names):
            constexprs = tuple(kwargs[name] for name in names)
            self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, constexprs)
        return None
