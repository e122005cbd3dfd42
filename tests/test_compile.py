"""torch.compile(fullgraph=True) traces through MultiTaskHeads: the torch backend on the CPU,
and the triton backend where there is a GPU."""

import pytest
import torch
import torch._dynamo.testing
from oracle import case_for, check_compiled_over_shapes, check_op_outputs_are_its_own, check_strided_inputs, random_case

from mtlfast import MultiTaskHeads, Task
from mtlfast.op import HEAD_SCALAR_FIELDS, HeadCall
from mtlfast.task import ColumnWeights, TaskLayout


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    tasks = [Task("cls", 3, "cross_entropy", label_smoothing=0.1, z_loss=0.05),
             Task("tok", 6, "cross_entropy", level="token", softcap=2.0), Task("reg", 2, "mse")]  # fmt: skip
    case = case_for(tasks, (2, 9, 16))
    heads = MultiTaskHeads(16, tasks, backend="torch", weighting="uncertainty", grad_filter_eps="auto")
    with torch.no_grad():
        heads.weight.copy_(case.weight)
        heads.bias.copy_(case.bias)
        heads.log_vars.normal_()
    hidden = case.hidden.clone().requires_grad_(True)
    compiled = torch.compile(lambda h, y: heads(h, y).loss, fullgraph=True)
    loss = compiled(hidden, case.labels)
    loss.backward()
    grads = (hidden.grad.clone(), heads.weight.grad.clone(), heads.log_vars.grad.clone())
    hidden.grad = None
    heads.zero_grad()
    eager = heads(hidden, case.labels).loss
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (hidden.grad, heads.weight.grad, heads.log_vars.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "backend, device",
    [("torch", "cpu"),
     pytest.param("triton", "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs a CUDA device")])],
)  # fmt: skip
def test_compile_over_changing_batch_and_sequence_lengths(backend, device):
    check_compiled_over_shapes(backend, device)


def test_op_outputs_are_its_own():
    """Two calls of the custom op share no memory in their outputs. The torch backend only: the
    reference backend saves nothing for its backward, so it has no outputs past the losses."""
    check_op_outputs_are_its_own("torch")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compile_with_strided_inputs(backend):
    """Hidden states transposed out of [S, B, D], a strided pooled, a weight and a bias that are
    strided views: the op's gradients are contiguous, as its fake implementation says (the
    compiled code asserts their strides)."""
    check_strided_inputs(random_case(ce_classes=(2, 300)), backend, torch.float32, compiled=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compile_with_frozen_hidden_states(backend):
    """A frozen encoder output (no gradient for the rows) through the compiled custom op."""
    torch._dynamo.reset()
    tasks = [Task("cls", 3, "cross_entropy"), Task("tok", 6, "cross_entropy", level="token"), Task("reg", 2, "mse")]
    case = case_for(tasks, (2, 9, 16))
    heads = MultiTaskHeads(16, tasks, backend=backend)
    compiled = torch.compile(lambda h, y: heads(h, y).loss, fullgraph=True)
    compiled(case.hidden, case.labels).backward()
    grads = (heads.weight.grad.clone(), heads.bias.grad.clone())
    heads.zero_grad()
    heads(case.hidden, case.labels).loss.backward()
    assert case.hidden.grad is None
    for got, want in zip(grads, (heads.weight.grad, heads.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compile_under_autocast_with_fp32_hidden_states(backend):
    """bf16 autocast over fp32 rows through the compiled custom op: the computation dtype
    travels with the call, and the rows' gradient comes back in fp32 as in eager mode."""
    torch._dynamo.reset()
    tasks = [Task("cls", 3, "cross_entropy"), Task("tok", 6, "cross_entropy", level="token"), Task("tags", 4, "bce")]
    case = case_for(tasks, (2, 9, 16))
    heads = MultiTaskHeads(16, tasks, backend=backend)
    results = []
    for step in (torch.compile(lambda h, y: heads(h, y).loss, fullgraph=True), lambda h, y: heads(h, y).loss):
        hidden = case.hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step(hidden, case.labels)
        loss.backward()
        results.append((loss.detach(), hidden.grad, heads.weight.grad.clone(), heads.bias.grad.clone()))
        heads.zero_grad()
    assert results[0][1].dtype == torch.float32
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compile_heads_without_bias():
    """``bias=False`` through the compiled custom op: the zero bias the op takes is built in the graph."""
    torch._dynamo.reset()
    tasks = [Task("cls", 3, "cross_entropy"), Task("tok", 6, "cross_entropy", level="token"), Task("reg", 2, "mse")]
    case = case_for(tasks, (2, 9, 16))
    heads = MultiTaskHeads(16, tasks, backend="torch", bias=False)
    results = []
    for step in (torch.compile(lambda h, y: heads(h, y).loss, fullgraph=True), lambda h, y: heads(h, y).loss):
        hidden = case.hidden.clone().requires_grad_(True)
        loss = step(hidden, case.labels)
        loss.backward()
        results.append((loss.detach(), hidden.grad, heads.weight.grad.clone()))
        heads.zero_grad()
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compile_with_learned_task_weights():
    """Call-time task weights as a tensor that requires grad, through the compiled custom op:
    the loss and every gradient, the weights' included, as in eager mode."""
    torch._dynamo.reset()
    tasks = [Task("cls", 3, "cross_entropy"), Task("tok", 6, "cross_entropy", level="token"), Task("reg", 2, "mse")]
    case = case_for(tasks, (2, 9, 16))
    heads = MultiTaskHeads(16, tasks, backend="torch")
    learned = torch.rand(3, requires_grad=True)

    def loss_of(h, y):
        return heads(h, y, task_weights={"cls": learned[0], "tok": learned[1], "reg": learned[2]}).loss

    results = []
    for step in (torch.compile(loss_of, fullgraph=True), loss_of):
        hidden = case.hidden.clone().requires_grad_(True)
        loss = step(hidden, case.labels)
        loss.backward()
        results.append((loss.detach(), hidden.grad, heads.weight.grad.clone(), learned.grad.clone()))
        heads.zero_grad()
        learned.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compile_with_task_weights_that_change_between_calls():
    """Call-time task weights as numbers that change from call to call (DWA): each call's
    loss is its eager loss (the numbers are inputs of the graph, not constants of the first call)."""
    torch._dynamo.reset()
    tasks = [Task("cls", 3, "cross_entropy"), Task("tok", 6, "cross_entropy", level="token")]
    case = case_for(tasks, (2, 9, 16), ignore_rate=0.0)
    heads = MultiTaskHeads(16, tasks, backend="torch")

    def loss_of(h, y, cls_weight):
        return heads(h, y, task_weights={"cls": cls_weight, "tok": 1.5}).loss

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss_of, backend=counter, fullgraph=True)
    for cls_weight in (0.5, 0.75, 2.0, 3.5):
        torch.testing.assert_close(compiled(case.hidden, case.labels, cls_weight),
                                   loss_of(case.hidden, case.labels, cls_weight), rtol=1e-5, atol=1e-6)  # fmt: skip
    # the first graph, then one with the number dynamic; not one per value
    assert counter.frame_count <= 2, counter.frame_count


def test_column_weights_travel_as_one_key_per_head():
    """Under torch.compile the op's arguments are written into the graph: a head's class or
    positive weights go as one integer key (the same in every process), not as C floats."""
    weights = torch.rand(5000).tolist()
    tasks = (Task("vocab", 5000, "cross_entropy", level="token", class_weights=weights), Task("cls", 3, "cross_entropy"),
             Task("tags", 4, "bce", pos_weight=2.0))  # fmt: skip
    heads = TaskLayout(tasks).heads
    call = HeadCall(heads, 7, "torch", 0, False, -1.0, True, True, torch.float32)
    flat = call.flat()
    scalars = len(HEAD_SCALAR_FIELDS)
    assert all(len(field) == 3 for field in flat[:scalars])
    keys, values = flat[scalars], flat[scalars + 1]
    assert keys[1] == -1 and keys[0] == ColumnWeights(weights).key and keys[2] == ColumnWeights([2.0] * 4).key
    assert values == []
    again = HeadCall.from_flat(7, *flat, True)
    assert again == call and again.heads[0].column_weights is heads[0].column_weights
    with pytest.raises(ValueError, match="no column weights registered"):
        ColumnWeights.registered(-5)


def test_unpickled_column_weights_are_registered(monkeypatch):
    """A model saved whole and loaded in another process (an empty registry) registers its
    heads' weights again, so its compiled op finds them."""
    import pickle

    tasks = (Task("cls", 3, "cross_entropy", class_weights=[0.5, 1.0, 2.0]), Task("tags", 2, "bce", pos_weight=4.0))
    saved = pickle.dumps(MultiTaskHeads(8, list(tasks)))
    monkeypatch.setattr(ColumnWeights, "_registry", {})
    heads = pickle.loads(saved)
    for spec in heads.layout.heads:
        assert ColumnWeights.registered(spec.column_weights.key) == spec.column_weights


def test_tasks_built_inside_the_compiled_function():
    """Tasks made inside the compiled function (the functional API): their weights are built while
    dynamo traces, registered only after the graph runs, so they travel as values; the compiled
    loss and gradients match eager mode's."""
    from mtlfast.functional import multitask_loss

    torch._dynamo.reset()
    weight = torch.randn(7, 16, requires_grad=True)
    bias = torch.zeros(7, requires_grad=True)
    scale = torch.rand(()).item() + 0.5

    def loss(hidden, labels):
        tasks = [Task("cls", 3, "cross_entropy", class_weights=[0.5, 1.0, scale]), Task("tags", 4, "bce", pos_weight=scale)]
        return multitask_loss(hidden, weight, bias, tasks, labels, backend="torch").loss

    hidden = torch.randn(5, 16)
    labels = {"cls": torch.randint(0, 3, (5,)), "tags": torch.rand(5, 4)}
    results = []
    for step in (torch.compile(loss, fullgraph=True), loss):
        value = step(hidden, labels)
        results.append((value.detach(), *torch.autograd.grad(value, (weight, bias))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
