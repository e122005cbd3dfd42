"""backend="triton" under TRITON_INTERPRET=1 on the CPU, against the float64 oracle.

Run by tests/test_triton_interpreter.py in a process of its own (the variable must be
set before triton is imported). fp32 and fp16 throughout; bf16, whose ``tl.dot`` the
interpreter gets wrong (as its fp32 -> bf16 cast), mended by bf16_emulation.py in the tests
marked so.
"""

import dataclasses
import os
import random
from collections import OrderedDict

import pytest
import torch
import triton
import triton.language as tl
from bench_eager import assert_matches
from bf16_emulation import emulate_bf16
from mtlfast.kernels import label_check
from mtlfast.kernels.tiling import tf32_split
from oracle import (
    TOLERANCE,
    assert_matches_oracle,
    bad_class_id_cases,
    candidate_id,
    case_for,
    check_autocast_reads_fp32_rows,
    check_compiled_over_shapes,
    check_frozen_hidden,
    check_main_grad_accumulation,
    check_op_outputs_are_its_own,
    check_small_heads_weight_gradient_precision,
    check_strided_inputs,
    filter_tiles,
    fresh_seed,
    make_heads,
    random_case,
    random_task,
    rel_error,
    run_heads,
    run_small_heads_candidate,
    small_heads_candidates,
)

from mtlfast import MultiTaskHeads, Task
from mtlfast.backends import triton_fused
from mtlfast.task import TaskLayout

assert os.environ.get("TRITON_INTERPRET") == "1"

DTYPES = [torch.float32, torch.float16]
# bf16 tests need the interpreter's bf16 dot and cast mended (bf16_emulation.py), here for this process
needs_bf16 = pytest.mark.skipif(not emulate_bf16(), reason="this triton's interpreter lacks what the bf16 emulation mends")
ALL_DTYPES = [*DTYPES, pytest.param(torch.bfloat16, marks=needs_bf16)]
POISON_INT = -0x5A5A5A5B


def poisoned_buffer(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A buffer of NaN (an integer one of ``POISON_INT``), where an element a kernel leaves unwritten shows."""
    return torch.full(shape, float("nan") if dtype.is_floating_point else POISON_INT, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels must overwrite starts poisoned: an unwritten element fails."""
    monkeypatch.setattr(triton_fused, "alloc_output", poisoned_buffer)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(10))
def test_random_cases(dtype, trial):
    case = random_case()
    out, grads = run_heads(case, "triton", dtype)
    assert_matches(case, out, grads, dtype, f"triton/{dtype}")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rows, ks, cols = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b))


@needs_bf16
def test_bf16_dot_is_the_product_of_the_bf16_values():
    """The emulated bf16 ``tl.dot`` (bf16_emulation.py), which the bf16 tests stand on: fp32 sums
    of exact products of the operands' bf16 values, each element within the bound of K fp32
    additions, (K + 1) 2^-24 sum_k |a_ik b_kj|, of the float64 product."""
    a = torch.randn(16, 32).to(torch.bfloat16)
    b = (torch.randn(32, 16) * 1e3).to(torch.bfloat16)
    out = torch.full((16, 16), float("nan"))
    _dot_kernel[(1,)](a, b, out, 16, 32, 16)
    expected = a.double() @ b.double()
    assert ((out.double() - expected).abs() <= 33 * 2.0**-24 * (a.double().abs() @ b.double().abs())).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(4))
def test_random_cases_into_main_grad(monkeypatch, dtype, trial):
    """``fuse_wgrad_accumulation``: the kernels add the oracle's weight gradient to a
    ``main_grad`` holding noise, and leave the rows of absent tasks alone; vocabulary heads in
    odd trials, the small heads' atomics (no partial buffers) in the last two."""
    if trial >= 2:
        monkeypatch.setattr(triton_fused, "PARTIAL_BYTES", 0)
    case = random_case(ce_classes=(129, 300) if trial % 2 else None)
    out, grads = run_heads(case, "triton", dtype, fuse_wgrad_accumulation=True)
    assert_matches(case, out, grads, dtype, f"triton/{dtype} into main_grad")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16)], ids=str)
@pytest.mark.parametrize("trial", range(4))
def test_autocast(trial, dtype):
    """fp32 rows and parameters under 16-bit autocast (rows rounded as the kernels load them),
    vocabulary heads in odd trials, the deterministic mode in some."""
    case = random_case(ce_classes=(129, 300) if trial % 2 else None)
    out, grads = run_heads(case, "triton", dtype, autocast=True, deterministic=trial % 3 == 0)
    assert grads["weight"].dtype == torch.float32
    assert_matches(case, out, grads, dtype, f"triton/autocast/{dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16)], ids=str)
@pytest.mark.parametrize("trial", range(4))
def test_autocast_reads_fp32_hidden_states_as_cast_ones(trial, dtype):
    """The kernels round fp32 rows to 16 bits as they load them, bit for bit as a cast would; with
    a vocabulary head (odd trials) that path's rows are cast once; pooled rows (fp32 too) in some
    cases."""
    if trial % 2:
        case = random_case(max_classes=9)
        case.tasks.append(Task("vocab", random.Random(case.seed).randint(129, 300), "cross_entropy", level="token"))
        case = case_for(case.tasks, (2, 5, 13), case.seed)
    else:
        case = random_case()
    check_autocast_reads_fp32_rows(case, "triton", dtype, deterministic=trial == 2)


@pytest.mark.parametrize("deterministic", [False, True])
def test_many_groups(deterministic):
    """40 tasks: several column groups, the fp32 dH scratch and (deterministic) partial buffers."""
    case = random_case(num_tasks=40, max_classes=9)
    out, grads = run_heads(case, "triton", torch.float32, deterministic=deterministic)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/40 tasks")


def _level_tasks(rng: random.Random, level: str, columns: int) -> list[Task]:
    """Tasks of one level with at least ``columns`` outputs in all."""
    tasks: list[Task] = []
    while sum(t.num_outputs for t in tasks) < columns:
        loss = rng.choice(["cross_entropy", "bce", "mse"])
        tasks.append(Task(f"{level[0]}{len(tasks)}", rng.randint(2, 12), loss, level=level))
    return tasks


# (sequence columns, token columns) of the level-split cases: one group each (the fp32 dH
# scratch holds a row per sequence row), several sequence groups and one token group (still per
# sequence row), several token groups (a row per row).
LEVEL_SPLITS = {"one-each": (18, 7), "sequence-groups": (140, 9), "token-groups": (11, 140)}


@pytest.mark.parametrize("columns", LEVEL_SPLITS.values(), ids=LEVEL_SPLITS.keys())
@pytest.mark.parametrize("rows", ["cls", "pooled"])
@pytest.mark.parametrize("extra", ["atomics", "deterministic", "vocabulary"])
def test_levels_in_groups_of_their_own(monkeypatch, columns, rows, extra):
    """The sequence tasks' groups kept apart from the token tasks' and walked first (forced
    here; the backend does it where that saves work), so that a token row block skips them
    unless it holds a sequence row: the sequence rows every 40th token row (some row blocks
    hold one, others none) or pooled (blocks of their own), the partials of the groups a
    program's first block skips started at zero (deterministic), and dH from a vocabulary
    head to start from (the fp32 scratch of every row)."""
    monkeypatch.setattr(triton_fused, "_splits_levels", lambda heads, seq_stride: True)
    rng = random.Random(fresh_seed())
    tasks = _level_tasks(rng, "sequence", columns[0]) + _level_tasks(rng, "token", columns[1])
    if extra == "vocabulary":
        tasks.append(Task("vocab", rng.randint(129, 200), "cross_entropy", level="token"))
    case = random_case(tasks=tasks, shape=(3, 40, 13), all_present=True)
    case.pooled = torch.randn(3, 13) if rows == "pooled" else None
    out, grads = run_heads(case, "triton", torch.float32, deterministic=extra == "deterministic")
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"triton/levels {case.describe()}")


def test_levels_kept_apart_where_that_saves_work():
    """A token task beside narrow sequence tasks over long sequences (bert-base-4task): token
    blocks walk a 32-wide group instead of a 64-wide one. Short sequences put a sequence row in
    nearly every block, where two groups would cost more than one; pooled rows never do."""
    from mtlfast.task import TaskLayout

    bert = TaskLayout((Task("sentiment", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token"),
                       Task("similarity", 1, "mse"), Task("topics", 20, "bce"))).heads  # fmt: skip
    assert triton_fused._splits_levels(bert, 512) and triton_fused._splits_levels(bert, 0)
    assert not triton_fused._splits_levels(bert, 8)
    plan = triton_fused._small_plan(bert, torch.device("cpu"), True)
    assert (plan.block_c, plan.n_groups, plan.n_seq_groups) == (32, 2, 1)
    from mtlfast.kernels import small_heads

    launch = small_heads.SmallHeadsLaunch(backward=True, seq_stride=512, compute_dtype=torch.bfloat16, write_dh=True,
                                          **plan.launch_fields)  # fmt: skip
    # the fp32 dH scratch: a row per sequence row (CLS or pooled) and the other rows' one, none
    # with a vocabulary head's dH to add to
    assert small_heads.dh_acc_rows(launch, 32 * 512, 0) == 33
    assert small_heads.dh_acc_rows(dataclasses.replace(launch, seq_stride=0), 32 * 512, 32) == 33
    assert small_heads.dh_acc_rows(dataclasses.replace(launch, has_dh_init=True), 32 * 512, 0) == 0
    token_only = TaskLayout((Task("ner", 9, "cross_entropy", level="token"),)).heads
    assert not triton_fused._splits_levels(token_only, 512)
    wide_sequence = TaskLayout((Task("cls", 100, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token"))).heads
    assert not triton_fused._splits_levels(wide_sequence, 512)  # the token group would be as wide


# (batch, sequence length): CLS rows 120 rows apart (a block holds one or none), 10 apart (every
# block but the last, shorter one holds some: 5 sequence rows for 3 blocks of 16 rows, 2 of 32),
# or pooled rows (one block, 3 of them; then the token rows are 40 long).
SEQUENCE_ROWS = {"cls-120": (3, 120), "cls-10": (5, 10), "pooled": (3, 40)}


@pytest.mark.parametrize("rows", SEQUENCE_ROWS.keys())
@pytest.mark.parametrize("class_weights", [None, (0.5, 2.0, 1.5)], ids=["counts", "class-weights"])
def test_partials_hold_only_used_slots(monkeypatch, class_weights, rows):
    """The deterministic partial dW rows: one per used slot (the 18 columns of two 16-slot
    groups, the sequence tasks' apart from the token tasks'; padding slots have none). The
    sequence slots' rows are the row blocks' that walk their group, each block's written once,
    and the rows reserved past those (a sequence row each) left alone; the token slots' rows are
    the programs', all written by each launched program (its first block starts them). So are
    forward's partial loss sums and, with class weights (weighted divisors: not exact in any
    order), counts, the sequence group's at zero where a program's first block skips it. The
    gradients match. 16 programs, more than the sequence rows."""
    from mtlfast.kernels import small_heads

    buffers = []

    def poisoned(shape, dtype, device):
        buffer = poisoned_buffer(shape, dtype, device)
        buffers.append(buffer)
        return buffer

    monkeypatch.setattr(triton_fused, "alloc_output", poisoned)
    monkeypatch.setattr(triton_fused, "_partial_programs", lambda problem, plan: 16)
    monkeypatch.setattr(triton_fused, "_STEPS", OrderedDict())  # steps worked out with other program counts
    tasks = [Task("cls", 3, "cross_entropy", class_weights=class_weights), Task("ner", 9, "cross_entropy", level="token"),
             Task("score", 1, "mse"), Task("tags", 5, "bce", level="token")]  # fmt: skip
    monkeypatch.setattr(triton_fused, "_splits_levels", lambda heads, seq_stride: True)
    batch, seq_len = SEQUENCE_ROWS[rows]
    case = case_for(tasks, (batch, seq_len, 24), nan_rate=0.0)
    if rows == "pooled":
        case.pooled = torch.randn(batch, 24)
    out, grads = run_heads(case, "triton", torch.float32, deterministic=True)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/partials")
    used, padded, seq_slots = sum(t.num_outputs for t in tasks), 2 * 16, 4
    bound = batch  # a sequence row each
    (partial_dw,) = [b for b in buffers if b.shape == (bound * seq_slots + 16 * (used - seq_slots), 24)]
    block_m = small_heads.SHAPES_BY_BLOCK_C[16][0][0]  # untuned: the width's first candidate
    walked = 1 if rows == "pooled" else _blocks_holding_sequence_rows(batch * seq_len, seq_len, block_m)
    pooled_rows, seq_stride = (batch, 0) if rows == "pooled" else (0, seq_len)
    assert small_heads.sequence_blocks(batch * seq_len, pooled_rows, seq_stride, block_m) == walked
    by_block = partial_dw[: bound * seq_slots].view(bound, seq_slots, 24)
    assert not by_block[:walked].isnan().any() and by_block[walked:].isnan().all()
    by_program = partial_dw[bound * seq_slots :].view(16, used - seq_slots, 24)
    written = ~by_program.isnan().all(dim=2)  # [programs, slots]
    launched = written.any(dim=1)
    assert launched.sum() > 1
    assert (written[launched].sum(dim=1) == used - seq_slots).all(), written.sum(dim=1)
    assert not by_program[written].isnan().any()
    # forward's loss sums (and counts) [1 or 2, programs, padded slots]: every slot of the
    # launched programs (the same count) is written, the sequence group's at zero where skipped
    rows_kept = 1 if class_weights is None else 2
    (partial_loss,) = [b for b in buffers if b.shape == (rows_kept, 16, padded)]
    assert not partial_loss[:, launched].isnan().any() and partial_loss[:, ~launched].isnan().all()


def _blocks_holding_sequence_rows(n_hidden: int, seq_stride: int, block_m: int) -> int:
    """The row blocks of ``block_m`` hidden rows holding a row every ``seq_stride``, counted row by row."""
    return sum(any(r % seq_stride == 0 for r in range(start, min(start + block_m, n_hidden)))
               for start in range(0, n_hidden, block_m))  # fmt: skip


def test_sequence_blocks_count_the_blocks_that_walk_the_sequence_groups():
    """``small_heads.sequence_blocks`` against a count of the row blocks holding a sequence row
    (a hidden row every ``seq_stride``, with no pooled rows; pooled blocks only, with 0), for
    sequences shorter and longer than a block, never more than ``sequence_block_bound``."""
    from mtlfast.kernels import small_heads

    rng = random.Random(fresh_seed())
    for _ in range(300):
        block_m, seq_stride = rng.choice([16, 32, 64]), rng.choice([0, rng.randint(1, 40), rng.randint(1, 200)])
        n_hidden = rng.randint(0, 600)
        n_pooled = rng.randint(0, 150) if seq_stride == 0 else 0
        blocks = _blocks_holding_sequence_rows(n_hidden, seq_stride, block_m) if seq_stride else 0
        blocks += -(-n_pooled // block_m)
        assert small_heads.sequence_blocks(n_hidden, n_pooled, seq_stride, block_m) == blocks
        assert blocks <= small_heads.sequence_block_bound(n_hidden, n_pooled, seq_stride)


@pytest.mark.parametrize("by_block", [0, 2], ids=["by-program", "first-slots-by-block"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["store", "accumulate"])
def test_reduce_partials_sums_the_launched_programs_in_order(accumulate, by_block):
    """The reduction of the partial dW/db buffers against a float64 sum: more launched
    programs (and row blocks) than a step of the reduction takes (several steps and a partial
    one), D not a multiple of its block, used slots scattered among padded ones; with
    ``by_block`` the first used slots' dW rows by row block, ahead of the programs' rows of the
    others. The rows of programs and blocks not launched are NaN, and so are the packed rows it
    writes (but for the weight's when it adds to them: ``accumulate`` is for dW alone); the rows
    of other tasks must keep their values."""
    from mtlfast.kernels import small_heads

    generator = torch.Generator().manual_seed(fresh_seed())
    launched, blocks = 2 * small_heads.REDUCE_BLOCK_P + 5, small_heads.REDUCE_BLOCK_P + 7
    hidden_size, padded_slots, packed_rows = small_heads.REDUCE_BLOCK_D + 13, 16, 11
    slot_index = torch.tensor([0, 3, 4, 9, 15], dtype=torch.int32)
    slot_row = torch.tensor([7, 0, 2, 10, 5], dtype=torch.int32)
    rows = slot_row.long()
    by_program = len(rows) - by_block
    block_part = torch.randn(blocks + 4, by_block, hidden_size, generator=generator)
    program_part = torch.randn(launched + 3, by_program, hidden_size, generator=generator)
    block_part[blocks:], program_part[launched:] = float("nan"), float("nan")
    dw_part = torch.cat([block_part.flatten(0, 1), program_part.flatten(0, 1)])
    db_part = torch.randn(launched + 3, padded_slots, generator=generator)
    db_part[launched:] = float("nan")
    old_weight = torch.randn(packed_rows, hidden_size, generator=generator)
    old_bias = torch.randn(packed_rows, generator=generator)
    grad_weight, grad_bias = old_weight.clone(), old_bias.clone()
    grad_bias[rows] = float("nan")
    if not accumulate:
        grad_weight[rows] = float("nan")
    small_heads.reduce_partials(dw_part, db_part, launched, slot_row, slot_index, grad_weight, grad_bias, accumulate,
                                by_block, blocks if by_block else 0, block_part.shape[0] * by_block)  # fmt: skip

    want_weight, want_bias = old_weight.double(), old_bias.double()
    kept = 1.0 if accumulate else 0.0
    sums = torch.cat([block_part[:blocks].double().sum(dim=0), program_part[:launched].double().sum(dim=0)])
    want_weight[rows] = sums + kept * want_weight[rows]
    want_bias[rows] = db_part[:launched, slot_index.long()].double().sum(dim=0)
    assert rel_error(grad_weight, want_weight) < 1e-6 and rel_error(grad_bias, want_bias) < 1e-6
    others = torch.ones(packed_rows, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(grad_weight[others], old_weight[others]) and torch.equal(grad_bias[others], old_bias[others])


@triton.jit
def _split_kernel(x_ptr, big_ptr, small_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    big, small = tf32_split(tl.load(x_ptr + offsets, mask=offsets < n, other=0.0))
    tl.store(big_ptr + offsets, big, mask=offsets < n)
    tl.store(small_ptr + offsets, small, mask=offsets < n)


def test_tf32_split_pieces_are_exact_in_tf32():
    """kernels.tiling.tf32_split against float64 on values over the whole fp32 range (zero,
    subnormals, the largest, infinities, a NaN): both pieces have their 13 low mantissa bits
    zero, and their sum is within 2^-20 of the value (2^-136 where the rest is subnormal); an
    infinity splits into itself and 0."""
    generator = torch.Generator().manual_seed(fresh_seed())
    exponents = torch.randint(-149, 128, (200,), generator=generator).double()
    values = torch.randn(200, generator=generator, dtype=torch.float64).sign() * torch.rand(200, generator=generator,
                                                                                        dtype=torch.float64).add(1)
    special = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-140), torch.finfo(torch.float32).max, float("inf"),
                            -float("inf"), float("nan")], dtype=torch.float64)  # fmt: skip
    x = torch.cat([(values * exponents.exp2()).float(), special.float()])
    big, small = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _split_kernel[(1,)](x, big, small, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))

    finite = x.isfinite()
    for piece in (big, small):
        assert not (piece[finite].view(torch.int32) & 0x1FFF).any()
    error = (big[finite].double() + small[finite].double() - x[finite].double()).abs()
    assert (error <= (x[finite].double().abs() * 2.0**-20).clamp(min=2.0**-136)).all()
    infinite = x.isinf()
    assert torch.equal(big[infinite], x[infinite]) and not small[infinite].any()
    assert big[x.isnan()].isnan().all()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(3))
def test_large_cross_entropy_path(dtype, trial):
    """Cross-entropy heads wider than MAX_BLOCK_C take the chunked online-LSE path, beside small heads."""
    rng = random.Random(fresh_seed())
    tasks = [
        Task("vocab", rng.randint(129, 400), "cross_entropy", level=rng.choice(["token", "sequence"]),
             label_smoothing=rng.choice([0.0, 0.1])),
        Task("tags", rng.randint(1, 5), "bce", level="token"),
        Task("cls", rng.randint(2, 6), "cross_entropy"),
    ]  # fmt: skip
    case = case_for(tasks, (2, rng.randint(1, 6), rng.choice([7, 24])))
    out, grads = run_heads(case, "triton", dtype)
    assert_matches(case, out, grads, dtype, f"triton/large/{dtype}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_heads_without_bias(dtype):
    """``bias=False``, small heads and a vocabulary head: the oracle with a zero bias."""
    rng = random.Random(fresh_seed())
    tasks = [Task("vocab", rng.randint(129, 300), "cross_entropy", level="token"),
             Task("cls", rng.randint(2, 6), "cross_entropy"), Task("tags", rng.randint(1, 5), "bce", level="token")]  # fmt: skip
    case = case_for(tasks, (2, rng.randint(2, 9), rng.choice([8, 24])))
    case.bias.zero_()
    out, grads = run_heads(case, "triton", dtype, bias=False)
    assert_matches(case, out, grads, dtype, f"triton/bias=False/{dtype}", skip=("bias",))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_training_after_evaluation_under_inference_mode(bias):
    """A training step after the same call under ``torch.inference_mode`` (a validation pass),
    small heads and a vocabulary head, ``validate=True``: the oracle. The kept loss sums, label
    tables and check specs made by the evaluation are normal tensors (the vocabulary path
    writes the sums in place; the table is saved for backward)."""
    rng = random.Random(fresh_seed())
    tasks = [Task("vocab", rng.randint(129, 300), "cross_entropy", level="token"),
             Task("cls", rng.randint(2, 6), "cross_entropy"), Task("score", 1, "mse")]  # fmt: skip
    case = case_for(tasks, (2, rng.randint(2, 9), rng.choice([8, 24])))
    if not bias:
        case.bias.zero_()
    triton_fused._LOSS_SUMS.clear()  # made anew, by the evaluation
    out, grads = run_heads(case, "triton", torch.float32, evaluated_first=True, bias=bias, validate=True)
    assert_matches(case, out, grads, torch.float32, "triton after inference_mode", skip=() if bias else ("bias",))


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16)], ids=str)
@pytest.mark.parametrize("atomics", [False, True], ids=["partials", "atomics"])
@pytest.mark.parametrize("vocabulary", [False, True], ids=["small", "vocabulary"])
def test_16_bit_parameters_accumulate_into_fp32_main_grad(monkeypatch, vocabulary, atomics, dtype):
    """``fuse_wgrad_accumulation``: the small-heads kernel (its partials' reduction, or its
    atomics) and a vocabulary head's GEMMs add fp32 dW straight into ``main_grad``, the weight
    gradient buffer never allocated; the vocabulary path's dW comes from 16-bit dlogits."""
    from mtlfast.kernels import small_heads

    if atomics:
        monkeypatch.setattr(triton_fused, "PARTIAL_BYTES", 0)
    allocated, partials = [], []  # the small path's partial dW rows may have the weight's shape
    allocate, reduce = triton_fused.alloc_output, small_heads.reduce_partials
    monkeypatch.setattr(triton_fused, "alloc_output",
                        lambda shape, dtype, device: allocated.append(allocate(shape, dtype, device)) or allocated[-1])
    monkeypatch.setattr(small_heads, "reduce_partials",
                        lambda dw_part, *args: partials.append(dw_part) or reduce(dw_part, *args))  # fmt: skip
    rng = random.Random(fresh_seed())
    tasks = [Task("cls", rng.randint(2, 6), "cross_entropy"), Task("tags", rng.randint(2, 9), "cross_entropy", level="token"),
             Task("multi", rng.randint(1, 5), "bce")]  # fmt: skip
    if vocabulary:
        tasks.append(Task("vocab", rng.randint(129, 300), "cross_entropy", level="token"))
    hidden_size = rng.choice([8, 24])
    vocabulary_tol = 1e-3 if dtype == torch.float16 else 8e-3  # dlogits rounded to 16 bits: 3 bits fewer in bf16
    check_main_grad_accumulation(tasks, (2, rng.randint(2, 7), hidden_size), "triton", dtype, 4,
                                 tol=vocabulary_tol if vocabulary else 1e-5)  # fmt: skip
    packed = ((sum(t.num_outputs for t in tasks), hidden_size), torch.float32)
    weight_shaped = [(tuple(t.shape), t.dtype) for t in allocated if not any(t is p for p in partials)]
    assert weight_shaped.count(packed) == 4, "the unfused heads allocate a dW buffer per micro-batch, the fused none"


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16)], ids=str)
def test_k16_accumulation_within_1e5_of_float64(dtype):
    """DESIGN's accumulation criterion on the triton backend: fp32 parameters, 16-bit compute,
    K=16 micro-batches, head gradients within 1e-5 of float64."""
    from test_grad_accumulation import check_k16_accumulation

    check_k16_accumulation("triton", dtype, shape=(3, 7, 24))


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16)], ids=str)
@pytest.mark.parametrize("scale", [2.0**-20, 1.0, 2.0**10])
def test_small_heads_weight_gradient_at_fp32_precision_at_any_scale(scale, dtype):
    check_small_heads_weight_gradient_precision(scale, dtype)


def test_call_time_task_weights():
    """``task_weights`` given with the call, as numbers and as a tensor that requires grad: the
    oracle of tasks built with those weights, and the task's loss as that tensor's gradient."""
    rng = random.Random(fresh_seed())
    case = random_case(rng.randrange(2**31), ce_classes=(129, 300) if rng.random() < 0.5 else None)
    case.weighting, case.log_vars = "static", None
    weights = {t.name: rng.uniform(0.0, 3.0) for t in case.tasks}
    learned_name = case.tasks[0].name
    learned = torch.tensor(weights[learned_name], requires_grad=True)
    tasks = [dataclasses.replace(t, weight=weights[t.name]) for t in case.tasks]
    out, grads = run_heads(case, "triton", torch.float32, task_weights={**weights, learned_name: learned})
    assert_matches_oracle(dataclasses.replace(case, tasks=tasks), out, grads, torch.float32,
                          TOLERANCE[torch.float32], "triton/task_weights")  # fmt: skip
    if learned_name in out.losses:
        torch.testing.assert_close(learned.grad, out.losses[learned_name])
    else:  # a task absent from the labels: its weight is not used
        assert learned.grad is None


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("grad_filter_eps", [None, 0.0])
def test_softcap_and_z_loss(monkeypatch, dtype, grad_filter_eps):
    """Cross-entropy with a softcap, a z-loss or both: vocabulary heads through the large path's
    kernels (exact, and with the gradient filter keeping every tile), small ones through the
    small-heads kernel beside its plain tasks (none takes the wide path); fp32 and fp16 against
    the oracle, bf16 within eager bf16's error plus 1e-2."""

    def wide_path(*args):
        raise AssertionError("a task took the wide path")

    monkeypatch.setattr(triton_fused, "_wide_forward", wide_path)
    monkeypatch.setattr(triton_fused, "_wide_backward", wide_path)
    rng = random.Random(fresh_seed())
    tasks = [Task("vocab", rng.randint(129, 400), "cross_entropy", level="token", softcap=rng.choice([1.0, 4.0]),
                  label_smoothing=rng.choice([0.0, 0.1]), z_loss=rng.choice([0.0, 0.05])),
             Task("z_vocab", rng.randint(129, 300), "cross_entropy", level="token", z_loss=0.1),
             Task("capped", rng.randint(2, 9), "cross_entropy", softcap=0.5),
             Task("capped_tok", rng.randint(2, 9), "cross_entropy", level="token", softcap=2.0, z_loss=0.1),
             Task("plain", rng.randint(2, 9), "cross_entropy", level="token")]  # fmt: skip
    case = case_for(tasks, (2, rng.randint(20, 40), rng.choice([8, 24])))
    case.weight *= 3.0
    out, grads = run_heads(case, "triton", dtype, grad_filter_eps=grad_filter_eps)
    assert_matches(case, out, grads, dtype, f"triton/softcap+z/{dtype}")


def _wide_path_case(rng: random.Random):
    """Tasks wider than MAX_BLOCK_C that neither kernel takes (bce, mse, class-weighted
    cross-entropy), with a vocabulary head and small heads, on random levels."""
    level = lambda: rng.choice(["token", "sequence"])  # noqa: E731
    classes = rng.randint(129, 200)
    tasks = [
        Task("tags", rng.randint(129, 260), "bce", level=level(), pos_weight=rng.choice([None, 2.5])),
        Task("reg", rng.randint(129, 200), "mse", level=level()),
        Task("weighted", classes, "cross_entropy", level=level(), label_smoothing=rng.choice([0.0, 0.1]),
             class_weights=[rng.choice([0.0, rng.uniform(0.1, 3.0)]) for _ in range(classes)]),
        Task("vocab", rng.randint(129, 300), "cross_entropy", level=level()),
        Task("cls", 4, "cross_entropy", class_weights=rng.choice([None, (0.5, 1.0, 2.0, 0.0)])),
        Task("ner", 3, "bce", level="token"),
    ]  # fmt: skip
    tasks = [tasks[0], *rng.sample(tasks[1:], rng.randint(1, len(tasks) - 1))]
    case = case_for(tasks, (2, rng.randint(1, 6), rng.choice([7, 24])))
    if rng.random() < 0.3:
        case.pooled = torch.randn(2, case.hidden.shape[-1])
    return case


@pytest.fixture
def no_delegation(monkeypatch):
    """Fails a test if the triton backend hands the whole call to the torch backend."""
    from mtlfast.backends import torch_chunked

    def delegated(*args, **kwargs):
        raise AssertionError("the triton backend delegated the call to the torch backend")

    for name in ("forward", "backward", "saved_like"):
        monkeypatch.setattr(torch_chunked, name, delegated)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(3))
def test_wide_path_beside_the_kernels(no_delegation, dtype, trial):
    """A wide bce/mse or class-weighted cross-entropy head no longer sends the whole call to the
    torch backend: it takes the wide path (rows in chunks, a few rows each in odd trials) while
    the other heads stay on the kernels."""
    rng = random.Random(fresh_seed())
    case = _wide_path_case(rng)
    kwargs = {"chunk_size": rng.randint(1, 5)} if trial % 2 else {}
    out, grads = run_heads(case, "triton", dtype, **kwargs)
    assert_matches(case, out, grads, dtype, f"triton/wide/{dtype}")


def test_wide_path_frozen_and_fp32_rows(no_delegation):
    """The wide path with hidden states that need no gradient, and with fp32 rows under fp16
    autocast (cast once per pass, dH in fp32)."""
    case = _wide_path_case(random.Random(fresh_seed()))
    check_frozen_hidden(case, "triton", torch.float32)
    check_autocast_reads_fp32_rows(case, "triton", torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paths", ["small", "every-path"])
def test_strided_inputs(no_delegation, dtype, paths):
    """Hidden states transposed out of [S, B, D], a strided pooled, a weight and a bias that are
    strided views (a transposed column slice, every other element): the kernels read rows and
    weight through their strides, and a strided bias is copied dense first (the kernels index
    it by packed row alone)."""
    case = random_case() if paths == "small" else _wide_path_case(random.Random(fresh_seed()))
    check_strided_inputs(case, "triton", dtype)


def test_op_outputs_are_its_own():
    """The custom op's table of label addresses, which the backend keeps between calls, leaves
    the op as a copy of its own."""
    check_op_outputs_are_its_own("triton")


def test_compile_with_strided_inputs(no_delegation):
    """The same under torch.compile(fullgraph=True): the op's gradients are contiguous, as its
    fake implementation says."""
    check_strided_inputs(_wide_path_case(random.Random(fresh_seed())), "triton", torch.float32, compiled=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_large_path_in_many_chunks(monkeypatch, dtype, level):
    """Chunks of 64 or 128 columns (the last one narrower) and a few rows: the online log-sum-exp
    merges across column chunks, dW across row chunks, dH across column chunks."""
    monkeypatch.setattr(triton_fused, "LARGE_MIN_CHUNK_COLS", 64)
    monkeypatch.setattr(triton_fused, "LARGE_CHUNK_ELEMENTS", 64 * 5)
    rng = random.Random(fresh_seed())
    tasks = [Task("vocab", rng.randint(200, 330), "cross_entropy", level=level, label_smoothing=rng.choice([0.0, 0.2])),
             Task("ner", rng.randint(2, 9), "cross_entropy", level="token")]  # fmt: skip
    case = case_for(tasks, (3, rng.randint(4, 9), rng.choice([8, 19])))
    n_rows = case.hidden.shape[0] * (case.hidden.shape[1] if level == "token" else 1)
    chunk_rows, chunk_cols = triton_fused._large_chunk_shape(n_rows, tasks[0].num_outputs, 0)
    assert chunk_rows < n_rows and chunk_cols < tasks[0].num_outputs
    out, grads = run_heads(case, "triton", dtype)
    assert_matches(case, out, grads, dtype, f"triton/large-chunks/{level}/{dtype}")


def test_large_head_alone_with_pooled_sequence_head():
    from oracle import Case

    from mtlfast import Task

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    tasks = [Task("lm", 517, "cross_entropy", level="token", label_smoothing=0.1), Task("cls", 300, "cross_entropy")]
    B, S, D = 2, 7, 19
    labels = {
        "lm": torch.randint(0, 517, (B, S), generator=gen).masked_fill(torch.rand(B, S, generator=gen) < 0.2, -100),
        "cls": torch.randint(0, 300, (B,), generator=gen),
    }
    case = Case(tasks, torch.randn(B, S, D, generator=gen), labels, torch.randn(817, D, generator=gen) * 0.2,
                torch.randn(817, generator=gen) * 0.1, pooled=torch.randn(B, D, generator=gen))  # fmt: skip
    out, grads = run_heads(case, "triton", torch.float32)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/large-only")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("with_large", [False, True], ids=["small", "small+large"])
@pytest.mark.parametrize("shape", [(0, 4, 11), (3, 0, 11)], ids=["no-sequences", "no-positions"])
def test_empty_batch(deterministic, with_large, shape):
    """A batch of no rows (no sequences, or sequences of no positions: then the sequence tasks
    read pooled rows): losses 0 where no row counts, and every gradient written (the buffers
    start as NaN)."""
    tasks = [Task("ner", 5, "cross_entropy", level="token"), Task("score", 2, "mse"), Task("tags", 3, "bce")]
    if with_large:
        tasks.append(Task("vocab", 201, "cross_entropy", level="token"))
    case = case_for(tasks, shape)
    if shape[1] == 0:
        case.pooled = torch.randn(shape[0], shape[2])
    out, grads = run_heads(case, "triton", torch.float32, deterministic=deterministic)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/empty")
    assert all(not g.isnan().any() for g in grads.values())


def test_labels_rewritten_in_place():
    """Label tensors refilled in place keep their addresses, so the cached table of label
    addresses is reused; every step must still read the new labels."""
    from oracle import random_labels

    case = random_case(shape=(3, 6, 13), allow_extras=False)
    buffers = {name: y.clone() for name, y in case.labels.items()}
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(3):
        for task in case.tasks:
            fresh = random_labels(task, 3, 6, gen, ignore_rate=0.2, nan_rate=0.0)
            buffers[task.name].copy_(fresh.reshape(buffers[task.name].shape))
        case.labels = buffers
        out, grads = run_heads(case, "triton", torch.float32)
        assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/in-place labels")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_loss_sums_are_zero_again_after_each_forward(deterministic):
    """The forward's loss sums and counts live in buffers kept between calls, which the loss
    finalize zeroes after reading: after every call they are zero, and calls with a large and
    a wide head beside the small ones (whose sums the backend writes itself) stay right."""
    triton_fused._LOSS_SUMS.clear()
    tasks = [Task("vocab", 300, "cross_entropy", level="token"), Task("multi", 140, "bce", level="token"),
             Task("cls", 3, "cross_entropy"), Task("tags", 5, "cross_entropy", level="token")]  # fmt: skip
    for case in (case_for(tasks, (2, 7, 24)), random_case(shape=(3, 5, 16)), case_for(tasks, (2, 7, 24))):
        out, grads = run_heads(case, "triton", torch.float32, deterministic=deterministic)
        assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/kept loss sums")
        assert triton_fused._LOSS_SUMS, "no kept buffer"
        for buffer, _, _ in triton_fused._LOSS_SUMS.values():
            assert torch.equal(buffer, torch.zeros_like(buffer)), buffer


def test_a_forward_that_fails_leaves_the_loss_sums_zero(monkeypatch):
    """A forward that raises after the small-heads kernel added into the kept sums (here, in
    the loss finalize) zeroes them, so the next call is right."""
    case = random_case(num_tasks=3, shape=(3, 5, 16), allow_extras=False)
    run_heads(case, "triton", torch.float32)
    finalize = triton_fused._kernels().loss_finalize

    def fails(*args, **kwargs):
        raise RuntimeError("finalize failed")

    with monkeypatch.context() as patch:
        patch.setattr(finalize, "loss_finalize", fails)
        with pytest.raises(RuntimeError, match="finalize failed"):
            run_heads(case, "triton", torch.float32)
    out, grads = run_heads(case, "triton", torch.float32)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/after a failed forward")


def test_deterministic_is_bitwise_repeatable():
    case = random_case(num_tasks=6, shape=(3, 7, 21), allow_extras=False)
    first = run_heads(case, "triton", torch.float32, deterministic=True)[1]
    second = run_heads(case, "triton", torch.float32, deterministic=True)[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_strided_hidden_view():
    """Sequence rows read through a strided view (hidden_states[:, 0] when no token task)."""
    case = random_case(levels=("sequence",), shape=(4, 6, 17))
    case.hidden = case.hidden.transpose(0, 1).contiguous().transpose(0, 1)
    out, grads = run_heads(case, "triton", torch.float32)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/strided")


@pytest.mark.parametrize("layout", ["every-other-feature", "sequence-first"])
def test_hidden_with_other_strides(layout):
    """Token and sequence tasks on hidden states that are not row-major [B, S, D]: a view
    taking every other feature of a wider tensor (the kernels read rows with a feature stride
    of 2) and a Megatron-style [S, B, D] tensor seen as [B, S, D]."""
    tasks = [Task("tags", 5, "cross_entropy", level="token"), Task("multi", 3, "bce", level="token"),
             Task("cls", 4, "cross_entropy", label_smoothing=0.1), Task("score", 1, "mse")]  # fmt: skip
    batch, seq_len, hidden_size = 3, 7, 19
    case = case_for(tasks, (batch, seq_len, hidden_size))
    if layout == "every-other-feature":
        base = torch.zeros(batch, seq_len, 2 * hidden_size)
        base[..., ::2] = case.hidden
    else:
        base = case.hidden.transpose(0, 1).contiguous()
    base.requires_grad_(True)
    hidden = base[..., ::2] if layout == "every-other-feature" else base.transpose(0, 1)
    assert not hidden.is_contiguous()
    heads = make_heads(case, "triton")
    out = heads(hidden, case.labels)
    out.loss.backward()
    grad_hidden = base.grad[..., ::2] if layout == "every-other-feature" else base.grad.transpose(0, 1)
    grads = {"hidden": grad_hidden, "weight": heads.weight.grad, "bias": heads.bias.grad}
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"triton/{layout}")
    if layout == "every-other-feature":
        assert torch.equal(base.grad[..., 1::2], torch.zeros_like(base.grad[..., 1::2]))


@pytest.mark.parametrize("validate", [False, True], ids=["validate-False", "validate-True"])
def test_launch_count_does_not_grow_with_tasks(monkeypatch, validate):
    """One training step launches the same number of Triton kernels for 4 and 40 small
    heads, and at most 4 (forward, loss epilogue, backward, partials reduction), with
    ``validate=True`` too: the label check runs in programs of the loss epilogue's launch."""
    from mtlfast.kernels import large_ce, launcher, loss_finalize, small_heads

    launches = []

    class Counting:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

        def __getattr__(self, attr):
            return getattr(self.kernel, attr)

    for module in (small_heads, large_ce, loss_finalize):
        for attr, value in list(vars(module).items()):
            if attr.endswith("_kernel") and type(value).__module__.startswith("triton.runtime"):
                monkeypatch.setattr(module, attr, Counting(value, attr))
            elif isinstance(value, launcher.DirectLauncher):  # holds its kernel since import
                monkeypatch.setattr(value, "kernel", Counting(value.kernel, attr))

    def count(num_tasks):
        launches.clear()
        case = random_case(num_tasks=num_tasks, max_classes=8, shape=(2, 5, 12), allow_extras=False)
        run_heads(case, "triton", torch.float32, validate=validate)
        return len(launches)

    four, forty = count(4), count(40)
    assert 0 < four == forty <= 4, (four, forty)


@pytest.mark.parametrize("validate", [False, True], ids=["validate-False", "validate-True"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_torch_ops_do_not_grow_with_tasks(monkeypatch, deterministic, validate):
    """Beside its Triton kernels, a training step whose plan is made runs the same torch ops
    (views and allocations aside) for 4 and 40 small heads of random losses, levels and options
    (class and positive weights, smoothing, softcaps, z-losses), with an attention mask and
    uncertainty weighting: nothing is worked out per task, not even class-weighted divisors
    (the kernel sums them, in partials when deterministic). Both levels are always present
    (a token task brings the mask's own ops), with a class-weighted head each. With
    ``validate=True`` too: the label values are checked in one launch, not by ops per task."""
    from mtlfast.kernels import launcher
    from torch.utils._python_dispatch import TorchDispatchMode

    ops, counting = [], [False]

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counting[0] and not func.is_view and func.__name__.split(".")[0] not in ("empty", "empty_strided"):
                ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    launch = launcher.DirectLauncher.__call__

    def uncounted_launch(self, *args, **kwargs):  # the interpreter's own tensor work is not the step's
        counting[0] = False
        try:
            return launch(self, *args, **kwargs)
        finally:
            counting[0] = True

    monkeypatch.setattr(launcher.DirectLauncher, "__call__", uncounted_launch)

    def step_ops(num_tasks: int) -> list[str]:
        rng = random.Random(fresh_seed())
        tasks = [random_task(rng, f"t{k}", rng.randint(2, 9), rng.choice(["cross_entropy", "bce", "mse"]),
                             rng.choice(["sequence", "token"]))
                 for k in range(2, num_tasks)]  # fmt: skip
        tasks += [Task("t0", 5, "cross_entropy", class_weights=(0.5, 2.0, 1.0, 0.0, 3.0)),
                  Task("t1", 3, "cross_entropy", level="token", class_weights=(1.5, 0.25, 2.0))]  # fmt: skip
        case = random_case(tasks=tasks, shape=(2, 5, 12), allow_extras=False)
        case.weighting = "uncertainty"
        case.log_vars = torch.randn(num_tasks) * 0.5
        case.attention_mask = (torch.rand(2, 5) > 0.3).long()
        heads = make_heads(case, "triton", validate=validate, deterministic=deterministic)
        hidden = case.hidden.clone().requires_grad_(True)

        def step():
            heads.zero_grad(set_to_none=True)
            hidden.grad = None
            out = heads(hidden, case.labels, attention_mask=case.attention_mask)
            out.loss.backward()
            return out

        step()  # plans the step
        ops.clear()
        with CountOps():
            counting[0] = True
            out = step()
            counting[0] = False
        grads = {"hidden": hidden.grad, "weight": heads.weight.grad, "bias": heads.bias.grad,
                 "log_vars": heads.log_vars.grad}  # fmt: skip
        assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"triton/{num_tasks} tasks")
        return sorted(ops)

    assert step_ops(4) == step_ops(40)


@pytest.mark.parametrize("classes", [7, 300], ids=["small-head", "vocab-head"])
def test_validate_false_skips_bad_class_ids(classes):
    """With validate=False a class id outside [0, C) is skipped like ignore_index, on both
    paths, and never used as an address."""
    case, ignored = bad_class_id_cases(classes)
    out, grads = run_heads(case, "triton", torch.float32, validate=False)
    assert_matches_oracle(ignored, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/bad ids")


def test_compile_over_changing_batch_and_sequence_lengths():
    """The triton backend's fake implementation under dynamic shapes, kernels interpreted."""
    check_compiled_over_shapes("triton", "cpu")


@pytest.mark.parametrize("trial", range(4))
def test_frozen_hidden_states(trial):
    """No dH: the small-heads kernel's backward without its dH half and the vocabulary path
    without its dH GEMM (every other trial has a 300-class head)."""
    case = random_case(ce_classes=(200, 400) if trial % 2 else None)
    check_frozen_hidden(case, "triton", torch.float32)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(2))
def test_grad_filter_zero_keeps_every_tile(monkeypatch, dtype, trial):
    """``grad_filter_eps=0`` marks every tile holding a row that counts, so the filtered GEMMs
    compute every gradient: across row and column tiles that do not divide the head, chunks
    of rows and columns and more than one block of D (odd trial), both levels, beside small
    heads; and with a frozen encoder output (no dH). bf16 within eager bf16's error plus 1e-2."""
    from mtlfast.kernels import filtered_matmul

    rng = random.Random(fresh_seed())
    if trial % 2:
        monkeypatch.setattr(triton_fused, "LARGE_MIN_CHUNK_COLS", 320)
        monkeypatch.setattr(triton_fused, "LARGE_CHUNK_ELEMENTS", 320 * 70)
    tasks = [Task("vocab", rng.randint(300, 700), "cross_entropy", level="token", label_smoothing=rng.choice([0.0, 0.1])),
             Task("seq_vocab", rng.randint(129, 300), "cross_entropy"),
             Task("ner", rng.randint(2, 9), "cross_entropy", level="token")]  # fmt: skip
    hidden_size = filtered_matmul.BLOCK_D + rng.choice([8, 24]) if trial % 2 else rng.choice([24, 40])
    case = case_for(tasks, (3, rng.randint(25, 45), hidden_size))
    assert case.hidden.shape[0] * case.hidden.shape[1] > filtered_matmul.TILE_M
    out, grads = run_heads(case, "triton", dtype, grad_filter_eps=0.0)
    assert_matches(case, out, grads, dtype, f"triton/filter-0/{dtype}")
    if dtype != torch.bfloat16:  # the frozen check holds fp32 and fp16 to the oracle's tolerance
        check_frozen_hidden(case, "triton", dtype, grad_filter_eps=0.0)


def _filtered_oracle(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, eps: float):
    """float64 loss and gradients of one token-level cross-entropy head (hidden [N, D], labels
    [N]) whose logit gradient drops the tiles ``filter_tiles`` drops at ``eps``; the bias
    gradient is exact. Also the tiles' maxima and the kept, scaled logit gradient [N, C]."""
    h, w, b = hidden.double(), weight.double(), bias.double()
    valid = labels >= 0
    logits = h @ w.T + b
    grad = torch.softmax(logits, dim=1)
    grad[valid, labels[valid]] -= 1.0
    grad[~valid] = 0.0
    maxima, keep = filter_tiles(grad, eps)
    scale = 1.0 / valid.sum()
    loss = (torch.logsumexp(logits, 1) - logits.gather(1, labels.clamp_min(0)[:, None])[:, 0])[valid].mean()
    kept = grad * keep * scale
    return loss, {"hidden": kept @ w, "weight": kept.T @ h, "bias": (grad * scale).sum(0)}, maxima, kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_filter_skips_exactly_the_tiles_below_the_threshold(dtype):
    """Tiles differ in their largest ``|softmax - onehot|`` (row tiles of hidden states at
    different scales, column tiles with different biases, the last one far below the rest, a
    row tile holding no target). With a threshold between two tiles' maxima (the widest gap;
    then the one just above the last column tile), the gradients are those of a float64
    oracle that drops exactly the tiles below it, the loss and bias gradient are exact, and
    the weight rows of the columns no kept tile covers get no gradient at all."""
    from mtlfast.kernels import filtered_matmul

    rng = random.Random(fresh_seed())
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    tm, tv = filtered_matmul.TILE_M, filtered_matmul.TILE_V
    n, classes, d = rng.randint(3 * tm + 1, 4 * tm), rng.randint(2 * tv + 1, 3 * tv), rng.choice([16, 40])
    row_scale = torch.tensor([rng.uniform(0.2, 3.0) for _ in range(-(-n // tm))]).repeat_interleave(tm)[:n]
    hidden = torch.randn(n, d, generator=gen) * row_scale[:, None]
    weight = torch.randn(classes, d, generator=gen) / d**0.5
    col_tiles = -(-classes // tv)
    bias = torch.tensor([rng.uniform(-6.0, 3.0) for _ in range(col_tiles - 1)] + [-25.0]).repeat_interleave(tv)[:classes]
    labels = torch.randint(0, tv, (n,), generator=gen)  # every target in the first column tile
    labels[torch.rand(n, generator=gen) < 0.15] = -100
    labels[tm : 2 * tm] = -100  # a row tile that counts nothing
    hidden, weight = hidden.to(dtype).float(), weight.to(dtype).float()  # the oracle sees the rounded inputs
    _, _, maxima, _ = _filtered_oracle(hidden, weight, bias, labels, 0.0)
    levels = maxima[maxima > 0].sort().values
    widest = int((levels[1:] / levels[:-1]).argmax())
    last = maxima[:, -1].max()
    above_last = levels[levels > last][0]
    assert above_last / last > 1.5, levels
    tol = TOLERANCE[dtype]
    for eps in (float((levels[widest] * levels[widest + 1]).sqrt()), float((last * above_last).sqrt())):
        loss, expected, _, kept = _filtered_oracle(hidden, weight, bias, labels, eps)
        heads = MultiTaskHeads(d, [Task("vocab", classes, "cross_entropy", level="token")], backend="triton",
                               grad_filter_eps=eps)  # fmt: skip
        with torch.no_grad():
            heads.weight.copy_(weight)
            heads.bias.copy_(bias)
        h = hidden.reshape(1, n, d).to(dtype).requires_grad_(True)
        out = heads(h, {"vocab": labels.reshape(1, n)})
        out.loss.backward()
        got = {"hidden": h.grad.reshape(n, d), "weight": heads.weight.grad, "bias": heads.bias.grad}
        assert abs(out.loss.double() - loss) <= tol * abs(loss)
        for name, want in expected.items():
            err = rel_error(got[name], want)
            assert err <= tol, f"filtered grad of {name}: rel error {err:.3e} > {tol} (eps={eps:.3e})"
    uncovered = torch.arange(classes) >= (col_tiles - 1) * tv
    assert (heads.weight.grad[uncovered] == 0).all()
    # Every covered row gets a gradient, unless each of its kept logit-gradient entries rounds
    # to 0 in the dlogits' dtype: in fp16 a class far below its rows' max (softmax ~1e-6,
    # times 1 / rows) falls under the smallest subnormal (seed 60 gave two such rows).
    representable = (kept.abs() >= torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps).any(dim=0)
    assert representable[~uncovered].any()
    assert (heads.weight.grad[~uncovered & representable] != 0).any(dim=1).all()
    assert (heads.bias.grad[uncovered] != 0).all()


def test_grad_filter_is_bitwise_repeatable():
    """The filtered GEMMs walk the marked tiles in a fixed order: two runs agree to the bit."""
    case = case_for([Task("vocab", 530, "cross_entropy", level="token"), Task("cls", 3, "cross_entropy")], (2, 40, 24))
    first = run_heads(case, "triton", torch.float32, grad_filter_eps="auto")[1]
    second = run_heads(case, "triton", torch.float32, grad_filter_eps="auto")[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_grad_filter_lets_nan_through():
    """A NaN logit (here from a NaN hidden state) marks its tiles: the gradients show it, as
    without a filter (GradScaler then skips the step), instead of losing it with the tile."""
    case = case_for([Task("vocab", 300, "cross_entropy", level="token")], (1, 70, 16), ignore_rate=0.0)
    case.hidden[0, 66, 5] = float("nan")
    case.labels["vocab"][0, 64:] = torch.where(torch.arange(64, 70) == 66, case.labels["vocab"][0, 64:], -100)
    out, grads = run_heads(case, "triton", torch.float32, grad_filter_eps=0.5)  # row 66 alone in its tile
    assert out.loss.isnan() and grads["weight"].isnan().any() and grads["hidden"][0, 66].isnan().all()


@pytest.mark.parametrize("trial", range(6))
def test_fixed_launch_keys_fix_every_argument(monkeypatch, trial):
    """The small path's launches keyed on the backend's step (``fixed=True``) are checked on
    every launch against the full key (types, dtypes, alignment, int specialization): a key
    that does not fix its arguments raises. Launched through stand-ins of compiled kernels
    (the interpreter has none), a case's second step launches them all directly. The loss
    finalize is a stand-in too, so nothing zeroes the loss sums and counts a forward's torch ops
    write (the large and wide paths', class-weighted counts): they go to buffers of this test's
    own, which later tests never see. Nor does it write ``validate=True``'s label-check flags:
    they are zeroed after it, as its programs would leave them for good labels."""
    from types import SimpleNamespace

    from mtlfast.bench.host_time import zeroing_check_flags
    from mtlfast.kernels import launcher, loss_finalize, small_heads

    launches = []

    class StandIn:
        def __init__(self, kernel, name):
            self.arg_names, self.name = kernel.arg_names, name

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append(("triton", self.name))
                return SimpleNamespace(run=lambda *a: launches.append(("direct", self.name)), function=None,
                                       packed_metadata=None)  # fmt: skip

            return run

    monkeypatch.setattr(triton_fused, "_LOSS_SUMS", {})
    monkeypatch.setattr(launcher, "ENABLED", True)
    monkeypatch.setattr(launcher, "_hooks_installed", lambda: False)
    monkeypatch.setattr(launcher, "_current_device", lambda: 0)
    for name, direct in [("small_heads", small_heads._launch_small_heads), ("reduce", small_heads._launch_reduce),
                         ("finalize", loss_finalize._launch)]:  # fmt: skip
        monkeypatch.setattr(direct, "kernel", StandIn(direct.kernel, name))
        monkeypatch.setattr(direct, "_current_stream", lambda device: 0)
        monkeypatch.setattr(direct, "check_fixed", True)
    monkeypatch.setattr(loss_finalize, "loss_finalize", zeroing_check_flags(loss_finalize.loss_finalize))
    random.seed(fresh_seed())
    case = random_case(max_classes=40, allow_extras=True)
    options = random.choice([{}, {"deterministic": True}, {"fuse_wgrad_accumulation": True}])
    frozen = random.random() < 0.25
    for _ in range(2):
        launches.clear()
        run_heads(case, "triton", torch.float32, frozen_hidden=frozen, **options)
    assert launches and all(kind == "direct" for kind, _ in launches), launches


def test_kept_small_launch_checked_against_other_shapes(monkeypatch):
    """A small-heads launch keeps its ints (strides, sizes) from its first call (the backend keeps
    a launch per shape, stride and dtype); with the launcher's check on, a later call with
    other shapes works them out anew and raises instead of launching with the kept ones."""
    from mtlfast.kernels import small_heads

    from mtlfast.task import TaskLayout

    heads = TaskLayout((Task("a", 3, "cross_entropy", level="token"),)).heads
    plan = triton_fused._small_plan(heads, torch.device("cpu"), split_levels=False)
    launch = small_heads.SmallHeadsLaunch(backward=False, seq_stride=1, compute_dtype=torch.float32,
                                          **plan.launch_fields)  # fmt: skip
    weight, bias = torch.randn(3, 16), torch.randn(3)
    sums = torch.zeros(2, 1)

    def call(rows: int) -> small_heads.Launched:
        target = torch.randint(0, 3, (rows,))
        table = torch.tensor([target.data_ptr()], dtype=torch.int64)
        return small_heads.launch_small_heads(launch, torch.randn(rows, 16), None, None, weight, bias, table,
                                              loss=sums[0], count=sums[1])  # fmt: skip

    call(40)
    monkeypatch.setattr(small_heads._launch_small_heads, "check_fixed", True)
    call(40)
    with pytest.raises(AssertionError, match="other shapes"):
        call(70)


def test_steps_kept_stay_bounded(monkeypatch):
    """Past ``STEPS_KEPT`` steps the oldest is dropped, and a call whose step was dropped works it
    out again and matches the oracle."""
    monkeypatch.setattr(triton_fused, "_STEPS", OrderedDict())
    monkeypatch.setattr(triton_fused, "STEPS_KEPT", 2)
    tasks = [Task("cls", 3, "cross_entropy"), Task("ner", 5, "cross_entropy", level="token"), Task("score", 1, "mse")]
    firsts = {}
    for batch in (2, 3, 5, 2):
        case = case_for(tasks, (batch, 4, 11))
        out, grads = run_heads(case, "triton", torch.float32)
        assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"B={batch}")
        assert len(triton_fused._STEPS) <= 2
        firsts.setdefault(batch, list(triton_fused._STEPS.values())[-1])
    kept = list(triton_fused._STEPS.values())
    assert len(kept) == 2 and kept[0] is firsts[5] and kept[1] is not firsts[2], "not the oldest dropped"


def test_tuned_shapes_name_the_launched_configurations():
    """``small_heads.tuned_shapes`` (what the profile prints) lists both directions of a launched
    width with the configuration they ran with: untuned here, the width's first candidate."""
    from mtlfast.kernels import small_heads

    tasks = [Task("cls", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token")]
    case = case_for(tasks, (2, 7, 24), nan_rate=0.0)
    run_heads(case, "triton", torch.float32)
    first = small_heads.SHAPES_BY_BLOCK_C[16][0]
    shapes = small_heads.tuned_shapes()
    for direction in ("forward", "backward"):
        assert (direction, 16, 16, first) in shapes, shapes


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_autotuner_offers_each_direction_its_own_candidates(backward):
    """The autotuner's pruning (what a GPU launch tunes over) keeps, of every width's
    configurations, exactly that width's candidates for the launch's direction: the
    forward-only ones in forward alone, the backward-only ones in backward alone."""
    from mtlfast.kernels import small_heads

    widths = small_heads.SHAPES_BY_BLOCK_C
    shapes = dict.fromkeys(s for w in widths for direction in (False, True) for s in small_heads.shapes_for(w, direction))
    every = [small_heads._config(shape) for shape in shapes]
    for block_c in widths:
        kept = [small_heads._shape(c) for c in small_heads._prune(every, {}, BLOCK_C=block_c, BACKWARD=backward)]
        assert sorted(kept) == sorted(small_heads.shapes_for(block_c, backward)), block_c
        forward_only = set(small_heads.shapes_for(block_c, False)) - set(small_heads.shapes_for(block_c, True))
        assert forward_only & set(kept) == (set() if backward else forward_only), (block_c, kept)
        backward_only = set(small_heads.shapes_for(block_c, True)) - set(small_heads.shapes_for(block_c, False))
        assert backward_only & set(kept) == (backward_only if backward else set()), (block_c, kept)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("candidate", small_heads_candidates(), ids=candidate_id)
def test_every_small_heads_candidate(monkeypatch, candidate, dtype):
    """Each autotuning candidate of the small-heads kernel (its BLOCK_M and BLOCK_K; the
    interpreter ignores warps and stages), forced as the only one, on a random case of its
    width, against the oracle: the autotuner may pick any of them on a GPU, where the other
    tests run the first. bf16 under autocast, within eager bf16's error plus 1e-2.
    Deterministic partials and float atomics alternate."""
    block_c, shape = candidate
    bf16 = dtype == torch.bfloat16
    atomics = (small_heads_candidates().index(candidate) + [*DTYPES, torch.bfloat16].index(dtype)) % 2 == 1
    case, out, grads = run_small_heads_candidate(monkeypatch, block_c, shape, "cpu", dtype, atomics, autocast=bf16)
    assert_matches(case, out, grads, dtype, f"triton/{dtype}")


def _expected_program_flags(bad: torch.Tensor, programs: int) -> list[int]:
    """Per program of the label check, whether one of the elements it walks (blocks ``p``,
    ``p + programs``, ...) is flagged in ``bad`` (flat bool)."""
    block = label_check.BLOCK
    owner = (torch.arange(bad.numel()) // block) % programs
    return [int(bad[owner == p].any()) for p in range(programs)]


@pytest.mark.parametrize("trial", range(10))
def test_label_check_flags_every_program_and_task(trial):
    """The label check's flags [T, P], poisoned before the loss finalize launch that runs it,
    element by element against a check of its own here: random tasks (class ids at either level, with an attention
    mask or without; bce; mse, which is never flagged) holding out-of-range values at random
    places, none in some tasks, some behind the mask (not flagged) and among ignore indices and
    NaNs (not flagged either). Odd trials add a bce task of 80000 targets, more than the
    programs' first pass covers. The launch's program 0, the finalize itself, is checked too."""
    rng = random.Random(fresh_seed())
    batch, seq_len = rng.randint(1, 4), rng.randint(1, 40)
    mask = (torch.rand(batch * seq_len) < 0.7) if rng.random() < 0.7 else None
    tasks, targets, bad_by_task = [], [], []
    for k in range(rng.randint(1, 7) + trial % 2):
        big = trial % 2 and k == 0
        loss = "bce" if big else rng.choice(["cross_entropy", "cross_entropy", "bce", "mse"])
        level = rng.choice(["sequence", "token"])
        classes = 2000 if big else rng.randint(2, 12)
        task = Task(f"t{k}", classes, loss, level=level, ignore_index=rng.choice([-100, -1, classes, 255]))
        rows = batch * seq_len if level == "token" else batch
        if big:
            rows = 40
        if loss == "cross_entropy":
            target = torch.randint(0, classes, (rows,))
            target[torch.rand(rows) < 0.2] = task.ignore_index
            wrong = torch.tensor([classes, classes + 7, -1, -2**40, 2**40], dtype=torch.int64)
        else:
            target = torch.rand(rows, classes)
            target[torch.rand(rows, classes) < 0.1] = float("nan")
            wrong = torch.tensor([1.0 + 2**-20, -(2**-30), 2.0, float("inf"), -float("inf")])
        flat = target.view(-1)
        for _ in range(rng.choice([2, 3] if big else [0, 0, 1, 3])):
            flat[rng.randrange(flat.numel())] = wrong[rng.randrange(wrong.numel())]
        if loss == "cross_entropy":
            bad = (flat != task.ignore_index) & ((flat < 0) | (flat >= classes))
            if level == "token" and mask is not None:
                bad &= mask
        elif loss == "bce":
            bad = (flat.double() < 0) | (flat.double() > 1)
        else:
            bad = torch.zeros(0, dtype=torch.bool)
        tasks.append(task)
        targets.append(target)
        bad_by_task.append(bad)
    heads = TaskLayout(tuple(tasks)).heads
    check = triton_fused.plan_label_check(heads, targets, mask, torch.float32)
    programs = label_check.flag_programs(max(bad.numel() for bad in bad_by_task))
    assert check.flags.shape == (len(tasks), programs) and check.flags.dtype == torch.int32
    assert (check.flags == POISON_INT).all()  # planned, not yet run
    finalized = _finalize_with_check(len(tasks), check)
    expected = [_expected_program_flags(bad, programs) for bad in bad_by_task]
    assert check.flags.tolist() == expected, [(t.name, t.loss, t.level, t.ignore_index) for t in tasks]
    for name, (got, want) in finalized.items():  # program 0's finalize beside the check's programs
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=name)


def _finalize_with_check(n_tasks: int, check) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Runs the loss finalize with ``check`` on random sums, counts, divisors and weights into
    poisoned outputs; returns each output (and the sums and counts, zeroed by it) beside its
    expected value, worked out here in float64."""
    from mtlfast.kernels import loss_finalize

    sums, weights = torch.rand(n_tasks) * 10, torch.rand(n_tasks)
    counts = torch.randint(0, 4, (n_tasks,)).float()
    count_scale = torch.randint(1, 5, (n_tasks,)).float()
    override = torch.where(torch.rand(n_tasks) < 0.3, torch.rand(n_tasks) * 3, -1.0)
    divisor = torch.where(override >= 0, override, counts * count_scale).double()
    want_losses = torch.where(divisor > 0, sums.double() / divisor.clamp_min(1e-30), 0.0)
    want_scales = torch.where(divisor > 0, weights.double() / divisor.clamp_min(1e-30), 0.0)
    want = {"losses": want_losses.float(), "scales": want_scales.float(),
            "total": (weights.double() * want_losses).sum().float(), "sums": torch.zeros(n_tasks),
            "counts": torch.zeros(n_tasks)}  # fmt: skip
    got = {"losses": poisoned_buffer((n_tasks,), torch.float32, "cpu"),
           "scales": poisoned_buffer((n_tasks,), torch.float32, "cpu"),
           "total": poisoned_buffer((), torch.float32, "cpu"), "sums": sums, "counts": counts}  # fmt: skip
    loss_finalize.loss_finalize(sums, counts, count_scale, override, weights, got["losses"], got["scales"],
                                got["total"], check=check)  # fmt: skip
    return {name: (got[name], want[name]) for name in want}


@pytest.mark.parametrize(
    "label, value, mask_it, match",
    [
        ("sentiment", 3, False, "task 'sentiment'.*class ids must lie in \\[0, 3\\)"),
        ("sentiment", -1, False, "task 'sentiment'.*class ids"),
        ("ner", 9, False, "task 'ner'.*class ids must lie in \\[0, 9\\) or equal ignore_index -100"),
        ("ner", 9, True, None),
        ("topics", 1.5, False, "task 'topics'.*\\[0, 1\\]"),
        ("topics", -0.5, False, "task 'topics'.*\\[0, 1\\]"),
        ("topics", float("nan"), False, None),
        ("vocab", 300, False, "task 'vocab'.*class ids must lie in \\[0, 300\\)"),
    ],
)
@pytest.mark.parametrize("how", ["kernel", "fp64", "num-items-tensor"])
def test_validate_checks_values_on_the_triton_backend(label, value, mask_it, match, how):
    """``validate=True`` on the triton backend: the loss finalize's launch checks every task
    (the small heads, the vocabulary head), beside torch ops for tensors among
    ``num_items_in_batch``, or where it does not apply (fp64) torch ops alone; either way a
    value out of range is a ValueError naming its task, and one behind the attention mask, or
    a NaN bce target, is not; a negative count is a ValueError too."""
    tasks = [Task("sentiment", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token"),
             Task("score", 1, "mse"), Task("topics", 4, "bce"), Task("vocab", 300, "cross_entropy", level="token")]  # fmt: skip
    batch, seq_len, hidden_size = 2, 5, 8
    dtype = torch.float64 if how == "fp64" else torch.float32
    heads = MultiTaskHeads(hidden_size, tasks, backend="triton").to(dtype)
    labels = {"sentiment": torch.tensor([0, 2]), "ner": torch.randint(0, 9, (batch, seq_len)),
              "score": torch.randn(batch), "topics": torch.rand(batch, 4),
              "vocab": torch.randint(0, 300, (batch, seq_len))}  # fmt: skip
    labels[label].view(-1)[-1] = value
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if mask_it:
        mask[-1, -1] = 0
    num_items = {"ner": torch.tensor(7)} if how == "num-items-tensor" else None
    from mtlfast.kernels import loss_finalize

    launches = []
    launch = loss_finalize.loss_finalize

    def counted(*args, check=None):
        launches.append(check is not None)
        return launch(*args, check=check)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loss_finalize, "loss_finalize", counted)
        call = lambda: heads(torch.randn(batch, seq_len, hidden_size, dtype=dtype), labels, attention_mask=mask,  # noqa: E731
                             num_items_in_batch=num_items)  # fmt: skip
        if match is None:
            assert torch.isfinite(call().loss)
        else:
            with pytest.raises(ValueError, match=match):
                call()
    assert launches == ([] if how == "fp64" else [True])
    if how == "num-items-tensor":
        good = {"ner": torch.randint(0, 9, (batch, seq_len)), "topics": torch.rand(batch, 4)}
        with pytest.raises(ValueError, match="task 'ner'.*num_items_in_batch must be >= 0"):
            heads(torch.randn(batch, seq_len, hidden_size), good,
                  num_items_in_batch={"topics": torch.tensor(3.0), "ner": torch.tensor(-2)})  # fmt: skip
