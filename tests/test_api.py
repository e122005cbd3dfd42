"""The public contract: parameters, outputs, conversions, options."""

import collections
import dataclasses
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    TOLERANCE,
    assert_matches_oracle,
    case_for,
    check_calls_from_threads,
    fresh_seed,
    random_case,
    rel_error,
    run_heads,
)
from torch import nn

from mtlfast import MultiTaskHeads, MultiTaskOutput, Task, TaskLayout, multitask_loss

TASKS = [
    Task("sentiment", 3, "cross_entropy"),
    Task("ner", 9, "cross_entropy", level="token"),
    Task("similarity", 1, "mse"),
    Task("topics", 20, "bce"),
]
B, S, D = 3, 7, 16


def _labels(gen=None):
    gen = gen or torch.Generator().manual_seed(torch.seed() % 2**31)
    return {
        "sentiment": torch.randint(0, 3, (B,), generator=gen),
        "ner": torch.randint(0, 9, (B, S), generator=gen),
        "similarity": torch.randn(B, generator=gen),
        "topics": torch.rand(B, 20, generator=gen),
    }


def test_packed_parameters_and_linear_init():
    heads = MultiTaskHeads(D, TASKS)
    assert heads.weight.shape == (33, D) and heads.bias.shape == (33,)
    assert heads.log_vars is None
    bound = 1 / math.sqrt(D)
    assert heads.weight.abs().max() <= bound + 1e-6 and heads.bias.abs().max() <= bound + 1e-6
    assert heads.weight.std() > 0.3 * bound  # filled, not zeros
    assert [heads.layout.columns(t.name) for t in TASKS] == [slice(0, 3), slice(3, 12), slice(12, 13), slice(13, 33)]
    uncertain = MultiTaskHeads(D, TASKS, weighting="uncertainty")
    assert uncertain.log_vars.shape == (4,) and torch.count_nonzero(uncertain.log_vars) == 0


def test_from_linears_and_to_linears_round_trip():
    linears = {t.name: nn.Linear(D, t.num_outputs, bias=t.name != "topics") for t in TASKS}
    heads = MultiTaskHeads.from_linears(TASKS, linears, backend="torch")
    for task in TASKS:
        cols = heads.layout.columns(task.name)
        assert torch.equal(heads.weight[cols], linears[task.name].weight)
        expected_bias = linears[task.name].bias if linears[task.name].bias is not None else torch.zeros(task.num_outputs)
        assert torch.equal(heads.bias[cols], expected_bias)
    back = heads.to_linears()
    for task in TASKS:
        assert torch.equal(back[task.name].weight, heads.weight[heads.layout.columns(task.name)])
        assert back[task.name].weight.data_ptr() != heads.weight.data_ptr()
    double = MultiTaskHeads.from_linears(TASKS, {t.name: nn.Linear(D, t.num_outputs).double() for t in TASKS})
    assert double.weight.dtype == torch.float64


def test_from_linears_rejects_wrong_width():
    linears = {t.name: nn.Linear(D, t.num_outputs) for t in TASKS}
    linears["ner"] = nn.Linear(D, 8)
    with pytest.raises(ValueError, match="ner.*out_features=8"):
        MultiTaskHeads.from_linears(TASKS, linears)


def test_from_linears_takes_one_dtype_and_device():
    """Linears of several dtypes or devices are a ValueError naming the task, unless ``dtype=`` or
    ``device=`` chooses the heads' (the weights are then copied to it); a module not an
    ``nn.Linear`` is a TypeError naming its task, the first task's included."""
    linears = {t.name: nn.Linear(D, t.num_outputs) for t in TASKS}
    linears["ner"] = linears["ner"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="task 'ner': linear's weight has dtype torch.bfloat16.*'sentiment'.*dtype="):
        MultiTaskHeads.from_linears(TASKS, linears)
    heads = MultiTaskHeads.from_linears(TASKS, linears, dtype=torch.float32)
    assert heads.weight.dtype == heads.bias.dtype == torch.float32
    for task in TASKS:
        cols = heads.layout.columns(task.name)
        assert torch.equal(heads.weight[cols], linears[task.name].weight.float())
        assert torch.equal(heads.bias[cols], linears[task.name].bias.float())
    linears["ner"] = nn.Linear(D, 9, device="meta")
    with pytest.raises(ValueError, match="task 'ner': linear's weight has device meta.*device="):
        MultiTaskHeads.from_linears(TASKS, linears)
    assert MultiTaskHeads.from_linears(TASKS, linears, device="meta", dtype=torch.float32).weight.is_meta
    linears["sentiment"] = nn.Conv1d(D, 3, 1)
    with pytest.raises(TypeError, match="task 'sentiment': from_linears needs nn.Linear, got Conv1d"):
        MultiTaskHeads.from_linears(TASKS, linears)


def test_bias_free_heads_convert_both_ways():
    linears = {t.name: nn.Linear(D, t.num_outputs, bias=False) for t in TASKS}
    heads = MultiTaskHeads.from_linears(TASKS, linears, backend="torch", bias=False)
    assert heads.bias is None and [name for name, _ in heads.named_parameters()] == ["weight"]
    assert "bias=False" in repr(heads)
    back = heads.to_linears()
    for task in TASKS:
        assert back[task.name].bias is None
        assert torch.equal(back[task.name].weight, linears[task.name].weight)
    hidden = torch.randn(B, S, D)
    out = heads(hidden)
    torch.testing.assert_close(out.logits["ner"], hidden @ linears["ner"].weight.T)
    linears["topics"] = nn.Linear(D, 20)
    with pytest.raises(ValueError, match="task 'topics': linear has a bias.*bias=False"):
        MultiTaskHeads.from_linears(TASKS, linears, bias=False)


def test_a_parametrized_weight_is_the_one_the_heads_use():
    """A parametrization (weight norm, say) takes the weight out of the module's parameters: the
    forward reads it as an attribute, and its gradient reaches the parametrization's own."""

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    heads = MultiTaskHeads(D, TASKS, backend="torch")
    plain = MultiTaskHeads(D, TASKS, backend="torch")
    plain.load_state_dict(heads.state_dict())
    with torch.no_grad():
        plain.weight.mul_(2)
    torch.nn.utils.parametrize.register_parametrization(heads, "weight", Doubled())
    hidden, labels = torch.randn(B, S, D), _labels()
    out, expected = heads(hidden, labels), plain(hidden, labels)
    torch.testing.assert_close(out.loss, expected.loss)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(heads.parametrizations.weight.original.grad, 2 * plain.weight.grad)


def test_the_op_applies_its_function_as_a_python_function_apply_would(monkeypatch):
    """Where Function.apply is Python (torch before 2.14) the op does its steps itself: each
    tensor argument through functorch's unwrap_if_dead, then the C++ apply, for the same loss
    and gradients; with a functorch transform active it raises before either apply."""
    from mtlfast import op

    heads = MultiTaskHeads(D, TASKS, backend="torch")
    hidden, labels = torch.randn(B, S, D, requires_grad=True), _labels()

    def loss_and_grads():
        hidden.grad = heads.weight.grad = heads.bias.grad = None
        loss = heads(hidden, labels).loss
        loss.backward()
        return loss.detach(), hidden.grad, heads.weight.grad, heads.bias.grad

    monkeypatch.setattr(op, "_PYTHON_APPLY", False)
    expected = loss_and_grads()
    unwrapped = []
    monkeypatch.setattr(op, "_PYTHON_APPLY", True)
    monkeypatch.setattr(op, "_unwrap_if_dead", lambda tensor: unwrapped.append(tensor) or tensor)
    for got, want in zip(loss_and_grads(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # hidden, weight, bias, the divisors, the task weights and one target per task (no pooled rows, no mask)
    assert len(unwrapped) == 5 + len(TASKS) and all(isinstance(t, torch.Tensor) for t in unwrapped)
    assert unwrapped[0] is hidden and unwrapped[1] is heads.weight and unwrapped[2] is heads.bias

    through_function_apply = []
    monkeypatch.setattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    monkeypatch.setattr(op.FusedHeadsLoss, "apply", lambda *args: through_function_apply.append(1) or op._C_APPLY(*args))
    unwrapped.clear()
    with pytest.raises(NotImplementedError, match="torch.func"):
        heads(hidden, labels)
    assert not through_function_apply and not unwrapped


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bias_free_heads_match_the_oracle(backend):
    """``bias=False``: the oracle with a zero bias, and no bias parameter to receive a gradient."""
    case = random_case()
    case.bias.zero_()
    out, grads = run_heads(case, backend, torch.float32, bias=False)
    assert "bias" not in grads
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"{backend} bias=False",
                          skip=("bias",))  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_training_after_evaluation_under_inference_mode(backend, bias):
    """A training step after the same call under ``torch.inference_mode`` (a validation pass)
    matches the oracle: no tensor made under inference mode is kept for later calls, where
    saving it for backward or writing it in place would raise."""
    case = random_case()
    if not bias:
        case.bias.zero_()
    out, grads = run_heads(case, backend, torch.float32, evaluated_first=True, bias=bias, validate=True)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"{backend} after inference_mode",
                          skip=() if bias else ("bias",))  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_one_module_called_from_threads(backend):
    """One module called at once from several threads, as ``nn.DataParallel`` calls its replicas
    (the triton interpreter is not thread-safe: tests/test_gpu.py runs the triton backend)."""
    check_calls_from_threads(backend)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_plans_kept_stay_bounded_while_threads_call(backend, monkeypatch):
    """Past ``PLANS_KEPT`` plans the oldest is dropped, also while several threads call with
    shapes that each need a plan of their own; every call still matches the oracle."""
    from mtlfast import functional

    monkeypatch.setattr(functional, "_PLANS", collections.OrderedDict())
    monkeypatch.setattr(functional, "PLANS_KEPT", 2)
    check_calls_from_threads(backend, shapes=[(batch, 5, 13) for batch in (1, 2, 3, 4, 6)])
    assert 1 <= len(functional._PLANS) <= 2
    kept = list(functional._PLANS.values())
    check_calls_from_threads(backend, threads=1, shapes=[(7, 2, 13)])
    assert len(functional._PLANS) == 2 and next(iter(functional._PLANS.values())) is kept[-1], "not the oldest dropped"


def _shapes(grads: dict) -> dict:
    return {name: None if grad is None else tuple(grad.shape) for name, grad in grads.items()}


def _step_without_data(case, backend: str, to) -> tuple:
    """A step of heads built for ``case`` (values unset) on its inputs as ``to`` makes them
    (FakeTensors, meta tensors): the output and the gradients' shapes by name (None: no gradient)."""
    inputs = {"hidden": case.hidden, "pooled": case.pooled}
    leaves = {name: None if value is None else to(value).requires_grad_(True) for name, value in inputs.items()}
    device = leaves["hidden"].device
    heads = MultiTaskHeads(case.hidden.shape[-1], case.tasks, weighting=case.weighting, backend=backend,
                           validate=True, device=device)  # fmt: skip
    out = heads(leaves["hidden"], {name: to(label) for name, label in case.labels.items()},
                attention_mask=None if case.attention_mask is None else to(case.attention_mask), pooled=leaves["pooled"],
                num_items_in_batch={k: to(v) if isinstance(v, torch.Tensor) else v
                                    for k, v in (case.num_items or {}).items()} or None)  # fmt: skip
    out.loss.backward()
    grads = {**{name: leaf.grad for name, leaf in leaves.items() if leaf is not None},
             **{name: param.grad for name, param in heads.named_parameters()}}  # fmt: skip
    return out, _shapes(grads)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_pass_on_fake_tensors_keeps_nothing_for_real_calls(backend):
    """A step on FakeTensors (a memory or FLOP estimator under ``FakeTensorMode``, with
    ``validate=True``) gives the loss and gradients the real step's shapes, keeps no plan and
    no constant, and the same call on real tensors after it matches the oracle."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from mtlfast import functional

    case = random_case()
    plans, constants = dict(functional._PLANS), dict(functional._CONSTANTS._entries)
    with FakeTensorMode() as mode:
        fake, fake_grads = _step_without_data(case, backend, mode.from_tensor)
    assert isinstance(fake.loss, FakeTensor) and fake.loss.shape == () and set(fake.losses) == set(case.labels)
    assert dict(functional._PLANS) == plans and dict(functional._CONSTANTS._entries) == constants
    out, grads = run_heads(case, backend, torch.float32)
    assert type(out.loss) is torch.Tensor and fake_grads == _shapes(grads)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"{backend} after a fake pass")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_a_step_on_the_meta_device_gives_shapes(backend):
    """Heads and inputs on the meta device (a FLOP count's dry run), ``validate=True``: the
    value checks, which need data, are skipped; the loss and gradients have the real step's
    shapes (the triton backend's kernels give way to the torch backend's ops there)."""
    case = random_case()
    meta, meta_grads = _step_without_data(case, backend, lambda tensor: tensor.to("meta"))
    assert meta.loss.is_meta and meta.loss.shape == () and set(meta.losses) == set(case.labels)
    assert meta_grads == _shapes(run_heads(case, "torch" if backend == "triton" else backend, torch.float32)[1])


def test_a_planned_call_without_a_bias_builds_no_zero_bias():
    """``bias=None``: the zero bias the op takes is built once with the call's plan, so a planned
    call runs the same ATen ops as with a given bias that needs no gradient (on a GPU, no fill
    kernel a step), and its results are the oracle's."""
    from torch.profiler import ProfilerActivity, profile

    case = random_case(allow_extras=False)
    case.bias.zero_()
    layout = TaskLayout(tuple(case.tasks))
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)

    def aten_ops(bias) -> collections.Counter:
        for _ in range(2):  # the first call plans
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = multitask_loss(hidden, weight, bias, layout, case.labels, backend="torch")
                out.loss.backward()
        return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))

    assert aten_ops(None) == aten_ops(torch.zeros_like(case.bias))
    for _ in range(2):
        hidden.grad = weight.grad = None
        out = multitask_loss(hidden, weight, None, layout, case.labels, backend="torch")
        out.loss.backward()
        grads = {"hidden": hidden.grad, "weight": weight.grad}
        assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "bias=None, planned",
                              skip=("bias",))  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_functional_call_with_a_tied_weight_and_no_bias(backend):
    """A language model's own output head as a vocabulary task: the weight is the input
    embedding's (tied), there is no bias, and the gradient reaches the embedding."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    vocab, batch, seq_len, hidden_size = 300 + int(torch.randint(0, 40, (), generator=gen)), 2, 11, 24
    embedding = nn.Embedding(vocab, hidden_size)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels[:, -1] = -100
    out = multitask_loss(hidden, embedding.weight, None, [Task("lm", vocab, "cross_entropy", level="token")],
                         {"lm": labels}, backend=backend)  # fmt: skip
    out.loss.backward()
    h = hidden.detach().double().requires_grad_(True)
    w = embedding.weight.detach().double().requires_grad_(True)
    expected = F.cross_entropy((h @ w.T).reshape(-1, vocab), labels.reshape(-1))
    expected.backward()
    assert rel_error(out.loss, expected) <= 2e-4
    assert rel_error(hidden.grad, h.grad) <= 2e-4 and rel_error(embedding.weight.grad, w.grad) <= 2e-4


def _reweighted(case, rng):
    """Random call-time weights for some of the case's tasks, and the case whose tasks carry them."""
    weights = {t.name: rng.uniform(-0.5, 3.0) for t in case.tasks if rng.random() < 0.7}
    tasks = [dataclasses.replace(t, weight=weights.get(t.name, t.weight)) for t in case.tasks]
    return weights, dataclasses.replace(case, tasks=tasks)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_call_time_task_weights_match_the_oracle(backend):
    """``task_weights`` (numbers) replace ``Task.weight`` for one call: the oracle of tasks built
    with those weights, whose gradients they scale."""
    rng = random.Random(fresh_seed())
    case = random_case(rng.randrange(2**31))
    case.weighting, case.log_vars = "static", None
    weights, reweighted = _reweighted(case, rng)
    out, grads = run_heads(case, backend, torch.float32, task_weights=weights)
    assert_matches_oracle(reweighted, out, grads, torch.float32, TOLERANCE[torch.float32], f"{backend} task_weights")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_learned_task_weights_get_the_task_losses_as_gradient(backend):
    """Task weights as tensors that require grad (weights learned as GradNorm learns them): the
    total is their weighted sum of the losses, and each weight's gradient is its task's loss."""
    case = case_for(TASKS, (B, S, D))
    learned = torch.rand(len(TASKS), requires_grad=True)
    out, grads = run_heads(case, backend, torch.float32,
                           task_weights={t.name: learned[i] for i, t in enumerate(TASKS)})  # fmt: skip
    losses = torch.stack([out.losses[t.name] for t in TASKS])
    torch.testing.assert_close(learned.grad, losses)
    torch.testing.assert_close(out.loss.detach(), (learned.detach() * losses).sum())
    reweighted = dataclasses.replace(case, tasks=[dataclasses.replace(t, weight=float(learned[i].detach()))
                                                  for i, t in enumerate(TASKS)])  # fmt: skip
    assert_matches_oracle(reweighted, out, grads, torch.float32, TOLERANCE[torch.float32], f"{backend} learned")


def test_inference_returns_every_tasks_logits():
    heads = MultiTaskHeads(D, TASKS)
    hidden = torch.randn(B, S, D)
    out = heads(hidden)
    assert isinstance(out, MultiTaskOutput) and out.loss is None and out.losses == {}
    assert out.logits["ner"].shape == (B, S, 9) and out.logits["similarity"].shape == (B, 1)
    linears = heads.to_linears()
    torch.testing.assert_close(out.logits["topics"], linears["topics"](hidden[:, 0]))
    torch.testing.assert_close(out.logits["ner"], linears["ner"](hidden))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_return_logits_with_labels_and_absent_task(backend):
    heads = MultiTaskHeads(D, TASKS, backend=backend)
    labels = _labels()
    del labels["similarity"]
    hidden = torch.randn(B, S, D)
    out = heads(hidden, labels, return_logits=True)
    assert set(out.losses) == {"sentiment", "ner", "topics"}
    assert set(out.logits) == {t.name for t in TASKS}
    assert all(not v.requires_grad for v in out.losses.values())
    out.loss.backward()
    assert torch.count_nonzero(heads.weight.grad[heads.layout.columns("similarity")]) == 0
    assert torch.count_nonzero(heads.weight.grad[heads.layout.columns("ner")]) > 0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_labels_give_zero_loss_that_backpropagates(backend):
    heads = MultiTaskHeads(D, TASKS, backend=backend, weighting="uncertainty")
    hidden = torch.randn(B, S, D, requires_grad=True)
    out = heads(hidden, {})
    assert out.loss.item() == 0.0 and out.losses == {}
    out.loss.backward()
    assert torch.count_nonzero(heads.weight.grad) == 0 and torch.count_nonzero(hidden.grad) == 0


def test_weighting_switched_on_a_built_module():
    """Heads built for uncertainty weighting and switched to static (a warm-up, say) weigh the
    tasks by ``Task.weight`` and leave ``log_vars`` alone, and switched back use them again."""
    tasks = [dataclasses.replace(task, weight=1.0 + k) for k, task in enumerate(TASKS)]
    heads = MultiTaskHeads(D, tasks, backend="torch", weighting="uncertainty")
    with torch.no_grad():
        heads.log_vars.copy_(torch.randn(len(tasks)))
    hidden, labels = torch.randn(B, S, D), _labels()
    heads.weighting = "static"
    out = heads(hidden, labels)
    torch.testing.assert_close(out.loss, sum(task.weight * out.losses[task.name] for task in tasks))
    out.loss.backward()
    assert heads.log_vars.grad is None
    heads.weighting = "uncertainty"
    out = heads(hidden, labels)
    s = heads.log_vars.detach()
    expected = sum(0.5 * torch.exp(-s[k]) * out.losses[task.name] + 0.5 * s[k] for k, task in enumerate(tasks))
    torch.testing.assert_close(out.loss, expected)


def test_sequence_only_tasks_accept_2d_hidden():
    tasks = [Task("a", 4, "cross_entropy"), Task("b", 2, "bce")]
    case = case_for(tasks, (5, 1, 12), two_d=True)
    out, grads = run_heads(case, "torch", torch.float32)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "2d")


def test_dropout_only_in_training():
    heads = MultiTaskHeads(D, TASKS, dropout=0.5, backend="torch")
    hidden, labels = torch.randn(B, S, D), _labels()
    heads.eval()
    first, second = heads(hidden, labels).loss, heads(hidden, labels).loss
    assert torch.equal(first, second)
    heads.train()
    torch.manual_seed(0)
    trained = heads(hidden, labels).loss
    assert not torch.equal(trained, first)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_step(use_reentrant):
    """Under torch.utils.checkpoint the heads run again in backward (dropout replayed from the
    saved RNG state): the loss and every gradient equal those of the plain step, bitwise."""
    from torch.utils.checkpoint import checkpoint

    heads = MultiTaskHeads(D, TASKS, dropout=0.2, backend="torch")
    hidden, labels = torch.randn(B, S, D, requires_grad=True), _labels()
    seed = torch.seed()
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(seed)
        step = lambda h: heads(h, labels).loss
        loss = checkpoint(step, hidden, use_reentrant=use_reentrant) if checkpointed else step(hidden)
        loss.backward()  # the reentrant checkpoint does not support autograd.grad
        results.append([loss.detach()] + [t.grad for t in (hidden, heads.weight, heads.bias)])
        hidden.grad = heads.weight.grad = heads.bias.grad = None
    for plain, recomputed in zip(*results):
        assert torch.equal(plain, recomputed)


def test_grad_output_scale_is_exact_and_reaches_hooks():
    """A GradScaler-like factor scales every gradient exactly; hooks and autograd.grad see them."""
    heads = MultiTaskHeads(D, TASKS, backend="torch")
    hidden, labels = torch.randn(B, S, D, requires_grad=True), _labels()
    seen = []
    heads.weight.register_hook(lambda g: seen.append(g.clone()))
    base = torch.autograd.grad(heads(hidden, labels).loss, [hidden, heads.weight])
    scaled = torch.autograd.grad(heads(hidden, labels).loss * 1024.0, [hidden, heads.weight])
    for a, b in zip(base, scaled):
        torch.testing.assert_close(a * 1024.0, b, rtol=1e-6, atol=0)
    assert len(seen) == 2 and torch.equal(seen[1], scaled[1])


def test_fp16_gradients_do_not_underflow_under_a_loss_scale():
    """Tiny per-element gradients (large mean divisor) survive fp16 once a loss scale is applied."""
    tasks = [Task("ner", 5, "cross_entropy", level="token")]
    heads = MultiTaskHeads(8, tasks, backend="torch").half()
    hidden = torch.randn(4, 64, 8).half().requires_grad_(True)
    labels = {"ner": torch.randint(0, 5, (4, 64))}
    out = heads(hidden, labels, num_items_in_batch={"ner": 2**20})
    (out.loss * 2.0**16).backward()
    assert torch.isfinite(hidden.grad).all() and torch.count_nonzero(hidden.grad) > 0.9 * hidden.numel()


def test_torch_backend_is_bitwise_deterministic():
    case = case_for(TASKS, (4, 9, 24))
    first = run_heads(case, "torch", torch.float32, deterministic=True)[1]
    second = run_heads(case, "torch", torch.float32, deterministic=True)[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grad_filter_leaves_other_backends_exact(backend):
    """Only the triton backend's vocabulary path filters: elsewhere a threshold changes nothing."""
    case = case_for([Task("vocab", 300, "cross_entropy", level="token"), *TASKS[:2]], (3, 9, 16))
    exact = run_heads(case, backend, torch.float32)[1]
    filtered = run_heads(case, backend, torch.float32, grad_filter_eps=0.5)[1]
    for name in exact:
        assert torch.equal(exact[name], filtered[name]), name


def test_grad_filter_auto_threshold():
    """``"auto"``: the computation dtype's epsilon / 32, as Cut Cross-Entropy picks it."""
    from mtlfast.validation import grad_filter_threshold

    assert grad_filter_threshold("auto", torch.bfloat16) == 2.0**-12
    assert grad_filter_threshold("auto", torch.float16) == 2.0**-15
    assert grad_filter_threshold(None, torch.bfloat16) < 0 and grad_filter_threshold(0, torch.float32) == 0.0


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_chunk_size_does_not_change_results(chunk_size):
    case = case_for(TASKS, (3, 11, 20))
    out, grads = run_heads(case, "torch", torch.float32, chunk_size=chunk_size)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"chunk {chunk_size}")


def test_logits_in_autocast_dtype():
    heads = MultiTaskHeads(D, TASKS, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = heads(torch.randn(B, S, D), _labels(), return_logits=True)
    assert all(v.dtype == torch.bfloat16 for v in out.logits.values())
    assert out.loss.dtype == torch.float32


def test_eager_parity_of_the_plain_module():
    """MultiTaskHeads equals per-task nn.Linear + torch losses, summed."""
    heads = MultiTaskHeads(D, TASKS, backend="torch")
    linears = heads.to_linears()
    hidden, labels = torch.randn(B, S, D), _labels()
    expected = (
        F.cross_entropy(linears["sentiment"](hidden[:, 0]), labels["sentiment"])
        + F.cross_entropy(linears["ner"](hidden).reshape(-1, 9), labels["ner"].reshape(-1))
        + F.mse_loss(linears["similarity"](hidden[:, 0]).squeeze(-1), labels["similarity"])
        + F.binary_cross_entropy_with_logits(linears["topics"](hidden[:, 0]), labels["topics"])
    )
    assert rel_error(heads(hidden, labels).loss, expected) < 1e-6


def _assert_equals_torch_loss(got, expected, hidden, heads, linears) -> None:
    """The heads' float64 loss equals torch's over copies of their linears, and so do the
    gradients of the hidden states and of the packed weight."""
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    grad_got = torch.autograd.grad(got, [hidden, heads.weight])
    grad_expected = torch.autograd.grad(expected, [hidden, *(linear.weight for linear in linears.values())])
    torch.testing.assert_close(grad_got[0], grad_expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_got[1], torch.cat(grad_expected[1:]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bce_pos_weight_matches_torch(backend):
    """Task(pos_weight=) is BCEWithLogitsLoss(pos_weight=): per output or one for all, with
    its gradients; NaN rows still skipped."""
    pos_weight = torch.rand(20, dtype=torch.float64) * 4
    tasks = [Task("topics", 20, "bce", pos_weight=pos_weight), Task("tags", 3, "bce", level="token", pos_weight=2.5)]
    heads = MultiTaskHeads(D, tasks, backend=backend).double()
    linears = heads.to_linears()
    hidden = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    labels = {"topics": torch.rand(B, 20, dtype=torch.float64), "tags": torch.rand(B, S, 3, dtype=torch.float64)}
    labels["tags"][0, 1, 2] = float("nan")
    kept = ~labels["tags"].isnan().any(-1)
    expected = F.binary_cross_entropy_with_logits(linears["topics"](hidden[:, 0]), labels["topics"],
                                                  pos_weight=pos_weight) + F.binary_cross_entropy_with_logits(
        linears["tags"](hidden)[kept], labels["tags"][kept], pos_weight=torch.full((3,), 2.5, dtype=torch.float64))  # fmt: skip
    _assert_equals_torch_loss(heads(hidden, labels).loss, expected, hidden, heads, linears)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_cross_entropy_class_weights_match_torch(backend):
    """Task(class_weights=) is cross_entropy(weight=): the mean divides by the summed weights
    of the kept rows' classes, label smoothing and ignore_index included, with its gradients."""
    weights = torch.rand(9, dtype=torch.float64) * 3
    tasks = [Task("ner", 9, "cross_entropy", level="token", label_smoothing=0.1, class_weights=weights),
             Task("sentiment", 3, "cross_entropy", class_weights=[0.2, 1.0, 4.0])]  # fmt: skip
    heads = MultiTaskHeads(D, tasks, backend=backend).double()
    linears = heads.to_linears()
    hidden = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    labels = {"ner": torch.randint(0, 9, (B, S)), "sentiment": torch.randint(0, 3, (B,))}
    labels["ner"][0, :2] = -100
    sentiment_weights = torch.tensor([0.2, 1.0, 4.0], dtype=torch.float64)
    expected = F.cross_entropy(linears["ner"](hidden).reshape(-1, 9), labels["ner"].reshape(-1), weight=weights,
                               label_smoothing=0.1) + F.cross_entropy(
        linears["sentiment"](hidden[:, 0]), labels["sentiment"], weight=sentiment_weights)  # fmt: skip
    _assert_equals_torch_loss(heads(hidden, labels).loss, expected, hidden, heads, linears)


@pytest.mark.parametrize("version, capability, compiles", [((3, 2), (7, 0), False), ((3, 2), (7, 5), False),
                                                         ((3, 2), (8, 0), True), ((3, 6), (7, 0), True),
                                                         ((3, 6), (7, 5), True)])  # fmt: skip
def test_triton_backend_takes_the_torch_path_where_its_compiler_fails(monkeypatch, version, capability, compiles):
    """triton before 3.6 fails compiling the kernels for a V100 (aborting the process) and a T4:
    the backend runs the torch path there instead (and asks for no device elsewhere)."""
    from mtlfast.backends import triton_fused

    monkeypatch.setattr(triton_fused, "TRITON_VERSION", version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    triton_fused._kernels_compile_on.cache_clear()
    problem = SimpleNamespace(compute_dtype=torch.float16, hidden=SimpleNamespace(device=torch.device("cuda", 0)),
                              heads=())  # fmt: skip
    try:
        assert triton_fused._delegates(problem) is not compiles
        assert triton_fused._kernels_compile_on(torch.device("cpu"))
    finally:
        triton_fused._kernels_compile_on.cache_clear()


@pytest.mark.parametrize("rocm", [False, True], ids=["cuda", "rocm"])
def test_auto_backend_picks_triton_for_nvidia_gpus_alone(monkeypatch, rocm):
    """``"auto"``: triton for CUDA tensors of an NVIDIA build of torch; torch on the CPU and on a
    ROCm build (AMD GPUs are "cuda" devices there too); an explicit choice is kept."""
    from mtlfast import backends

    monkeypatch.setattr(backends, "TRITON_INSTALLED", True)
    monkeypatch.setattr(backends, "ROCM", rocm)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert backends.resolve_backend("auto", gpu) == ("torch" if rocm else "triton")
    assert backends.resolve_backend("auto", cpu) == "torch"
    for name in ("reference", "torch", "triton"):
        assert backends.resolve_backend(name, gpu) == name
    monkeypatch.setattr(backends, "TRITON_INSTALLED", False)
    assert backends.resolve_backend("auto", gpu) == "torch"
    with pytest.raises(ValueError, match="needs the triton package"):
        backends.resolve_backend("triton", gpu)


def test_backends_run_with_the_tensors_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device, so the op makes the tensors' device current
    when another one is (tests/test_gpu.py runs it on a second GPU where there is one)."""
    from mtlfast import op

    def cuda_tensor(index: int) -> SimpleNamespace:  # what _on_device reads of a CUDA tensor
        return SimpleNamespace(is_cuda=True, get_device=lambda: index, device=torch.device("cuda", index))

    monkeypatch.setattr(op, "_current_cuda_device", lambda: 0)
    guard = op._on_device(cuda_tensor(1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for tensor in (cuda_tensor(0), torch.zeros(1)):
        assert not isinstance(op._on_device(tensor), torch.cuda.device)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_second_derivative_through_the_heads_raises(backend):
    """Gradients taken with create_graph=True may be used as values, but differentiating
    them raises: treated as constants they would silently drop the heads' second-order part
    (an input-gradient penalty, for instance)."""
    case = case_for([Task("a", 3, "cross_entropy"), Task("r", 1, "mse", level="token")], (3, 5, 8))
    heads = MultiTaskHeads(8, case.tasks, backend=backend, weighting="uncertainty")
    hidden = case.hidden.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(heads(hidden, case.labels).loss, hidden)
    out = heads(hidden, case.labels)
    (grad_hidden,) = torch.autograd.grad(out.loss, hidden, create_graph=True)
    torch.testing.assert_close(grad_hidden.detach(), plain)
    penalty = out.loss + grad_hidden.square().sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        penalty.backward()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_torch_func_transforms_are_a_clear_error_logits_run_under_them(backend):
    """The fused loss under torch.func's grad, vjp or vmap raises NotImplementedError that says
    to use torch.autograd (torch's own error would ask for a setup_context); logits alone
    (labels=None), plain torch ops, run under vmap; and torch.autograd.grad through
    torch.func.functional_call gives the gradients of the module's own backward."""
    case = case_for([Task("a", 3, "cross_entropy"), Task("r", 1, "mse", level="token")], (3, 5, 8))
    heads = MultiTaskHeads(8, case.tasks, backend=backend)
    params = {name: p.detach() for name, p in heads.named_parameters()}

    def loss_of(p, rows=case.hidden):
        return torch.func.functional_call(heads, p, (rows,), {"labels": case.labels}).loss

    for transform in (lambda: torch.func.grad(loss_of)(params),
                      lambda: torch.func.vjp(lambda rows: loss_of(params, rows), case.hidden),
                      lambda: torch.func.vmap(lambda rows: heads(rows[None], {"a": case.labels["a"][:1]}).loss)(
                          case.hidden)):  # fmt: skip
        with pytest.raises(NotImplementedError, match="torch.autograd"):
            transform()
    batched = torch.func.vmap(lambda rows: heads(rows[None]).logits["a"][0])(case.hidden)
    torch.testing.assert_close(batched, heads(case.hidden).logits["a"], rtol=1e-5, atol=1e-6)

    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    grads = torch.autograd.grad(loss_of(leaves), [leaves["weight"], leaves["bias"]])
    heads(case.hidden, case.labels).loss.backward()
    torch.testing.assert_close(grads[0], heads.weight.grad)
    torch.testing.assert_close(grads[1], heads.bias.grad)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_per_task_calls_give_each_task_loss_its_own_gradient(backend):
    """The README's recipe for gradient-based multi-task methods (PCGrad, MGDA, TorchJD), whose
    per-task losses must each be differentiable where ``out.losses`` are detached: one call per
    task, ``task_weights={name: 1.0}``. Each call's loss equals the joint call's ``losses``
    entry, and the task weights times their gradients (hidden, weight, bias) sum to the joint
    total's."""
    rng = random.Random(fresh_seed())
    tasks = [dataclasses.replace(t, weight=rng.uniform(0.2, 2.0)) for t in TASKS]
    heads = MultiTaskHeads(D, tasks, backend=backend).double()
    hidden = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    labels = _labels()
    inputs = (hidden, heads.weight, heads.bias)
    joint = heads(hidden, labels)
    joint_grads = torch.autograd.grad(joint.loss, inputs)
    summed = [torch.zeros_like(x) for x in inputs]
    for task in tasks:
        loss = heads(hidden, {task.name: labels[task.name]}, task_weights={task.name: 1.0}).loss
        torch.testing.assert_close(loss.detach(), joint.losses[task.name])
        for total, grad in zip(summed, torch.autograd.grad(loss, inputs)):
            total += task.weight * grad
    for total, expected in zip(summed, joint_grads):
        torch.testing.assert_close(total, expected)


def test_torch_deterministic_mode_turns_on_deterministic_heads(monkeypatch):
    """torch.use_deterministic_algorithms(True) makes the heads run as with deterministic=True."""
    from mtlfast import functional

    seen = []
    op_call = functional.fused_heads_loss

    def recording(call, *args):
        seen.append(call.deterministic)
        return op_call(call, *args)

    monkeypatch.setattr(functional, "fused_heads_loss", recording)
    case = case_for([Task("a", 3, "cross_entropy"), Task("r", 1, "mse", level="token")], (3, 5, 8))
    heads = MultiTaskHeads(8, case.tasks, backend="torch")
    heads(case.hidden, case.labels)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = heads(case.hidden, case.labels)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [False, True]
    assert torch.isfinite(out.loss)


def test_last_token_takes_the_last_unmasked_row():
    from mtlfast import last_token

    hidden = torch.randn(4, 6, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    pooled = last_token(hidden, mask.bool() if torch.rand(()) < 0.5 else mask)
    torch.testing.assert_close(pooled, hidden[[0, 1, 2, 3], [5, 2, 5, 0]], rtol=0, atol=0)
    pooled.sum().backward()
    taken = torch.zeros(4, 6)
    taken[[0, 1, 2, 3], [5, 2, 5, 0]] = 1
    torch.testing.assert_close(hidden.grad, taken[:, :, None].expand(4, 6, 5))
    with pytest.raises(ValueError, match=r"last_token: attention_mask must be \[B, S\] = \(4, 6\)"):
        last_token(hidden, mask[:, :5])


def test_softcap_caps_the_logits_returned():
    tasks = [Task("capped", 5, "cross_entropy", level="token", softcap=0.7), Task("plain", 3, "cross_entropy")]
    heads = MultiTaskHeads(D, tasks)
    hidden = torch.randn(B, S, D) * 4
    logits = heads(hidden).logits
    linears = heads.to_linears()
    torch.testing.assert_close(logits["capped"], 0.7 * torch.tanh(linears["capped"](hidden) / 0.7))
    torch.testing.assert_close(logits["plain"], linears["plain"](hidden[:, 0]))
    assert logits["capped"].abs().max() <= 0.7


def test_kept_call_plans_follow_every_change_of_signature():
    """A module called over and over with changes of what its plan is keyed on (grad mode, a
    frozen encoder output, autocast, deterministic mode, options, label dtypes, shapes, task
    subsets) gets, call after call, what a call without kept plans gets."""
    from mtlfast import functional

    tasks = [Task("cls", 3, "cross_entropy"), Task("ner", 5, "cross_entropy", level="token"),
             Task("tags", 4, "bce"), Task("score", 1, "mse", level="token")]  # fmt: skip
    heads = MultiTaskHeads(8, tasks, backend="torch")
    cases = {shape: case_for(tasks, shape) for shape in ((2, 5, 8), (3, 4, 8))}
    variants = [
        lambda c: {},
        lambda c: {"no_grad": True},
        lambda c: {"frozen": True},
        lambda c: {"autocast": True},
        lambda c: {"deterministic": True},
        lambda c: {"labels": {**c.labels, "cls": c.labels["cls"].int()}},
        lambda c: {"labels": {k: v for k, v in c.labels.items() if k != "ner"}},
        lambda c: {"labels": {k: c.labels[k] for k in ("score", "cls")}},
        lambda c: {"weighting": "uncertainty"},
        lambda c: {"mask": True},
        lambda c: {"no_bias": True},
    ]

    def call(case, variant):
        heads.zero_grad(set_to_none=True)
        heads.deterministic = variant.get("deterministic", False)
        hidden = case.hidden.clone().requires_grad_(not variant.get("frozen"))
        mask = case.attention_mask if variant.get("mask") and case.attention_mask is not None else None
        with torch.set_grad_enabled(not variant.get("no_grad")), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=bool(variant.get("autocast"))
        ):
            bias = None if variant.get("no_bias") else heads.bias
            weighting = variant.get("weighting", "static")
            out = multitask_loss(hidden, heads.weight, bias, heads.layout, variant.get("labels", case.labels),
                                 attention_mask=mask, log_vars=torch.zeros(4) if weighting == "uncertainty" else None,
                                 weighting=weighting, backend="torch",
                                 deterministic=heads.deterministic)  # fmt: skip
            if out.loss.requires_grad:
                out.loss.backward()
        grads = [hidden.grad, heads.weight.grad, heads.bias.grad]
        return [out.loss.detach(), *out.losses.values(), *grads], sorted(out.losses)

    order = [(shape, v) for _ in range(2) for shape in cases for v in range(len(variants))]
    random.Random(fresh_seed()).shuffle(order)
    for shape, v in order:
        case = cases[shape]
        kept, kept_names = call(case, variants[v](case))  # with every plan kept so far
        plans = dict(functional._PLANS)
        functional._PLANS.clear()
        fresh, fresh_names = call(case, variants[v](case))
        functional._PLANS.clear()
        functional._PLANS.update(plans)
        assert kept_names == fresh_names, (shape, v)
        for a, b in zip(kept, fresh):
            assert (a is None) == (b is None), (shape, v)
            if a is not None:
                assert torch.equal(a, b), (shape, v)
    assert functional._PLANS, "no plan was kept"


def test_package_marks_its_type_hints_for_type_checkers():
    """PEP 561: ``py.typed`` sits in the package, so mypy and pyright read mtlfast's annotations in
    a user's code (setup.py lists it as package data; that a built wheel holds it is not checked
    here)."""
    import importlib.resources

    assert importlib.resources.files("mtlfast").joinpath("py.typed").is_file()
