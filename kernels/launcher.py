"""Launches of compiled Triton kernels with little host time.

``kernel[grid](*args, **kwargs)`` binds and specializes every argument, builds the cache
key and looks the compiled variant up on each call (``JITFunction.run``): tens of
microseconds per launch for kernels of some fifty parameters, a large share of a small
training step, which is bound by the host. :class:`DirectLauncher` launches through triton
the first time a variant is seen, keeps the compiled kernel triton returns, and launches
later calls of that variant with the compiled kernel's own launcher, as
``JITFunction.run`` itself ends.

A variant is keyed on everything triton specializes on: each tensor's dtype and whether its
address is a multiple of 16, each int's width, whether it is 1 and whether it is a multiple
of 16, the None-ness of arguments, the keyword arguments (constexprs and launch options)
and the device. The key is at least as fine as triton's, so a kept kernel is the one triton
would pick. Under the interpreter, with a launch hook installed (a profiler's), or with
``MTLFAST_DIRECT_LAUNCH=0``, every launch goes through triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .tiling import INTERPRETED

try:
    from triton import knobs
except ImportError:  # triton before 3.4: every launch goes through triton
    knobs = None

ENABLED = os.environ.get("MTLFAST_DIRECT_LAUNCH", "1") != "0" and not INTERPRETED and knobs is not None
_INT32 = (-(2**31), 2**31 - 1)


def _arg_key(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, _INT32[0] <= arg <= _INT32[1], arg > 2**63 - 1
    return type(arg)


def _hooks_installed() -> bool:
    """Whether a launch hook is installed (a chain of hooks with members, or a plain callable)."""
    runtime = knobs.runtime
    return any(hook is not None and getattr(hook, "calls", True) for hook in
               (runtime.launch_enter_hook, runtime.launch_exit_hook))  # fmt: skip


class DirectLauncher:
    """``launcher(grid, args, kwargs)`` runs ``kernel[grid](*args, **kwargs)``: ``grid`` a tuple
    of ints, ``args`` the kernel's leading positional arguments, ``kwargs`` the rest of its
    parameters (constexprs) and the launch options (``num_warps``, ``num_stages``)."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self._compiled: dict[tuple, tuple[Any, Any, Any, tuple]] = {}  # launcher, function, metadata, constexprs
        self._current_stream: Callable[[int], int] | None = None

    def __call__(self, grid: Sequence[int], args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        if not ENABLED or _hooks_installed():
            self.kernel[grid](*args, **kwargs)
            return
        device = torch.cuda.current_device()
        key = (device, *kwargs.items(), *map(_arg_key, args))
        kept = self._compiled.get(key)
        if kept is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if hasattr(compiled, "result"):  # a compile future
                compiled = compiled.result()
            names = self.kernel.arg_names[len(args) :]
            if compiled is not None and all(name in kwargs for name in names):
                constexprs = tuple(kwargs[name] for name in names)
                self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, constexprs)
            return
        run, function, packed_metadata, constexprs = kept
        if self._current_stream is None:
            from triton.runtime import driver

            self._current_stream = driver.active.get_current_stream
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        run(grid[0], grid_1, grid_2, self._current_stream(device), function, packed_metadata, None, None, None, *args,
            *constexprs)  # fmt: skip
