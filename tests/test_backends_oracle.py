"""Every CPU backend against the float64 oracle, on fresh random cases each run."""

import pytest
import torch
from oracle import (
    TOLERANCE,
    Case,
    assert_matches_oracle,
    bad_class_id_cases,
    case_for,
    check_autocast_reads_fp32_rows,
    check_frozen_hidden,
    check_strided_inputs,
    fresh_seed,
    oracle,
    random_case,
    rel_error,
    run_heads,
)
from oracle import eager_total as oracle_eager_total
from torch.utils._python_dispatch import TorchDispatchMode

from mtlfast import Task
from mtlfast.backends import torch_chunked
from mtlfast.task import TOKEN, TaskLayout

BACKENDS = ["reference", "torch"]
DTYPES = [torch.float64, torch.float32, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(12))
def test_random_cases(backend, dtype, trial):
    case = random_case()
    kwargs = {"chunk_size": case.seed % 5 + 1} if backend == "torch" and trial % 2 else {}
    out, grads = run_heads(case, backend, dtype, **kwargs)
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(3))
def test_random_cases_into_main_grad(backend, dtype, trial):
    """``fuse_wgrad_accumulation``: what is added to a weight's ``main_grad`` (holding noise
    before) is the oracle's weight gradient; rows of absent tasks keep their contents."""
    case = random_case()
    out, grads = run_heads(case, backend, dtype, fuse_wgrad_accumulation=True)
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], f"{backend}/{dtype} into main_grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_fp16_keeps_fp32_parameter_grads(backend):
    case = random_case(num_tasks=3)
    out, grads = run_heads(case, backend, torch.float16, autocast=True)
    assert grads["weight"].dtype == torch.float32 and grads["bias"].dtype == torch.float32
    assert_matches_oracle(case, out, grads, torch.float16, TOLERANCE[torch.float16], f"{backend}/autocast-fp16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_reads_fp32_hidden_states_as_cast_ones(backend, dtype):
    case = random_case()
    check_autocast_reads_fp32_rows(case, backend, dtype, chunk_size=case.seed % 9 + 1)


@pytest.mark.parametrize("trial", range(4))
def test_torch_backend_bf16_within_eager_error(trial):
    case = random_case()
    ref_total, _, ref_grads = oracle(case, torch.bfloat16)
    # eager bf16: per-task F.linear and losses on bf16 tensors
    h = case.hidden.bfloat16().requires_grad_(True)
    w = case.weight.bfloat16().requires_grad_(True)
    b = case.bias.bfloat16().requires_grad_(True)
    pooled = case.pooled.bfloat16().requires_grad_(True) if case.pooled is not None else None
    eager_total = oracle_eager_total(case, h, pooled, w, b)
    names = ["hidden", "weight", "bias"] + (["pooled"] if pooled is not None else [])
    leaves = [h, w, b] + ([pooled] if pooled is not None else [])
    eager_grads = dict(zip(names, torch.autograd.grad(eager_total, leaves, allow_unused=True)))
    out, grads = run_heads(case, "torch", torch.bfloat16)
    assert rel_error(out.loss, ref_total) <= rel_error(eager_total, ref_total) + 1e-2, case.describe()
    for name in names:
        bound = rel_error(eager_grads[name], ref_grads[name]) + 1e-2
        assert rel_error(grads.get(name), ref_grads[name]) <= bound, f"{name}: {case.describe()}"


EDGE_CASES = {
    "single_task": dict(num_tasks=1),
    "forty_tasks": dict(num_tasks=40, max_classes=7),
    "single_row": dict(shape=(1, 1, 5)),
    "dense_c1": dict(losses=("bce", "mse"), max_classes=1),
    "sequence_only": dict(levels=("sequence",)),
    "token_only": dict(levels=("token",)),
    "wide_heads": dict(num_tasks=5, ce_classes=(120, 700)),
    "empty_batch": dict(shape=(0, 4, 13)),
    "no_positions": dict(shape=(3, 0, 13), levels=("token",)),
    "same_width_cross_entropy": dict(num_tasks=5, losses=("cross_entropy",), ce_classes=(6, 6)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edge", sorted(EDGE_CASES))
def test_edge_shapes(backend, edge):
    case = random_case(**EDGE_CASES[edge])
    out, grads = run_heads(case, backend, torch.float32)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"{backend}/{edge}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(backend, dtype):
    """Hidden states, pooled rows, weight and bias that are strided views of larger tensors."""
    check_strided_inputs(random_case(ce_classes=(2, 300)), backend, dtype)


def _fixed_case(labels_fn, **extra) -> Case:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    tasks = [
        Task("cls", 4, "cross_entropy", label_smoothing=0.2),
        Task("ner", 7, "cross_entropy", level="token"),
        Task("reg", 1, "mse"),
        Task("tags", 5, "bce", level="token"),
    ]
    B, S, D = 3, 6, 11
    hidden = torch.randn(B, S, D, generator=gen)
    weight = torch.randn(17, D, generator=gen) * 0.3
    bias = torch.randn(17, generator=gen) * 0.1
    return Case(tasks, hidden, labels_fn(B, S, gen), weight, bias, seed=seed, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero_loss_and_grads(backend):
    def labels(B, S, gen):
        return {
            "cls": torch.full((B,), -100),
            "ner": torch.full((B, S), -100),
            "reg": torch.full((B,), float("nan")),
            "tags": torch.full((B, S, 5), float("nan")),
        }

    case = _fixed_case(labels)
    out, grads = run_heads(case, backend, torch.float32)
    assert out.loss.item() == 0.0 and all(v.item() == 0.0 for v in out.losses.values())
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) == 0, name
    assert_matches_oracle(case, out, grads, torch.float32, 1e-6, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_ignored_and_num_items_zero(backend):
    def labels(B, S, gen):
        return {
            "cls": torch.randint(0, 4, (B,), generator=gen),
            "ner": torch.randint(0, 7, (B, S), generator=gen),
            "reg": torch.randn(B, 1, generator=gen),
            "tags": torch.rand(B, S, 5, generator=gen),
        }

    case = _fixed_case(labels, num_items={"ner": 0, "tags": torch.tensor(4), "cls": torch.tensor([[3.0]])})
    out, grads = run_heads(case, backend, torch.float32)
    assert out.losses["ner"].item() == 0.0
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_mask_and_pooled(backend):
    def labels(B, S, gen):
        return {
            "cls": torch.randint(0, 4, (B,), generator=gen),
            "ner": torch.randint(0, 7, (B, S), generator=gen),
            "tags": torch.rand(B, S, 5, generator=gen),
        }

    case = _fixed_case(labels)
    case.attention_mask = torch.ones(3, 6, dtype=torch.long)
    case.attention_mask[1, 2:] = 0
    case.attention_mask[2, :] = 0
    case.pooled = torch.randn(3, 11)
    out, grads = run_heads(case, backend, torch.float32)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], backend)
    assert grads["pooled"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [7, 300], ids=["small-head", "vocab-head"])
def test_validate_false_skips_bad_class_ids(backend, classes):
    """With validate=False a class id outside [0, C) is skipped like ignore_index, never read."""
    case, ignored = bad_class_id_cases(classes)
    out, grads = run_heads(case, backend, torch.float32, validate=False)
    assert_matches_oracle(ignored, out, grads, torch.float32, TOLERANCE[torch.float32], f"{backend}/bad ids")


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fp32_accumulating_gemm_on_cpu(beta, dtype):
    """``addmm_acc_``: ``out = beta * out + a @ b`` in fp32; beta 0 never reads ``out`` (NaN)."""
    from mtlfast.backends.base import addmm_acc_

    a = torch.randn(31, 17).to(dtype)
    b = torch.randn(13, 17).to(dtype).t()
    start = torch.randn(31, 13)
    out = torch.full_like(start, float("nan")) if beta == 0 else start.clone()
    addmm_acc_(out, a, b, beta=beta)
    expected = a.double() @ b.double() + (start.double() if beta else 0)
    assert rel_error(out, expected) <= 1e-6


def test_host_values_cache_keeps_the_recently_used():
    """``HostValuesCache``: a key seen before gets its tensor back (no copy); past ``kept`` keys
    the least recently used is made anew, and each tensor holds its own values."""
    from mtlfast.backends.base import HostValuesCache

    cache = HostValuesCache(kept=2)
    values = [tuple(torch.randn(3).tolist()) for _ in range(3)]

    def get(i):
        return cache.get(("key", i), values[i], torch.float64, torch.device("cpu"))

    first, second = get(0), get(1)
    assert get(0) is first  # 0 is now the most recently used
    third = get(2)  # drops 1
    assert get(0) is first and get(2) is third and get(1) is not second
    for i, tensor in ((0, first), (1, get(1)), (2, third)):
        assert tensor.tolist() == list(values[i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(3))
def test_frozen_hidden_states(backend, trial):
    check_frozen_hidden(random_case(), backend, torch.float32)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_torch_backend_ops_do_not_grow_with_tasks(monkeypatch):
    """The torch backend computes a level's tasks of each loss together (cross-entropy ones in a
    block per power-of-two bracket of C, with class weights or without): its forward issues as
    many tensor ops for 240 tasks as for 120 (levels alternating; C from 2 to 12, every fourth
    task class-weighted, every other one smoothed: every kind of block present in both, the wider ones
    padded)."""
    real_forward, counter = torch_chunked.forward, _OpCounter()

    def counted_forward(problem):
        with counter:
            return real_forward(problem)

    monkeypatch.setattr(torch_chunked, "forward", counted_forward)
    ops = {}
    losses, levels = ("cross_entropy", "bce", "mse"), ("sequence", "token")

    def task(k: int) -> Task:
        classes, loss = 2 + (5 * k) % 11, losses[k % 3]
        ce = loss == "cross_entropy"
        return Task(f"t{k}", classes, loss, level=levels[k // 3 % 2], label_smoothing=0.1 if ce and k % 2 else 0.0,
                    class_weights=[0.5 + c % 3 for c in range(classes)] if ce and k % 4 == 0 else None)  # fmt: skip

    for num_tasks in (120, 240):
        case = case_for([task(k) for k in range(num_tasks)], (3, 5, 16))
        run_heads(case, "torch", torch.float32)  # builds the cached plan
        counter.ops = 0
        out, grads = run_heads(case, "torch", torch.float32)
        ops[num_tasks] = counter.ops
        assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"{num_tasks} tasks")
    assert ops[120] == ops[240], ops


@pytest.mark.parametrize("pooled", [False, True], ids=["first-token", "pooled"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_torch_backend_mixes_dh_from_forward_and_backward(pooled, chunk_size):
    """D = 40: the 300-class head's dH is computed in forward (its dlogits would be wider than dH),
    the narrow heads' in backward from their kept dlogits (5 and 7 columns); both add up."""
    tasks = [Task("vocab", 300, "cross_entropy", level="token"), Task("ner", 5, "cross_entropy", level="token"),
             Task("cls", 3, "cross_entropy", label_smoothing=0.1), Task("tags", 4, "bce")]  # fmt: skip
    case = case_for(tasks, (3, 7, 40))
    if pooled:
        case.pooled = torch.randn(3, 40)
    out, grads = run_heads(case, "torch", torch.float32, chunk_size=chunk_size)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], case.describe())


def test_torch_backend_pads_cross_entropy_within_a_bracket():
    """One 100-class task among twenty binary ones: the binary tasks are not padded to 100 columns.
    The span is 20 * 2 + 100 columns wide, and its results match the oracle."""
    tasks = [Task(f"bin{k}", 2, "cross_entropy", level="token") for k in range(20)]
    tasks.insert(7, Task("wide", 100, "cross_entropy", level="token"))
    case = case_for(tasks, (2, 5, 24))
    assert [width for _, width in torch_chunked._level_spans(TaskLayout(tuple(tasks)).heads, TOKEN)] == [140]
    out, grads = run_heads(case, "torch", torch.float32)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], case.describe())


def _softcap_and_z_loss_case() -> Case:
    """Cross-entropy heads with a softcap, a z-loss or both (small and 300-class, both levels,
    with label smoothing and class weights) beside plain ones of the same widths, logits large
    enough for the cap to bite."""
    tasks = [Task("capped", 7, "cross_entropy", level="token", softcap=1.5, label_smoothing=0.1, z_loss=0.1),
             Task("plain", 5, "cross_entropy", level="token"),
             Task("z", 4, "cross_entropy", level="token", z_loss=0.05),
             Task("capped_seq", 3, "cross_entropy", softcap=0.5, class_weights=[1.0, 2.0, 0.5]),
             Task("capped_vocab", 300, "cross_entropy", level="token", softcap=4.0, z_loss=1e-2),
             Task("z_vocab", 200, "cross_entropy", z_loss=0.2, label_smoothing=0.2),
             Task("tags", 2, "bce", level="token")]  # fmt: skip
    case = case_for(tasks, (3, 9, 24))
    case.weight *= 3.0
    return case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_softcap_and_z_loss(backend, dtype):
    case = _softcap_and_z_loss_case()
    out, grads = run_heads(case, backend, dtype, chunk_size=case.seed % 11 + 1)
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], f"{backend}/softcap+z/{dtype}")
