"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (front end, LLVM and ptxas,
no GPU needed), with each of its autotuning configurations and the variants the backend
launches, and with its untuned configuration for sm_70, sm_75 and sm_86 (V100, T4, A10). The
interpreter tests check what the kernels compute; this catches what only the real compiler
rejects (unsupported constructs, register or shared-memory overflow)."""

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from mtlfast.bench.registers import (  # noqa: E402
    CUOBJDUMP,
    OLDER_TARGETS,
    TARGETS,
    compile_candidates_on_every_core,
    compile_for,
    programs_per_sm,
    small_heads_as_launched,
    small_heads_candidate,
)
from mtlfast.bench.registers import resource_usage as cubin_resource_usage  # noqa: E402
from mtlfast.kernels import filtered_matmul, label_check, large_ce, loss_finalize, small_heads  # noqa: E402

from mtlfast.backends import READS_FP32_ROWS, TRITON_VERSION, triton_fused  # noqa: E402

COMPUTE_DTYPES = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}


def resource_usage(kernel) -> tuple[int, int]:
    """:func:`mtlfast.bench.registers.resource_usage`; skips the calling test, after its compile
    checks, where cuobjdump is missing or triton is older than 3.6 (older versions allocate
    registers differently, so register use is checked from 3.6 on)."""
    if not os.path.exists(CUOBJDUMP):
        pytest.skip(f"compiled; no {CUOBJDUMP} to read register use with")
    if TRITON_VERSION < (3, 6):
        pytest.skip(f"compiled; register use is checked with triton >= 3.6, not {triton.__version__}")
    return cubin_resource_usage(kernel)


def _variants():
    """(BLOCK_C, candidate index, backward, partials, compute dtype): every candidate of every
    head-group width, both directions, alternating partials and atomics."""
    variants = []
    for block_c in small_heads.SHAPES_BY_BLOCK_C:
        for backward in (False, True):
            for n in range(len(small_heads.shapes_for(block_c, backward))):
                compute = "*fp32" if n == 0 and block_c == 16 else "*bf16"
                variants.append((block_c, n, backward, (n + backward) % 2 == 0, compute))
    return variants


# The kernel variants of each small-heads candidate that test_small_heads_variants_compile checks.
VARIANT_FLAGS = {"fp32-rows": {"rows": "*fp32"}, "class-weights": {"class_weights": True},
                 "softcap-z-loss": {"capped": True}, "levels-apart": {"levels_apart": True}}  # fmt: skip


def _variant_jobs(target: str, block_c: int, backward: bool, variant: str) -> list[dict]:
    """:func:`small_heads_candidate`'s arguments for every candidate of a width and direction in
    one of the VARIANT_FLAGS variants (bf16 products, partials in backward, atomics in forward)."""
    return [dict(target=target, block_c=block_c, n=n, backward=backward, partials=backward, compute="*bf16",
                 **VARIANT_FLAGS[variant]) for n in range(len(small_heads.shapes_for(block_c, backward)))]  # fmt: skip


@pytest.fixture(scope="module")
def candidates_compiled_on_every_core():
    """The candidates' compiles, most of this file's time on a fresh triton cache, first on
    every core; each test then reads its kernel back from triton's cache."""
    fields = ("block_c", "n", "backward", "partials", "compute")
    jobs = [dict(zip(fields, variant), target=target) for target in sorted(TARGETS) for variant in _variants()]
    variants = [v for v in VARIANT_FLAGS if v != "fp32-rows" or READS_FP32_ROWS["triton"]]
    jobs += [job for target, block_c, backward, variant in
             itertools.product(sorted(TARGETS), small_heads.SHAPES_BY_BLOCK_C, (False, True), variants)
             for job in _variant_jobs(target, block_c, backward, variant)]  # fmt: skip
    compile_candidates_on_every_core(jobs)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("variant", _variants(), ids=lambda v: "C{}-cfg{}-{}-{}-{}".format(
    v[0], v[1], "bwd" if v[2] else "fwd", "partials" if v[3] else "atomics", v[4][1:]))  # fmt: skip
def test_small_heads_candidates_compile_without_spills(candidates_compiled_on_every_core, target, variant):
    """Every autotuning candidate compiles and keeps its tiles in registers (a few bytes of stack
    at most; the candidates before this check spilled up to 11 KB per thread); the untuned
    first candidate of each width spills nothing and fits the shared memory of every GPU."""
    n = variant[1]
    registers, stack = resource_usage(small_heads_candidate(target, *variant))
    assert stack <= (0 if n == 0 else 32), (registers, stack)


def test_older_tritons_leave_out_the_candidates_they_spill_with(monkeypatch):
    """Triton before 3.8 tunes over every candidate but those named in
    ``SPILL_BEFORE_TRITON_3_8``, each a candidate of its width and direction and never the
    untuned first one; 3.8 keeps them all."""
    spilling = small_heads.SPILL_BEFORE_TRITON_3_8
    for version, left_out in [((3, 6), spilling), ((3, 8), {})]:
        monkeypatch.setattr(small_heads, "TRITON_VERSION", version)
        for block_c in small_heads.SHAPES_BY_BLOCK_C:
            for backward in (False, True):
                every = small_heads.shapes_for(block_c, backward, every_triton=True)
                named = left_out.get((block_c, backward), ())
                assert set(named) <= set(every[1:]), (block_c, backward, named)
                assert small_heads.shapes_for(block_c, backward) == [s for s in every if s not in named]
    assert sum(map(len, spilling.values())) > 0


def _compile_reduce(target: str, accumulate: bool):
    pointers = {"dw_part_ptr": "*fp32", "db_part_ptr": "*fp32", "slot_row_ptr": "*i32", "slot_index_ptr": "*i32",
                "dw_ptr": "*fp32", "db_ptr": "*fp32"}  # fmt: skip
    constexprs = {"BLOCK_P": small_heads.REDUCE_BLOCK_P, "BLOCK_D": small_heads.REDUCE_BLOCK_D, "ACCUMULATE": accumulate}
    return compile_for(target, small_heads.small_heads_reduce_kernel, pointers, constexprs, num_warps=4)


def _compile_loss_finalize(target: str, check: bool = False, has_mask: bool = False):
    """The loss finalize alone (the check's pointers passed as ints, as the launch passes them), or
    with ``validate=True``'s label check in programs of its own."""
    check_pointers = {"target_table_ptr": "*i64", "check_spec_ptr": "*i64", "mask_ptr": "*i1" if has_mask else "*i64",
                      "flags_ptr": "*i32"}  # fmt: skip
    pointers = {name: "*fp32" for name in loss_finalize.loss_finalize_kernel.arg_names
                if name.endswith("_ptr") and name not in check_pointers}  # fmt: skip
    if check:
        pointers.update(check_pointers)
    constexprs = {"BLOCK_T": 64, "CHECK": check, "HAS_MASK": has_mask, "CHECK_BLOCK": label_check.BLOCK}
    return compile_for(target, loss_finalize.loss_finalize_kernel, pointers, constexprs, num_warps=4 if check else 1)


def _compile_large_ce(target: str, compute: str, aligned: bool = False) -> tuple:
    """The vocabulary path's two streaming kernels: online LSE and dlogits (without and with
    the filter), then both with a softcap (dlogits with the filter and a z-loss); with ``aligned`` their
    pointers, row strides and chunk width are taken as multiples of 16, as the launcher sees
    them for an aligned workload."""
    lse_pointers = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "target_ptr": "*i32", "run_max_ptr": "*fp32",
                    "run_sum_ptr": "*fp32", "target_logit_ptr": "*fp32", "logit_sum_ptr": "*fp32"}  # fmt: skip
    sizes = ("stride_lm", "n_cols")

    def lse(softcap: bool):
        return compile_for(target, large_ce.large_ce_lse_merge_kernel, {**lse_pointers, "softcap": "fp32"},
                           {"BLOCK_M": large_ce.LSE_BLOCK_M, "BLOCK_V": large_ce.LSE_BLOCK_V, "SOFTCAP": softcap},
                           aligned=(*lse_pointers, *sizes) if aligned else (), num_warps=large_ce.NUM_WARPS)  # fmt: skip

    grad_pointers = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "target_ptr": "*i32", "lse_ptr": "*fp32",
                     "row_scale_ptr": "*fp32", "dlogits_ptr": compute, "col_sums_ptr": "*fp32"}  # fmt: skip

    def dlogits(filtering: bool, softcap: bool, z_loss: bool = False):
        pointers = {**grad_pointers, "tile_flags_ptr": "*i32" if filtering else "*fp32"}
        return compile_for(
            target, large_ce.large_ce_dlogits_kernel,
            {**pointers, "smoothing": "fp32", "inv_classes": "fp32", "filter_eps": "fp32", "softcap": "fp32",
             "z_loss": "fp32"},
            {"BLOCK_M": large_ce.DLOGITS_BLOCK_M, "BLOCK_V": large_ce.DLOGITS_BLOCK_V, "FILTER": filtering,
             "FLAG_M": filtered_matmul.TILE_M, "SOFTCAP": softcap, "Z_LOSS": z_loss},
            aligned=(*pointers, *sizes, "stride_dm") if aligned else (), num_warps=large_ce.NUM_WARPS,
        )  # fmt: skip

    return lse(False), dlogits(False, False), dlogits(True, False), lse(True), dlogits(True, True, z_loss=True)


def _compile_filtered_matmul(target: str, compute: str, sizes_aligned: bool = False) -> tuple:
    """The gradient filter's two GEMMs (dW overwriting and accumulating), with the pointers and
    row strides of a vocabulary head (multiples of 16, as the launcher sees them), and with
    ``sizes_aligned`` D, the chunk's columns and the tile lists' stride too."""
    block_k, stages = filtered_matmul.STEPS[COMPUTE_DTYPES[compute]]
    common = {"BLOCK_D": filtered_matmul.BLOCK_D, "BLOCK_K": block_k,
              "PRECISION": "tf32x3" if compute == "*fp32" else "ieee"}  # fmt: skip
    options = {"num_warps": filtered_matmul.NUM_WARPS, "num_stages": stages}
    blocks = {"k_blocks_ptr": "*i32", "k_count_ptr": "*i32"}
    aligned = ("dlogits_ptr", "stride_gm", "stride_hm", "stride_wv")
    if sizes_aligned:
        aligned += ("hidden_size", "n_cols", "k_stride", "k_blocks_ptr", "k_count_ptr")
    dh = compile_for(target, filtered_matmul.filtered_dh_kernel,
                     {"dlogits_ptr": compute, "w_ptr": compute, "dh_ptr": "*fp32", **blocks},
                     {**common, "TILE_M": filtered_matmul.TILE_M}, aligned=(*aligned, "w_ptr", "dh_ptr"),
                     **options)  # fmt: skip
    dw = [
        compile_for(target, filtered_matmul.filtered_dw_kernel,
                    {"dlogits_ptr": compute, "h_ptr": compute, "dw_ptr": "*fp32", **blocks},
                    {**common, "ACCUMULATE": accumulate, "TILE_V": filtered_matmul.TILE_V,
                     "BLOCK_V": filtered_matmul.DW_BLOCK_V}, aligned=(*aligned, "h_ptr", "dw_ptr"), **options)
        for accumulate in (False, True)
    ]  # fmt: skip
    return dh, *dw


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("block_c", sorted(small_heads.SHAPES_BY_BLOCK_C))
def test_small_heads_backward_without_dh_compiles(target, block_c):
    """The backward variant for a frozen encoder output (no dH) compiles without spills."""
    kernel = small_heads_candidate(target, block_c, 0, True, True, "*bf16", write_dh=False)
    assert resource_usage(kernel)[1] == 0


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("block_c", sorted(small_heads.SHAPES_BY_BLOCK_C))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("variant", list(VARIANT_FLAGS))
def test_small_heads_variants_compile(candidates_compiled_on_every_core, target, block_c, backward, variant):
    """fp32 rows with bf16 products (an encoder output under autocast; dH written in fp32),
    class-weighted cross-entropy (one more segment pass), cross-entropy with a softcap and a
    z-loss (two more tiles held into backward), and the sequence tasks' groups apart from the
    token tasks' (bert-base-4task's plan: blocks skip groups, dH sums wait in a scratch row per
    sequence row): every candidate compiles, the untuned one fits the shared memory, and at
    least one keeps its tiles in registers for the autotuner to pick (some of the others spill
    a little)."""
    if variant == "fp32-rows" and not READS_FP32_ROWS["triton"]:
        pytest.skip(f"triton {triton.__version__} gets 16-bit rows (its compiler aborts on this variant)")
    stacks = [resource_usage(small_heads_candidate(**job))[1] for job in _variant_jobs(target, block_c, backward, variant)]
    assert min(stacks) == 0, stacks


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_reduce_kernel_compiles(target, accumulate):
    _compile_reduce(target, accumulate)


@pytest.mark.parametrize("check", ["no-check", "check", "check-mask"])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_loss_finalize_kernel_compiles(target, check):
    kernel = _compile_loss_finalize(target, check != "no-check", check == "check-mask")
    registers, stack = resource_usage(kernel)  # the label check's streaming pass: no spills
    assert registers <= 128 and stack == 0, (registers, stack)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("compute", ["*bf16", "*fp16", "*fp32"])
def test_large_ce_kernels_compile(target, compute):
    for kernel in _compile_large_ce(target, compute):  # streaming passes: no spills, room for 4+ blocks per SM
        registers, stack = resource_usage(kernel)
        assert registers <= 128 and stack == 0, (registers, stack)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("compute", ["*bf16", "*fp16", "*fp32"])
def test_filtered_matmul_kernels_compile(target, compute):
    """The gradient filter's GEMMs fit the shared memory and keep their tiles in registers."""
    for kernel in _compile_filtered_matmul(target, compute):
        assert resource_usage(kernel)[1] == 0


def _compile_as_launched(target: str, compute: str) -> dict:
    """The 16-bit kernels as the launcher specializes them for an aligned workload (D,
    vocabulary chunks and row strides multiples of 16, contiguous rows): pointers and those
    integers divisible by 16, unit strides constant."""
    kernels = {
        f"small_heads-{direction}": small_heads_as_launched(target, compute, 32,
                                                             small_heads.configs_for(32, backward)[0], backward)
        for direction, backward in (("fwd", False), ("bwd", True))
    }
    kernels["filtered_dh"], kernels["filtered_dw"], _ = _compile_filtered_matmul(target, compute, sizes_aligned=True)
    large_ce_kernels = _compile_large_ce(target, compute, aligned=True)
    kernels["large_ce_dlogits"], kernels["large_ce_dlogits_softcap"] = large_ce_kernels[2], large_ce_kernels[4]
    return kernels


SCALAR_16BIT_ACCESS = re.compile(r"\b(?:ld|st)\.global(?:\.[\w:]+)*\.b16\b")


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("compute", ["*bf16", "*fp16"])
def test_streamed_tiles_move_in_vectors_and_gemms_pipeline(target, compute):
    """For an aligned workload the GEMM loops load ahead with asynchronous copies, and
    no kernel moves a 16-bit element on its own: not the small heads' H rows and dH rows, nor
    the vocabulary head's [rows, columns] gradient. Both once did: the filtered GEMMs clamped
    their column indices, and the small-heads kernel took its row pointers (hidden or pooled)
    from a branch; either hid the alignment or the contiguity from the compiler (triton 3.6),
    so every bf16 element was its own load or store, and those loads were not pipelined."""
    for name, kernel in _compile_as_launched(target, compute).items():
        ptx = kernel.asm["ptx"]
        assert resource_usage(kernel)[1] == 0, name
        assert not SCALAR_16BIT_ACCESS.findall(ptx), (name, sorted(set(SCALAR_16BIT_ACCESS.findall(ptx))))
        if not name.startswith("large_ce_dlogits"):  # a streaming pass, no GEMM loop
            assert "cp.async.cg.shared.global" in ptx, name


@pytest.mark.parametrize("block_c", sorted(small_heads.SHAPES_BY_BLOCK_C))
def test_each_width_has_a_pipelined_candidate(block_c):
    """For sm_90 (H100/H200), with bf16 rows as launched, each head-group width offers the
    autotuner a candidate whose K-loops load ahead with asynchronous copies in both directions.
    Not every candidate does: at width 16 the first, (16, 32, 8, 2), has no cp.async in its PTX
    with triton 3.8 (its small tiles spread over 8 warps; why, not checked), and a 1-stage one
    never has."""
    for config in small_heads.configs_for(block_c, backward=True):
        if all("cp.async.cg.shared.global" in small_heads_as_launched("sm90", "*bf16", block_c, config, backward,
                                                                        fits=False).asm["ptx"]
               for backward in (False, True)):  # fmt: skip
            return
    pytest.fail(f"no candidate of width {block_c} pipelines its loads")


@pytest.mark.parametrize("target", sorted(OLDER_TARGETS))
@pytest.mark.parametrize("compute", ["*fp16", "*fp32"])
def test_kernels_compile_for_older_gpus(target, compute):
    """On a V100 or T4 (no bf16 tensor cores, no TF32) the untuned first candidate of every
    head-group width compiles, both directions, with rows in the computation dtype or in fp32
    (under autocast), and fits the shared memory; so do the other kernels. Speed there is not a
    goal."""
    if not triton_fused.kernels_compile_for(divmod(OLDER_TARGETS[target].arch, 10)):
        pytest.skip(f"triton {triton.__version__} fails on {target}; the backend runs the torch path there")
    try:
        _compile_every_kernel_untuned(target, compute)
    except Exception as exc:
        # CUDA 13's ptxas (the one torch bundles, which inductor points triton at) has no sm_70
        if "is not defined for option 'gpu-name'" in str(exc):
            pytest.skip(f"this host's ptxas does not target {target}")
        raise


@pytest.mark.parametrize("compute", ["*bf16", "*fp16", "*fp32"])
def test_untuned_kernels_fit_the_shared_memory_of_sm86_cards(compute):
    """An A10, L4 or RTX 30/40 card (sm_86, sm_89) lets a block opt into 99 KB of shared memory
    where an A100 lets it take 163 KB: every kernel's untuned configuration, the one that runs
    with MTLFAST_AUTOTUNE=0 and always among the autotuner's (which skips the candidates that
    do not fit), fits there too."""
    _compile_every_kernel_untuned("sm86", compute)


def _compile_every_kernel_untuned(target: str, compute: str) -> None:
    for block_c in small_heads.SHAPES_BY_BLOCK_C:
        row_types = (compute, "*fp32") if READS_FP32_ROWS["triton"] else (compute,)
        for backward, rows in itertools.product((False, True), dict.fromkeys(row_types)):
            small_heads_candidate(target, block_c, 0, backward, backward, compute, rows=rows)
    for accumulate in (False, True):
        _compile_reduce(target, accumulate)
    for check, has_mask in ((False, False), (True, False), (True, True)):
        _compile_loss_finalize(target, check, has_mask)
    _compile_large_ce(target, compute)
    _compile_filtered_matmul(target, compute)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_float_atomics_are_relaxed(backward):
    """The atomics path only accumulates (kernel boundaries order it), so its atomics must be
    relaxed: triton's default acq_rel atomics order memory around each add and are slower."""
    kernel = small_heads_candidate("sm90", 16, 0, backward, False, "*bf16")
    atomics = re.findall(r"\b(?:atom|red)\.[a-z0-9_.]+", kernel.asm["ptx"])
    assert atomics and all(".relaxed." in op for op in atomics), atomics


def test_tuning_results_are_kept_on_disk_where_triton_can():
    """Both directions' autotuners keep their picks in triton's cache (triton >= 3.6 can), so a
    later process takes them without compiling and timing the candidates again
    (tests/test_gpu.py checks that on a GPU); a process started with MTLFAST_AUTOTUNE_CACHE=0
    keeps none."""
    assert small_heads.TUNING_KEPT_ON_DISK or TRITON_VERSION < (3, 6)
    if not small_heads.TUNING_KEPT_ON_DISK:
        pytest.skip(f"triton {triton.__version__} keeps no tuning results")
    for backward in (False, True):
        assert small_heads._tuned_kernel(backward).cache_results, backward
    code = "from mtlfast.kernels import small_heads as s; print([s._tuned_kernel(b).cache_results for b in (0, 1)])"
    env = dict(os.environ, MTLFAST_AUTOTUNE_CACHE="0")
    kept = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert kept.stdout.split() == ["[False,", "False]"], kept.stdout + kept.stderr[-2000:]


def test_programs_per_sm_counts_registers_by_warp_and_shared_memory():
    """Registers go to a warp in units of 256 (a thread's count rounded up to 8): 4 warps fit
    three times in 65536 at 168 registers but twice at 169 (176 rounded); shared memory bounds
    the rest, with 1 KB per block kept by the driver, and so do an SM's 2048 threads."""
    assert programs_per_sm("sm90", 245, 4, 0) == 2
    assert programs_per_sm("sm90", 248, 4, 0) == 2
    assert programs_per_sm("sm90", 168, 4, 0) == 3
    assert programs_per_sm("sm90", 169, 4, 0) == 2
    assert programs_per_sm("sm90", 128, 8, 0) == 2
    assert programs_per_sm("sm90", 129, 8, 0) == 1
    assert programs_per_sm("sm90", 64, 4, 115 * 1024) == 1
    assert programs_per_sm("sm80", 64, 4, 40 * 1024) == 4  # 164 KB, exactly
    assert programs_per_sm("sm80", 64, 4, 41 * 1024) == 3
    assert programs_per_sm("sm90", 24, 4, 0) == 16  # 21 by registers, 2048 threads
