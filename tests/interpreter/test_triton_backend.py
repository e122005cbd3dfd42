"""backend="triton" under TRITON_INTERPRET=1 on the CPU, against the float64 oracle.

Run by tests/test_triton_interpreter.py in a process of its own (the variable must be
set before triton is imported). fp32 and fp16 only: the interpreter's bf16 dot is broken.
"""

import os
import random

import pytest
import torch
from oracle import TOLERANCE, assert_matches_oracle, case_for, fresh_seed, random_case, run_heads

from mtlfast import Task
from mtlfast.backends import triton_fused

assert os.environ.get("TRITON_INTERPRET") == "1"

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels must overwrite starts as NaN: an unwritten element fails."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_fused, "alloc_output", poisoned)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(10))
def test_random_cases(dtype, trial):
    case = random_case()
    out, grads = run_heads(case, "triton", dtype)
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], f"triton/{dtype}")


@pytest.mark.parametrize("trial", range(3))
def test_autocast_fp16(trial):
    case = random_case()
    out, grads = run_heads(case, "triton", torch.float16, autocast=True)
    assert grads["weight"].dtype == torch.float32
    assert_matches_oracle(case, out, grads, torch.float16, TOLERANCE[torch.float16], "triton/autocast")


@pytest.mark.parametrize("deterministic", [False, True])
def test_many_groups(deterministic):
    """40 tasks: several column groups, the fp32 dH scratch and (deterministic) partial buffers."""
    case = random_case(num_tasks=40, max_classes=9)
    out, grads = run_heads(case, "triton", torch.float32, deterministic=deterministic)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton/40 tasks")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(3))
def test_large_cross_entropy_path(dtype, trial):
    """Cross-entropy heads wider than SMALL_CE_MAX take the tiled online-LSE path, beside small heads."""
    rng = random.Random(fresh_seed())
    tasks = [
        Task("vocab", rng.randint(129, 400), "cross_entropy", level=rng.choice(["token", "sequence"]),
             label_smoothing=rng.choice([0.0, 0.1])),
        Task("tags", rng.randint(1, 5), "bce", level="token"),
        Task("cls", rng.randint(2, 6), "cross_entropy"),
    ]  # fmt: skip
    case = case_for(tasks, (2, rng.randint(1, 6), rng.choice([7, 24])))
    out, grads = run_heads(case, "triton", dtype)
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], f"triton/large/{dtype}")


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


def test_launch_count_does_not_grow_with_tasks(monkeypatch):
    """One training step launches the same number of Triton kernels for 4 and 40 small heads."""
    from mtlfast.kernels import large_ce, small_heads

    launches = []

    class Counting:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for module, attr in ((small_heads, "_forward_kernel"), (small_heads, "_backward_kernel"),
                         (large_ce, "_lse_kernel"), (large_ce, "_backward_kernel")):  # fmt: skip
        monkeypatch.setattr(module, attr, Counting(getattr(module, attr), attr))

    def count(num_tasks):
        launches.clear()
        case = random_case(num_tasks=num_tasks, max_classes=8, shape=(2, 5, 12), allow_extras=False)
        run_heads(case, "triton", torch.float32)
        return len(launches)

    four, forty = count(4), count(40)
    assert four == forty == 2
