"""Bad input: a ValueError or TypeError naming the task and the problem."""

import pytest
import torch

from mtlfast import MultiTaskHeads, Task, multitask_loss

TASKS = [
    Task("sentiment", 3, "cross_entropy"),
    Task("ner", 9, "cross_entropy", level="token"),
    Task("score", 1, "mse"),
    Task("topics", 4, "bce"),
]
B, S, D = 2, 5, 8


def _call(labels=None, hidden=None, **kwargs):
    heads = MultiTaskHeads(D, TASKS, backend="torch")
    hidden = torch.randn(B, S, D) if hidden is None else hidden
    return heads(hidden, labels, **kwargs)


def _good():
    return {
        "sentiment": torch.tensor([0, 2]),
        "ner": torch.zeros(B, S, dtype=torch.long),
        "score": torch.randn(B),
        "topics": torch.rand(B, 4),
    }


@pytest.mark.parametrize(
    "task_kwargs, match",
    [
        (dict(name="x", num_outputs=1, loss="cross_entropy"), "num_outputs >= 2"),
        (dict(name="x", num_outputs=3, loss="hinge"), "loss must be one of"),
        (dict(name="x", num_outputs=3, loss="bce", level="word"), "level must be one of"),
        (dict(name="x", num_outputs=3, loss="bce", label_smoothing=0.1), "only for cross_entropy"),
        (dict(name="x", num_outputs=3, loss="cross_entropy", label_smoothing=1.5), "label_smoothing"),
        (dict(name="x", num_outputs=3, loss="mse", pos_weight=2.0), "pos_weight is only for bce"),
        (dict(name="x", num_outputs=3, loss="bce", pos_weight=[1.0, 2.0]), "2 values for 3 outputs"),
        (dict(name="x", num_outputs=2, loss="bce", pos_weight=[1.0, float("inf")]), "finite and >= 0"),
        (dict(name="x", num_outputs=2, loss="bce", pos_weight=-0.5), "finite and >= 0"),
        (dict(name="x", num_outputs=2, loss="bce", class_weights=[1.0, 2.0]), "class_weights is only for cross_entropy"),
        (dict(name="x", num_outputs=3, loss="cross_entropy", class_weights=2.0), "1 values for 3 outputs"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", class_weights=[1.0, float("nan")]), "finite and >= 0"),
        (dict(name="x", num_outputs=2, loss="bce", softcap=30.0), "softcap is only for cross_entropy"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", softcap=0.0), "softcap must be finite and > 0"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", softcap=float("inf")), "softcap must be finite and > 0"),
        (dict(name="x", num_outputs=2, loss="mse", z_loss=1e-4), "z_loss is only for cross_entropy"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", z_loss=-1.0), "z_loss must be finite and >= 0"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", z_loss=1e-4, class_weights=[1.0, 2.0]),
         "z_loss does not combine with class_weights"),
        # beyond fp32, where the losses take them (inf there: NaN or inf losses), or too large for a float
        (dict(name="x", num_outputs=2, loss="cross_entropy", softcap=1e39), "softcap must be finite and > 0 .in fp32"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", softcap=10**400), "softcap must be finite and > 0"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", z_loss=1e39), "z_loss must be finite and >= 0 .in fp32"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", z_loss=10**400), "z_loss must be finite and >= 0"),
        (dict(name="x", num_outputs=2, loss="bce", weight=-1e39), "task 'x': weight must be finite .in fp32"),
        (dict(name="x", num_outputs=2, loss="bce", weight=10**400), "task 'x': weight must be finite"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", class_weights=[1.0, 1e39]), "finite and >= 0 .in fp32"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", class_weights=[10**400, 1]), "finite and >= 0 .in fp32"),
        (dict(name="x", num_outputs=2, loss="bce", pos_weight=1e39), "pos_weight must be finite and >= 0 .in fp32"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", ignore_index=2**63), "ignore_index must fit in int64"),
        (dict(name="x", num_outputs=2, loss="cross_entropy", ignore_index=-(10**30)), "ignore_index must fit in int64"),
    ],
)  # fmt: skip
def test_bad_task_definitions(task_kwargs, match):
    with pytest.raises(ValueError, match=match):
        Task(**task_kwargs)


def test_pos_weight_that_is_not_numbers():
    with pytest.raises(TypeError, match="task 'x': pos_weight must be numbers"):
        Task("x", 2, "bce", pos_weight="heavy")


@pytest.mark.parametrize("weight", ["2", None, True])
def test_task_weight_that_is_not_a_number(weight):
    with pytest.raises(TypeError, match="task 'x': weight must be a number"):
        Task("x", 2, "bce", weight=weight)


def test_options_at_the_edge_of_fp32_are_taken():
    """The largest fp32 numbers are still options (the checks refuse only what fp32 makes inf)."""
    largest = torch.finfo(torch.float32).max
    task = Task("x", 3, "cross_entropy", softcap=largest, weight=-largest, class_weights=[largest, 0.0, 1.0])
    assert task.softcap == largest and task.class_weights == (largest, 0.0, 1.0)
    assert Task("y", 2, "bce", pos_weight=int(largest)).pos_weight == (largest, largest)


def test_duplicate_task_names():
    with pytest.raises(ValueError, match="unique"):
        MultiTaskHeads(D, [Task("a", 2, "bce"), Task("a", 3, "mse")])


def test_unknown_task_name():
    labels = _good()
    labels["sentimen"] = labels.pop("sentiment")
    with pytest.raises(ValueError, match="sentimen"):
        _call(labels)


def test_hidden_size_mismatch():
    with pytest.raises(ValueError, match="hidden size 7"):
        _call(_good(), hidden=torch.randn(B, S, 7))


def test_hidden_size_zero():
    """D = 0 (reachable through the functional call, whose weight is the caller's) is named,
    not left to a reshape deep inside."""
    total = sum(t.num_outputs for t in TASKS)
    for hidden in (torch.randn(B, S, 0), torch.randn(B, 0)):
        with pytest.raises(ValueError, match="D >= 1"):
            multitask_loss(hidden, torch.randn(total, 0), torch.zeros(total), TASKS, _good(), backend="torch")


def test_token_task_with_2d_hidden():
    with pytest.raises(ValueError, match="task 'ner'.*\\[B, S, D\\]"):
        _call(_good(), hidden=torch.randn(B, D))


def test_sequence_task_with_no_positions():
    """S = 0 leaves no hidden_states[:, 0] for a sequence task to read (the triton backend took
    its loss as 0); token tasks alone, or pooled rows, are fine."""
    labels = {"sentiment": torch.tensor([0, 2]), "ner": torch.zeros(B, 0, dtype=torch.long)}
    empty = torch.randn(B, 0, D)
    with pytest.raises(ValueError, match="task 'sentiment'.*S = 0.*pooled"):
        _call(labels, hidden=empty)
    with pytest.raises(ValueError, match="task 'sentiment'.*S = 0"):
        _call(None, hidden=empty)
    assert _call({"ner": labels["ner"]}, hidden=empty).loss.item() == 0.0
    assert _call(labels, hidden=empty, pooled=torch.randn(B, D)).losses["sentiment"] > 0


@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("sentiment", torch.tensor([0.0, 1.0]), TypeError, "task 'sentiment'.*integer class ids"),
        ("topics", torch.ones(B, 4, dtype=torch.long), TypeError, "task 'topics'.*floating-point"),
        ("ner", torch.zeros(B, S + 1, dtype=torch.long), ValueError, "task 'ner'.*shape"),
        ("topics", torch.rand(B, 5), ValueError, "task 'topics'.*shape"),
        ("score", torch.rand(B, 2), ValueError, rf"task 'score': labels must have shape \({B}, 1\) or \({B},\), got \({B}, 2\)"),
        ("ner", torch.zeros(B * S, dtype=torch.long), ValueError, rf"task 'ner': labels must have shape \({B}, {S}\), got"),
        ("sentiment", [0, 1], TypeError, "task 'sentiment'.*torch.Tensor"),
    ],
)
def test_bad_labels(name, value, error, match):
    labels = _good()
    labels[name] = value
    with pytest.raises(error, match=match):
        _call(labels)


@pytest.mark.parametrize("name", ["topics", "score"])
def test_targets_that_require_grad(name):
    """Soft targets that require grad (a teacher's, not detached): the heads give targets no
    gradient, so a training call is a ValueError, not a gradient silently dropped; without
    grad mode, or detached, the same targets are fine."""
    teacher = torch.randn(_good()[name].shape, requires_grad=True)
    labels = _good()
    labels[name] = torch.sigmoid(teacher)
    with pytest.raises(ValueError, match=f"task '{name}'.*targets require grad.*detach"):
        _call(labels)
    with torch.no_grad():
        assert torch.isfinite(_call(labels).loss)
    labels[name] = labels[name].detach()
    assert torch.isfinite(_call(labels).loss)


@pytest.mark.parametrize("bad", [3, -1, -7])
def test_class_ids_out_of_range(bad):
    labels = _good()
    labels["sentiment"] = torch.tensor([0, bad])
    with pytest.raises(ValueError, match="task 'sentiment'.*class ids"):
        _call(labels)


def test_masked_positions_are_not_validated():
    labels = _good()
    labels["ner"][1, 4] = 99
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4] = 0
    assert torch.isfinite(_call(labels, attention_mask=mask).loss)
    with pytest.raises(ValueError, match="task 'ner'"):
        _call(labels)


def test_bce_targets_outside_unit_interval():
    labels = _good()
    labels["topics"][0, 1] = 1.5
    with pytest.raises(ValueError, match="task 'topics'.*\\[0, 1\\]"):
        _call(labels)


def test_bad_num_items_and_options():
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0"):
        _call(_good(), num_items_in_batch={"ner": -3})
    with pytest.raises(ValueError, match=r"task 'ner': num_items_in_batch must be finite \(in fp32"):
        _call(_good(), num_items_in_batch={"ner": 10**400})
    with pytest.raises(TypeError, match="task 'ner': num_items_in_batch must be an int or a tensor of one element"):
        _call(_good(), num_items_in_batch={"ner": 2.5})
    with pytest.raises(ValueError, match=r"task 'ner': num_items_in_batch must be a tensor of one element.*\(2, 1\)"):
        _call(_good(), num_items_in_batch={"ner": torch.tensor([[3], [3]])})
    with pytest.raises(TypeError, match="num_items_in_batch must be a dict of task name -> int or a tensor of one element"):
        _call(_good(), num_items_in_batch=[("ner", 3)])
    with pytest.raises(ValueError, match="unknown tasks"):
        _call(_good(), num_items_in_batch={"nope": 3})
    with pytest.raises(ValueError, match="attention_mask"):
        _call(_good(), attention_mask=torch.ones(B, S + 1))
    with pytest.raises(ValueError, match="pooled"):
        _call(_good(), pooled=torch.randn(B, D + 1))
    with pytest.raises(TypeError, match="hidden_states must be floating"):
        _call(_good(), hidden=torch.ones(B, S, D, dtype=torch.long))


@pytest.mark.parametrize(
    "count",
    [torch.tensor(-2), torch.tensor([[float("nan")]]), torch.tensor(float("inf")), torch.tensor(1e39, dtype=torch.float64)],
    ids=["negative", "nan", "inf", "beyond-fp32"],
)  # fmt: skip
def test_bad_num_items_tensor_values(count):
    """A count tensor's value is checked with the labels (one host sync): NaN gave a NaN loss,
    and inf (or an fp64 count beyond fp32) a loss of 0, silently."""
    with pytest.raises(ValueError, match=r"task 'ner': num_items_in_batch must be >= 0 and finite \(in fp32"):
        _call(_good(), num_items_in_batch={"ner": count})


@pytest.mark.parametrize(
    "option, value, match",
    [*(("grad_filter_eps", v, "grad_filter_eps") for v in [-1e-3, float("nan"), float("inf"), "high", True, [0.1]]),
     *(("chunk_size", v, "chunk_size must be a positive int or None") for v in [0, -4, 2.0, "8", True]),
     ("backend", "cuda-graphs", "unknown backend 'cuda-graphs'"), ("weighting", "gradnorm", "weighting must be one of")],
    ids=repr,
)  # fmt: skip
def test_bad_option(option, value, match):
    """The module refuses it when built, not at its first step; the functional call too."""
    with pytest.raises(ValueError, match=match):
        MultiTaskHeads(D, TASKS, **{option: value})
    heads = MultiTaskHeads(D, TASKS)
    with pytest.raises(ValueError, match=match):
        multitask_loss(torch.randn(B, S, D), heads.weight, heads.bias, TASKS, _good(), **{option: value})


def test_triton_backend_on_cpu_without_interpreter_is_an_error():
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled")
    heads = MultiTaskHeads(D, TASKS, backend="triton")
    with pytest.raises(ValueError, match="CUDA tensors"):
        heads(torch.randn(B, S, D), _good())


@pytest.mark.parametrize("weighting", ["static", "uncertainty"])
def test_heads_on_another_device_than_hidden(weighting):
    """Heads left on one device and an encoder output on another ("meta" stands in for a
    second device here) are an error naming both, before any kernel runs."""
    heads = MultiTaskHeads(D, TASKS, backend="torch", weighting=weighting)
    hidden = torch.randn(B, S, D, device="meta")
    labels = {name: label.to("meta") for name, label in _good().items()}
    with pytest.raises(ValueError, match="the heads' weight is on cpu, hidden_states on meta"):
        heads(hidden, labels)
    if weighting == "uncertainty":
        heads.weight, heads.bias = torch.nn.Parameter(heads.weight.to("meta")), torch.nn.Parameter(heads.bias.to("meta"))
        with pytest.raises(ValueError, match="the heads' log_vars is on cpu, hidden_states on meta"):
            heads(hidden, labels)


def test_packed_parameters_of_the_wrong_kind():
    weight = torch.randn(17, D)
    with pytest.raises(ValueError, match=r"bias \(16,\) do not match the tasks' 17 outputs"):
        multitask_loss(torch.randn(B, S, D), weight, torch.zeros(16), TASKS, _good())
    with pytest.raises(TypeError, match="packed bias must be a floating-point"):
        multitask_loss(torch.randn(B, S, D), weight, [0.0] * 17, TASKS, _good())
    with pytest.raises(TypeError, match="packed weight must be a floating-point"):
        multitask_loss(torch.randn(B, S, D), weight.long(), None, TASKS, _good())


@pytest.mark.parametrize(
    "log_vars, weighting, error, match",
    [
        (torch.zeros(4), "static", ValueError, "log_vars are for weighting='uncertainty'; weighting='static'"),
        (torch.zeros(3), "uncertainty", ValueError, r"log_vars must be \[T\] = \(4,\), one s_t per task.*\(3,\)"),
        (torch.zeros(1, 4), "uncertainty", ValueError, r"log_vars must be \[T\] = \(4,\).*\(1, 4\)"),
        (torch.zeros(4, dtype=torch.long), "uncertainty", TypeError, "log_vars must be a floating-point.*torch.int64"),
        ([0.0] * 4, "uncertainty", TypeError, "log_vars must be a floating-point.*got list"),
        (torch.zeros(4), "dwa", ValueError, "weighting must be one of"),
    ],
    ids=["static", "short", "2d", "int", "list", "unknown-weighting"],
)  # fmt: skip
def test_bad_log_vars(log_vars, weighting, error, match):
    """The functional call's ``log_vars``: one fp ``s_t`` per task, for uncertainty weighting only
    (more of them were taken silently, the first T used; with static weighting they were ignored)."""
    with pytest.raises(error, match=match):
        multitask_loss(torch.randn(B, S, D), torch.randn(17, D), torch.zeros(17), TASKS, _good(), log_vars=log_vars,
                       weighting=weighting)  # fmt: skip


@pytest.mark.parametrize(
    "task_weights, kwargs, error, match",
    [
        ({"ner": 2.0}, {"weighting": "uncertainty"}, ValueError, "task_weights are for weighting='static'"),
        ({"nerr": 2.0}, {}, ValueError, r"task_weights names unknown tasks \['nerr'\]"),
        ({"ner": torch.ones(1)}, {}, ValueError, r"task 'ner': task_weights must be a 0-dim tensor, got shape \(1,\)"),
        ({"ner": torch.tensor(2)}, {}, TypeError, "task 'ner': task weight must be a floating-point tensor"),
        ({"score": True}, {}, TypeError, "task 'score': task weight must be a number or a 0-dim tensor, got bool"),
        ({"score": float("inf")}, {}, ValueError, "task 'score': task weight must be finite"),
        ({"score": 1e39}, {}, ValueError, r"task 'score': task weight must be finite \(in fp32"),
        ({"score": 10**400}, {}, ValueError, "task 'score': task weight must be finite"),
        ([("ner", 2.0)], {}, TypeError, "task_weights must be a dict of task name -> number or a 0-dim tensor"),
    ],
)  # fmt: skip
def test_bad_task_weights(task_weights, kwargs, error, match):
    heads = MultiTaskHeads(D, TASKS, backend="torch", **kwargs)
    with pytest.raises(error, match=match):
        heads(torch.randn(B, S, D), _good(), task_weights=task_weights)


def test_numpy_numbers_are_numbers():
    """Weights computed with numpy (DWA often is) and numpy integer divisors are taken as numbers."""
    import numpy as np

    hidden, labels = torch.randn(B, S, D), _good()
    heads = MultiTaskHeads(D, TASKS, backend="torch")
    got = heads(hidden, labels, task_weights={"ner": np.float32(0.5)}, num_items_in_batch={"ner": np.int64(7)})
    expected = heads(hidden, labels, task_weights={"ner": 0.5}, num_items_in_batch={"ner": 7})
    torch.testing.assert_close(got.loss, expected.loss)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_class_ids_are_a_value_error_whatever_the_head(backend):
    """The op's forward is issued before the values' verdict is read, so it meets the bad ids
    first: on every path (class weights, smoothing, a softcap, a vocabulary-sized head, both
    levels) they are skipped, never indexed with, and the error is the ValueError naming the task."""
    tasks = [Task("cls", 3, "cross_entropy", class_weights=[0.5, 1.0, 2.0], label_smoothing=0.1),
             Task("ner", 5, "cross_entropy", level="token", softcap=2.0),
             Task("tags", 4, "cross_entropy", level="token", class_weights=[1.0, 0.0, 3.0, 0.5]),
             Task("vocab", 300, "cross_entropy", level="token", z_loss=1e-4)]  # fmt: skip
    heads = MultiTaskHeads(D, tasks, backend=backend)
    for name in ("cls", "ner", "tags", "vocab"):
        for bad in (-(2**40), -7, 300, 2**40):
            labels = {"cls": torch.tensor([0, 2]), "ner": torch.randint(0, 5, (B, S)),
                      "tags": torch.randint(0, 4, (B, S)), "vocab": torch.randint(0, 300, (B, S))}  # fmt: skip
            labels[name].view(-1)[-1] = bad
            with pytest.raises(ValueError, match=f"task '{name}': class ids must lie in"):
                heads(torch.randn(B, S, D), labels)
