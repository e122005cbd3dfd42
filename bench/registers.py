"""``python -m mtlfast.bench.registers [--target sm90] [--compute bf16] [--generic] [--atomics]
[--levels-apart] [--every-candidate]``: the registers, stack (register spills) and shared
memory a thread block of the small-heads kernel takes with each autotuning candidate, in each
direction, and how many such programs, so how many rows, an SM holds at once. Compiled ahead
of time (no GPU needed) as the launcher specializes a workload with bf16 rows, D and row
strides multiples of 16 (``--generic``: as tests/test_kernels_compile.py checks spills, with
nothing known to be aligned), and read from the cubin with the cuobjdump that ships with
triton. The newer candidates were chosen with triton 3.8; a triton before 3.8 leaves out
those it spills with (``--every-candidate`` shows them), and older ones allocate registers
differently. The compile helpers serve tests/test_kernels_compile.py too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import triton
import triton.language as tl
from mtlfast.kernels import small_heads
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:  # triton < 3.3 describes argument properties with a class, later ones with a dict
    from triton.backends.compiler import AttrsDescriptor
except ImportError:
    AttrsDescriptor = None

# The candidates were chosen with the compilers of triton 3.6 (GPU hosts) and, the newer ones,
# 3.8 (CI); a triton before 3.8 leaves out those it spills with (SPILL_BEFORE_TRITON_3_8).
TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}
# Older GPUs the candidates are not chosen for, on which the kernels must still compile: V100
# (sm_70) and T4 (sm_75).
OLDER_TARGETS = {"sm70": GPUTarget("cuda", 70, 32), "sm75": GPUTarget("cuda", 75, 32)}
# The A10, L4 and RTX 30/40 cards (sm_86, sm_89): an A100's instructions, less shared memory.
SMALL_SHARED_TARGETS = {"sm86": GPUTarget("cuda", 86, 32)}
ALL_TARGETS = {**TARGETS, **OLDER_TARGETS, **SMALL_SHARED_TARGETS}
# Opt-in shared memory per block: V100, T4, A100 (sm_80), sm_86/sm_89 cards and H100/H200 (sm_90).
SHARED_BYTES = {"sm70": 98304, "sm75": 65536, "sm80": 166912, "sm86": 101376, "sm90": 232448}
# Per SM on sm_80 and sm_90: registers, threads, shared memory, and the 1 KB of it the driver
# keeps per block.
SM_REGISTERS = 65536
SM_THREADS = 2048
SM_SHARED_BYTES = {"sm80": 167936, "sm90": 233472}
BLOCK_RESERVED_SHARED = 1024

DOT_TYPES = {"*fp32": tl.float32, "*fp16": tl.float16, "*bf16": tl.bfloat16}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_for(target: str, fn, pointers: dict[str, str], constexprs: dict, fits: bool = True,
                aligned: tuple[str, ...] = (), **options):  # fmt: skip
    """Compiles ``fn``: arguments named in ``pointers`` get those types, the other
    non-constexpr arguments are i32 scalars; those in ``aligned`` are taken as multiples of 16,
    as the launcher specializes them on a GPU when they are. With ``fits``, checks that the
    kernel fits the shared memory (autotuning skips configurations that do not, so only the
    ones that run untuned must)."""
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names
    }  # fmt: skip
    indices = [fn.arg_names.index(name) for name in aligned]
    if AttrsDescriptor is None:
        attrs = {(i,): [["tt.divisibility", 16]] for i in indices}
    else:
        attrs = AttrsDescriptor.from_hints({i: 16 for i in indices})
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=ALL_TARGETS[target], options=options)
    assert not fits or kernel.metadata.shared <= SHARED_BYTES[target], (fn.__name__, kernel.metadata.shared)
    return kernel


def small_heads_pointers(compute: str, rows: str | None = None) -> dict[str, str]:
    """Pointer types; the hidden/pooled rows and their gradients in ``rows`` (default: ``compute``)."""
    rows = rows or compute
    pointers = {name: "*fp32" for name in small_heads.small_heads_kernel.arg_names if name.endswith("_ptr")}
    pointers.update({"h_ptr": rows, "p_ptr": rows, "dh_ptr": rows, "dp_ptr": rows,
                     "slot_int_ptr": "*i32", "group_segments_ptr": "*i32", "target_table_ptr": "*i64",
                     "mask_ptr": "*u8"})  # fmt: skip
    return pointers


def small_heads_constexprs(config, block_c: int, backward: bool, partials: bool, compute: str,
                           write_dh: bool = True, class_weights: bool = False, capped: bool = False,
                           levels_apart: bool = False) -> dict:  # fmt: skip
    """``capped``: some task has a softcap and some a z-loss. Backward writes dH with the fp32
    scratch, with partials starting from other paths' dH; with ``levels_apart`` (the sequence
    tasks' groups apart, bert-base-4task's plan) from nothing, the scratch a row per sequence row,
    and with partials the sequence groups' dW rows by row block."""
    write_dh = backward and write_dh
    return dict(config.kwargs, BLOCK_C=block_c, SLOT_FIELDS=small_heads.SLOT_FIELDS,
                SLOT_FLT_FIELDS=small_heads.SLOT_FLT_FIELDS, BACKWARD=backward,
                PARTIALS=partials, HAS_MASK=True, WRITE_DH=write_dh, HAS_DH_INIT=write_dh and partials and not levels_apart,
                USE_DH_ACC=write_dh, SPLIT_LEVELS=levels_apart, DH_ACC_BY_SEQ_ROW=write_dh and levels_apart,
                SEQ_DW_BY_BLOCK=backward and partials and levels_apart,
                DOT=DOT_TYPES[compute], PRECISION="tf32x3" if compute == "*fp32" else "ieee",
                CLASS_WEIGHTS=class_weights, SOFTCAP=capped, Z_LOSS=capped)  # fmt: skip


SMALL_HEADS_ALIGNED = tuple(name for name in small_heads.small_heads_kernel.arg_names
                            if name.endswith("_ptr") or name in ("stride_hn", "stride_pn", "stride_wc", "stride_dhn",
                                                                  "stride_dpn", "D"))  # fmt: skip


def small_heads_as_launched(target: str, compute: str, block_c: int, config, backward: bool, fits: bool = True,
                            aligned: bool = True, partials: bool = True, rows: str | None = None,
                            **flags):  # fmt: skip
    """The small-heads kernel as the launcher specializes it for an aligned workload (pointers,
    D and row strides multiples of 16, unit strides constant), by default with deterministic
    partials; with ``aligned=False`` as for any workload, nothing known to be aligned. ``rows``
    is the type of the rows (default: ``compute``), ``flags`` those of :func:`small_heads_constexprs`."""
    constexprs = small_heads_constexprs(config, block_c, backward, partials, compute, **flags)
    if aligned:
        constexprs.update(stride_hd=1, stride_pd=1, stride_wd=1)
    return compile_for(target, small_heads.small_heads_kernel, small_heads_pointers(compute, rows), constexprs,
                       fits=fits, aligned=SMALL_HEADS_ALIGNED if aligned else (), num_warps=config.num_warps,
                       num_stages=config.num_stages)  # fmt: skip


def small_heads_candidate(target: str, block_c: int, n: int, backward: bool, partials: bool, compute: str,
                          rows: str | None = None, **flags):  # fmt: skip
    """Candidate ``n`` of width ``block_c`` compiled as the spill checks compile it
    (:func:`small_heads_as_launched` with nothing known to be aligned); the untuned first one
    must fit the shared memory of every GPU."""
    return small_heads_as_launched(target, compute, block_c, small_heads.configs_for(block_c, backward)[n], backward,
                                   fits=n == 0, aligned=False, partials=partials, rows=rows, **flags)  # fmt: skip


def _into_cache(job: dict) -> None:
    try:
        small_heads_candidate(**job)
    except Exception:  # the caller compiles each job again and meets its failure there
        pass


def compile_candidates_on_every_core(jobs: list[dict]) -> None:
    """Compiles :func:`small_heads_candidate` for every job (its keyword arguments) in processes
    of their own, one per core, into triton's on-disk cache: a later compile of a job in this
    process reads it back. Compiling (LLVM, ptxas) takes one core; nothing is returned, and a
    worker that dies leaves the rest to the caller."""
    workers = min(os.cpu_count() or 1, len(jobs))
    if workers < 2:
        return
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_into_cache, jobs))
    except BrokenProcessPool:
        pass


def resource_usage(kernel) -> tuple[int, int]:
    """``(registers, stack bytes)`` per thread of a compiled kernel (register spills land on the
    stack), read from its cubin with :data:`CUOBJDUMP`."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as cubin:
            cubin.write(kernel.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no register and stack use: {usage!r}")
    registers, stack = found.groups()
    return int(registers), int(stack)


def programs_per_sm(target: str, registers: int, num_warps: int, shared: int) -> int:
    """Thread blocks an SM holds at once, by registers (allocated per warp in units of 256,
    so a thread's count rounds up to a multiple of 8), by threads and by shared memory."""
    by_registers = SM_REGISTERS // (-(-registers // 8) * 8 * 32 * num_warps)
    by_shared = SM_SHARED_BYTES[target] // (shared + BLOCK_RESERVED_SHARED)
    return min(by_registers, SM_THREADS // (32 * num_warps), by_shared)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mtlfast.bench.registers")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: sm80 and sm90")
    parser.add_argument("--compute", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--generic", action="store_true", help="nothing known to be aligned, as the spill tests compile")
    parser.add_argument("--atomics", action="store_true", help="float atomics, not deterministic partials")
    parser.add_argument("--every-candidate", action="store_true",
                        help="those this triton leaves out for spilling too (small_heads.SPILL_BEFORE_TRITON_3_8)")
    parser.add_argument("--levels-apart", action="store_true",
                        help="the variant of a plan that keeps the sequence tasks' groups apart (bert-base-4task's); "
                             "by default backward starts from other paths' dH (a vocabulary head's)")  # fmt: skip
    args = parser.parse_args()
    compute = "*" + args.compute
    print(f"triton {triton.__version__}, {args.compute}, {'generic' if args.generic else 'as launched (aligned)'}, "
          f"{'atomics' if args.atomics else 'partials'}{', levels apart' if args.levels_apart else ''}"
          f"{', every candidate' if args.every_candidate else ''}")  # fmt: skip
    print("target width direction (BLOCK_M, BLOCK_K, warps, stages[, BLOCK_K_LOGITS[, 1]]) registers stack shared programs/SM "
          "rows/SM")
    for target in args.target or sorted(TARGETS):
        for block_c in small_heads.SHAPES_BY_BLOCK_C:
            for backward in (False, True):
                for config in small_heads.configs_for(block_c, backward, args.every_candidate):
                    kernel = small_heads_as_launched(target, compute, block_c, config, backward, fits=False,
                                                     aligned=not args.generic, partials=not args.atomics,
                                                     levels_apart=args.levels_apart)  # fmt: skip
                    registers, stack = resource_usage(kernel)
                    shared = kernel.metadata.shared
                    programs = programs_per_sm(target, registers, config.num_warps, shared)
                    shape = small_heads._shape(config)
                    print(target, block_c, "backward" if backward else "forward", shape, registers, stack, shared,
                          programs, programs * shape[0], flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
