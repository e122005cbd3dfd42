"""GPU checks of the triton backend and the CUDA extension; skipped without CUDA."""

import os
import subprocess
import sys

import pytest
import torch
from bench_eager import assert_matches, assert_within_eager_bf16_error
from oracle import (
    TOLERANCE,
    assert_matches_oracle,
    candidate_id,
    case_for,
    check_autocast_reads_fp32_rows,
    check_calls_from_threads,
    check_frozen_hidden,
    check_main_grad_accumulation,
    check_op_outputs_are_its_own,
    check_small_heads_weight_gradient_precision,
    check_strided_inputs,
    filtered_oracle,
    make_heads,
    oracle,
    random_case,
    rel_error,
    run_heads,
    run_small_heads_candidate,
    small_heads_candidates,
)

from mtlfast import MultiTaskHeads, Task, cuda_ext, functional
from mtlfast.backends import triton_fused
from mtlfast.validation import grad_filter_threshold

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def checked_fixed_launch_keys(monkeypatch):
    """Every launch keyed on a fixed key (the small path's, the loss finalize's) also works its full
    key out and checks it against the first one seen for that fixed key: a fixed key that does
    not fix its arguments fails the test instead of launching another variant."""
    from mtlfast.kernels import loss_finalize, small_heads

    for direct in (small_heads._launch_small_heads, small_heads._launch_reduce, loss_finalize._launch):
        monkeypatch.setattr(direct, "check_fixed", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("trial", range(6))
def test_triton_random_cases(dtype, trial):
    case = random_case()
    print(case.describe())
    out, grads = run_heads(case, "triton", dtype, device=DEVICE)
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], f"triton-gpu/{dtype}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_triton_training_after_evaluation_under_inference_mode(bias):
    """A training step after the same call under ``torch.inference_mode``, ``validate=True``: the oracle."""
    case = random_case()
    if not bias:
        case.bias.zero_()
    triton_fused._LOSS_SUMS.clear()  # made anew, by the evaluation
    out, grads = run_heads(case, "triton", torch.float32, device=DEVICE, evaluated_first=True, bias=bias,
                           validate=True)  # fmt: skip
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "triton-gpu after inference_mode",
                          skip=() if bias else ("bias",))  # fmt: skip


def test_triton_one_module_called_from_threads():
    """One module called at once from several threads on one GPU, as ``nn.DataParallel`` calls
    its replicas: the launcher's kept kernels and the plan are shared, the loss sums kept per
    thread; each call matches the oracle for its own inputs."""
    check_calls_from_threads("triton", DEVICE)


def _wide_path_case():
    """Wide bce/mse and class-weighted cross-entropy heads (the wide path) beside a vocabulary
    head and a small head."""
    tasks = [Task("labels", 300, "bce", level="token", pos_weight=2.0), Task("scores", 150, "mse"),
             Task("weighted", 200, "cross_entropy", level="token", class_weights=[0.5 + k % 3 for k in range(200)]),
             Task("vocab", 1000, "cross_entropy", level="token"), Task("cls", 3, "cross_entropy")]  # fmt: skip
    return case_for(tasks, (4, 33, 96))


@pytest.mark.parametrize("trial", range(5))
def test_triton_bf16_within_eager_error(trial):
    """Random cases, and (last trial) the wide path, under bf16 autocast."""
    case = _wide_path_case() if trial == 4 else random_case(shape=(4, 33, 96))
    out, grads = run_heads(case, "triton", torch.bfloat16, device=DEVICE, autocast=True)
    assert_within_eager_bf16_error(case, out, grads, DEVICE, "triton-gpu/bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_bert_sized(dtype):
    tasks = [Task("sentiment", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token"),
             Task("similarity", 1, "mse"), Task("topics", 20, "bce")]  # fmt: skip
    case = case_for(tasks, (8, 256, 768))
    out, grads = run_heads(case, "triton", dtype, device=DEVICE, autocast=dtype != torch.float32)
    tol = TOLERANCE[torch.float32] if dtype == torch.float32 else 2e-2
    assert_matches_oracle(case, out, grads, dtype, tol, f"bert-sized/{dtype}")


@pytest.mark.parametrize("vocab", [0, 5003], ids=["small", "vocab"])
def test_triton_autocast_reads_fp32_hidden_states(vocab):
    """bf16 autocast over fp32 hidden states: bit for bit the losses and hidden gradient that
    hidden states cast by hand give, the parameter gradients within fp32 rounding (on an H200
    the kernel specialised for fp32 rows added the dW products in another order: 3e-8 apart);
    deterministic mode, since float atomics would add in a different order each run."""
    case = random_case(shape=(4, 33, 96), max_classes=9)
    if vocab:
        case = case_for([*case.tasks, Task("vocab", vocab, "cross_entropy", level="token")], (4, 33, 96), case.seed)
    check_autocast_reads_fp32_rows(case, "triton", torch.bfloat16, DEVICE, param_tol=1e-5, deterministic=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_on_a_device_that_is_not_current():
    """Heads and encoder output on cuda:1 while cuda:0 is current (device_map-style placement)."""
    case = random_case(shape=(3, 41, 80))
    assert torch.cuda.current_device() == 0
    out, grads = run_heads(case, "triton", torch.float32, device="cuda:1")
    assert out.loss.device == torch.device("cuda:1")
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "cuda:1")


@pytest.mark.parametrize("classes", [None, (2000, 5000)], ids=["small", "vocabulary"])
def test_triton_frozen_hidden_states(classes):
    """No dH for a frozen encoder output: the kernel's backward without its dH half, and the
    vocabulary path without its dH GEMM."""
    check_frozen_hidden(random_case(shape=(4, 33, 96), ce_classes=classes), "triton", torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype, compiled", [(torch.float32, False), (torch.float16, False), (torch.float32, True)],
                         ids=["fp32", "fp16", "fp32-compiled"])  # fmt: skip
def test_triton_strided_inputs(dtype, compiled):
    """Hidden states transposed out of [S, B, D], a strided pooled, a weight and a bias that are
    strided views, with small heads and a vocabulary head; eager and under torch.compile."""
    case = random_case(shape=(4, 33, 96), ce_classes=(2, 3000))
    check_strided_inputs(case, "triton", dtype, device=DEVICE, compiled=compiled)


def test_triton_op_outputs_are_its_own():
    check_op_outputs_are_its_own("triton", device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("candidate", small_heads_candidates(), ids=candidate_id)
def test_triton_every_small_heads_candidate(monkeypatch, candidate, dtype):
    """Each autotuning candidate of the small-heads kernel, forced as the only one (warps and
    stages included: the compiler's own code for each), on a random case of its width: the
    autotuner may pick any of them, where the other tests run the first. fp32 against the
    oracle, bf16 under autocast within eager bf16's error plus 1e-2. Deterministic partials and
    float atomics alternate. A candidate too large for this GPU's shared memory, which the
    autotuner would skip, is skipped."""
    from triton.runtime.errors import OutOfResources

    block_c, shape = candidate
    atomics = small_heads_candidates().index(candidate) % 2 == 1
    bf16 = dtype == torch.bfloat16
    try:
        case, out, grads = run_small_heads_candidate(monkeypatch, block_c, shape, DEVICE, dtype, atomics,
                                                     autocast=bf16)  # fmt: skip
    except OutOfResources as error:
        pytest.skip(f"{shape} does not fit this GPU: {error}")
    assert_matches(case, out, grads, dtype, f"triton-gpu/{dtype}", DEVICE)


def test_triton_many_tasks_deterministic_and_repeatable():
    case = random_case(num_tasks=40, max_classes=16, shape=(4, 64, 256), levels=("token",))
    first = run_heads(case, "triton", torch.float32, device=DEVICE, deterministic=True)
    second = run_heads(case, "triton", torch.float32, device=DEVICE, deterministic=True)
    assert_matches_oracle(case, *first, torch.float32, TOLERANCE[torch.float32], "deterministic")
    for name, grad in first[1].items():
        assert torch.equal(grad, second[1][name]), name


@pytest.mark.parametrize("chunk_elements", [None, 1 << 20], ids=["one-chunk", "24-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_path_128k_classes(monkeypatch, dtype, chunk_elements):
    if chunk_elements:
        monkeypatch.setattr(triton_fused, "LARGE_CHUNK_ELEMENTS", chunk_elements)
    tasks = [Task("lm", 128256, "cross_entropy", level="token"), Task("ner", 9, "cross_entropy", level="token")]
    case = case_for(tasks, (2, 96, 128))
    out, grads = run_heads(case, "triton", dtype, device=DEVICE, autocast=dtype != torch.float32)
    tol = TOLERANCE[torch.float32] if dtype == torch.float32 else 2e-2
    assert_matches_oracle(case, out, grads, dtype, tol, f"128k/{dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap_and_z_loss_128k_classes(dtype):
    """A 128k-class head with Gemma 2's softcap of 30 (logits scaled up so that it bites) and a
    z-loss, with the gradient filter keeping every tile, beside small heads (one softcapped) on the
    small-heads kernel."""
    tasks = [Task("lm", 128256, "cross_entropy", level="token", softcap=30.0, z_loss=1e-4),
             Task("cls", 5, "cross_entropy", softcap=2.0), Task("ner", 9, "cross_entropy", level="token")]  # fmt: skip
    case = case_for(tasks, (2, 96, 128))
    case.weight *= 20.0
    for eps in (None, 0.0):
        out, grads = run_heads(case, "triton", dtype, device=DEVICE, autocast=dtype != torch.float32,
                               grad_filter_eps=eps)  # fmt: skip
        tol = TOLERANCE[torch.float32] if dtype == torch.float32 else 2e-2
        assert_matches_oracle(case, out, grads, dtype, tol, f"128k softcap+z/{dtype}/filter {eps}")


@pytest.mark.parametrize("chunk_elements", [None, 1 << 20], ids=["one-chunk", "24-chunks"])
@pytest.mark.parametrize("dtype, eps", [(torch.float32, 0.0), (torch.bfloat16, "auto")], ids=["fp32-every-tile", "bf16-auto"])
def test_grad_filter_128k_classes(monkeypatch, dtype, eps, chunk_elements):
    """The gradient filter's GEMMs on a 128k-class head, against a float64 oracle that drops
    the tiles below the threshold, chunk by chunk as the backend walks the head: with a
    threshold of 0 every tile of a row that counts is kept (fp32 bounds); with ``"auto"`` in
    bf16 (2**-12), within bf16's bound. Also bitwise repeatable. (On such random heads
    ``"auto"`` drops about 4% of the exact hidden gradient's norm, its float64 oracle says:
    an approximation, not rounding.)"""
    if chunk_elements:
        monkeypatch.setattr(triton_fused, "LARGE_CHUNK_ELEMENTS", chunk_elements)
    tasks = [Task("lm", 128256, "cross_entropy", level="token"), Task("ner", 9, "cross_entropy", level="token")]
    case = case_for(tasks, (2, 96, 128))
    autocast = dtype != torch.float32
    out, grads = run_heads(case, "triton", dtype, device=DEVICE, autocast=autocast, grad_filter_eps=eps)
    chunk_shape = triton_fused._large_chunk_shape(2 * 96, 128256, None)
    reference = filtered_oracle(case, "lm", grad_filter_threshold(eps, dtype), dtype, chunk_shape)
    tol = TOLERANCE[torch.float32] if dtype == torch.float32 else 2e-2
    assert_matches_oracle(case, out, grads, dtype, tol, f"128k/filter {eps}/{dtype}", reference=reference)
    again = run_heads(case, "triton", dtype, device=DEVICE, autocast=autocast, grad_filter_eps=eps)[1]
    for name, grad in grads.items():
        assert torch.equal(grad, again[name]), name


def test_bf16_language_model_head_tied_and_without_bias():
    """A bf16 language model's own output head (tied to its input embedding, no bias) as a
    vocabulary task through the functional call: bf16 gradients within 2e-2 of float64."""
    import torch.nn.functional as F

    from mtlfast import multitask_loss

    vocab, hidden_size = 32003, 256
    embedding = torch.nn.Embedding(vocab, hidden_size, device=DEVICE, dtype=torch.bfloat16)
    hidden = torch.randn(3, 57, hidden_size, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 57), device=DEVICE)
    labels[:, -1] = -100
    out = multitask_loss(hidden, embedding.weight, None, [Task("lm", vocab, "cross_entropy", level="token")],
                         {"lm": labels})  # fmt: skip
    out.loss.backward()
    h = hidden.detach().double().requires_grad_(True)
    w = embedding.weight.detach().double().requires_grad_(True)
    expected = F.cross_entropy((h @ w.T).reshape(-1, vocab), labels.reshape(-1))
    expected.backward()
    assert embedding.weight.grad.dtype == torch.bfloat16
    assert rel_error(out.loss, expected) <= 2e-2
    assert rel_error(hidden.grad, h.grad) <= 2e-2 and rel_error(embedding.weight.grad, w.grad) <= 2e-2


def test_large_path_bitwise_repeatable():
    tasks = [Task("lm", 5003, "cross_entropy", level="token", label_smoothing=0.1), Task("cls", 3, "cross_entropy")]
    case = case_for(tasks, (3, 77, 96))
    first = run_heads(case, "triton", torch.bfloat16, device=DEVICE, autocast=True, deterministic=True)[1]
    second = run_heads(case, "triton", torch.bfloat16, device=DEVICE, autocast=True, deterministic=True)[1]
    for name, grad in first.items():
        assert torch.equal(grad, second[name]), name


def test_compile_fullgraph_with_triton():
    tasks = [Task("cls", 5, "cross_entropy"), Task("tags", 7, "cross_entropy", level="token"), Task("r", 1, "mse")]
    case = case_for(tasks, (3, 17, 64))
    heads = MultiTaskHeads(64, tasks, backend="triton").to(DEVICE)
    with torch.no_grad():
        heads.weight.copy_(case.weight)
        heads.bias.copy_(case.bias)
    labels = {k: v.to(DEVICE) for k, v in case.labels.items()}
    h = case.hidden.to(DEVICE).requires_grad_(True)
    compiled = torch.compile(lambda x, y: heads(x, y).loss, fullgraph=True)
    loss = compiled(h, labels)
    loss.backward()
    ref_total, _, ref_grads = oracle(case, torch.float32)
    assert rel_error(loss, ref_total) <= TOLERANCE[torch.float32]
    assert rel_error(h.grad, ref_grads["hidden"]) <= TOLERANCE[torch.float32]
    assert rel_error(heads.weight.grad, ref_grads["weight"]) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_direct_launches_match_launches_through_triton(monkeypatch, offset):
    """From a kernel variant's second launch on, the direct launcher calls the compiled kernel
    itself: bit for bit what launches through JITFunction.run give (deterministic mode), also
    for hidden states off a 16-byte boundary, another specialization of the same kernels."""
    from mtlfast.kernels import launcher

    case = random_case(shape=(4, 33, 96), allow_extras=False)
    labels = {k: v.to(DEVICE) for k, v in case.labels.items()}
    mask = case.attention_mask.to(DEVICE) if case.attention_mask is not None else None

    def run():
        heads = make_heads(case, "triton", DEVICE, deterministic=True)
        storage = torch.empty(case.hidden.numel() + offset, device=DEVICE, dtype=torch.float16)
        hidden = storage[offset:].view(case.hidden.shape).copy_(case.hidden).requires_grad_(True)
        out = heads(hidden, labels, attention_mask=mask)
        out.loss.backward()
        return out, {"hidden": hidden.grad, "weight": heads.weight.grad, "bias": heads.bias.grad}

    run()
    direct_out, direct = run()
    monkeypatch.setattr(launcher, "ENABLED", False)
    out, through_triton = run()
    assert torch.equal(direct_out.loss, out.loss), case.describe()
    for name, grad in direct.items():
        assert torch.equal(grad, through_triton[name]), f"{name}: {case.describe()}"
    assert_matches_oracle(case, direct_out, direct, torch.float16, TOLERANCE[torch.float16], "direct launches",
                          skip=("pooled", "log_vars"))  # fmt: skip


def test_loss_sums_are_kept_per_stream():
    """The forward's kept loss sums are per stream: a step on a side stream gets its own, both
    steps match the oracle, and every kept buffer is zero once the device is idle."""
    case = random_case(shape=(4, 33, 96), allow_extras=False)
    out, grads = run_heads(case, "triton", torch.float32, device=DEVICE)
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "default stream")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, grads = run_heads(case, "triton", torch.float32, device=DEVICE)
    torch.cuda.synchronize()
    assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], "side stream")
    streams = {key[2] for key in triton_fused._LOSS_SUMS if key[0].type == "cuda"}
    assert {side.cuda_stream, torch.cuda.current_stream().cuda_stream} <= streams
    for buffer, _, _ in triton_fused._LOSS_SUMS.values():
        assert torch.equal(buffer, torch.zeros_like(buffer))


@pytest.mark.parametrize("validate", [False, True], ids=["validate-False", "validate-True"])
def test_launch_count_does_not_grow_with_tasks(validate):
    """At most 4 Triton kernels a step for 4 and for 40 small heads, ``validate=True``'s label
    check included (it runs in the loss finalize's launch)."""
    from torch.profiler import ProfilerActivity, profile

    def triton_launches(num_tasks: int) -> int:
        case = random_case(num_tasks=num_tasks, max_classes=8, shape=(4, 32, 64), allow_extras=False)
        run_heads(case, "triton", torch.float32, device=DEVICE, validate=validate)  # compile and tune first
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_heads(case, "triton", torch.float32, device=DEVICE, validate=validate)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        return sum(1 for n in names if n.startswith(("small_heads_", "large_ce_", "loss_finalize_")))

    four, forty = triton_launches(4), triton_launches(40)
    assert four == forty <= 4, (four, forty)


# One tuned forward at width 16 (5 candidates) in a fresh process; prints the pick.
_TUNE_ONE_FORWARD = """
import torch
from mtlfast import MultiTaskHeads, Task
from mtlfast.kernels import small_heads

tasks = [Task("cls", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token")]
heads = MultiTaskHeads(hidden_size=64, tasks=tasks, backend="triton").cuda()
hidden = torch.randn(4, 50, 64, device="cuda")
labels = {"cls": torch.randint(0, 3, (4,), device="cuda"), "ner": torch.randint(0, 9, (4, 50), device="cuda")}
with torch.no_grad():
    heads(hidden, labels=labels).loss.item()
print("picked", small_heads.tuned_shapes())
"""


def test_tuning_results_are_kept_on_disk(tmp_path):
    """A second process with the same triton cache takes the first one's tuning pick without
    timing the candidates again (triton prints each tuning it runs)."""
    from mtlfast.kernels import small_heads

    if not small_heads.TUNING_KEPT_ON_DISK:
        pytest.skip("this triton keeps no tuning results")
    env = dict(os.environ, MTLFAST_AUTOTUNE="1", TRITON_CACHE_DIR=str(tmp_path), TRITON_PRINT_AUTOTUNING="1")
    runs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _TUNE_ONE_FORWARD], env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        runs.append(run.stdout)
    first, second = runs
    assert "Triton autotuning for function small_heads_kernel" in first, first
    assert "Triton autotuning for function" not in second, second
    picks = [[line for line in out.splitlines() if line.startswith("picked")] for out in runs]
    assert picks[0] == picks[1] and len(picks[0]) == 1, picks


@pytest.mark.skipif(not cuda_ext.available(), reason="mtlfast was built without its CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_extension_accumulate_fp32(dtype):
    n = 1 + torch.randint(1, 100000, ()).item()
    main_grad = torch.randn(n, device=DEVICE)
    grad = torch.randn(n, device=DEVICE).to(dtype)
    expected = main_grad.double() + grad.double()
    cuda_ext.accumulate_fp32_(main_grad, grad)
    assert rel_error(main_grad, expected) < 1e-7
    with pytest.raises(RuntimeError, match="float32"):
        cuda_ext.accumulate_fp32_(main_grad.half(), grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [2.0**-20, 1.0, 2.0**10])
def test_small_heads_weight_gradient_at_fp32_precision_at_any_scale(scale, dtype):
    check_small_heads_weight_gradient_precision(scale, dtype, DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_k16_accumulation_on_gpu(backend):
    """fp32 parameters, bf16 compute, K=16 micro-batches: head gradients within 1e-5 of float64."""
    from test_grad_accumulation import check_k16_accumulation

    check_k16_accumulation(backend, torch.bfloat16, DEVICE, (4, 33, 64))


@pytest.mark.parametrize("vocabulary", [False, True], ids=["small", "vocabulary"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_parameters_accumulate_into_fp32_main_grad(backend, vocabulary):
    """``fuse_wgrad_accumulation`` with bf16 parameters, K=8: small heads' dW within 1e-5 of
    float64; a vocabulary head's dW comes from bf16 dlogits (fp32 accumulation)."""
    from test_grad_accumulation import TASKS

    tasks = TASKS + [Task("vocab", 5003, "cross_entropy", level="token")] if vocabulary else TASKS
    fused, plain = check_main_grad_accumulation(tasks, (4, 65, 96), backend, torch.bfloat16, 8, DEVICE,
                                                tol=5e-3 if vocabulary else 1e-5)  # fmt: skip
    print(f"{backend} vocabulary={vocabulary}: main_grad {fused:.1e}, bf16 .grad {plain:.1e}")


def test_main_grad_spares_the_fp32_weight_gradient_buffer():
    """A 32000 x 1024 bf16 vocabulary head: with ``fuse_wgrad_accumulation`` backward's peak
    memory is below the unfused step's by about the fp32 dW buffer (131 MB; at least 90% of
    it), the kernels adding into ``main_grad`` instead."""
    tasks = [Task("vocab", 32000, "cross_entropy", level="token"), Task("cls", 3, "cross_entropy")]
    case = case_for(tasks, (2, 512, 1024))
    peaks = {}
    for fuse in (False, True):
        heads = MultiTaskHeads(1024, tasks, fuse_wgrad_accumulation=fuse).to(DEVICE, torch.bfloat16)
        heads.weight.main_grad = torch.zeros_like(heads.weight, dtype=torch.float32)
        hidden = case.hidden.to(DEVICE, torch.bfloat16).requires_grad_(True)
        labels = {k: v.to(DEVICE) for k, v in case.labels.items()}
        loss = heads(hidden, labels).loss
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        peaks[fuse] = torch.cuda.max_memory_allocated() - held
        assert (heads.weight.grad is None) == fuse
    print({f"fused={k}": f"{v / 2**20:.1f} MiB" for k, v in peaks.items()})
    assert peaks[True] <= peaks[False] - 0.9 * 32000 * 1024 * 4


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_training_step_never_syncs(backend):
    """With validate=False a step (small, vocabulary and wide heads, a divisor override, class and
    positive weights, fp32 rows under autocast) runs under torch.cuda.set_sync_debug_mode("error")
    once kernels are compiled, tuned and planned, also with a call-time task weight it has not
    seen before (DWA's change every step)."""
    tasks = [Task("cls", 3, "cross_entropy", class_weights=[0.5, 1.0, 2.0]), Task("ner", 9, "cross_entropy", level="token"),
             Task("r", 1, "mse"), Task("lm", 300, "cross_entropy", level="token"),
             Task("tags", 4, "bce", pos_weight=3.0), Task("labels", 200, "bce", level="token")]  # fmt: skip
    heads = MultiTaskHeads(64, tasks, backend=backend, validate=False).to(DEVICE)
    h = torch.randn(2, 17, 64, device=DEVICE, requires_grad=True)
    labels = {"cls": torch.randint(0, 3, (2,), device=DEVICE), "ner": torch.randint(0, 9, (2, 17), device=DEVICE),
              "r": torch.randn(2, device=DEVICE), "lm": torch.randint(0, 300, (2, 17), device=DEVICE),
              "tags": torch.rand(2, 4, device=DEVICE), "labels": torch.rand(2, 17, 200, device=DEVICE)}  # fmt: skip

    def step(ner_weight):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = heads(h, labels, num_items_in_batch={"ner": 11, "lm": torch.tensor(20)},
                        task_weights={"ner": ner_weight})  # fmt: skip
        out.loss.backward()
        return out.loss

    step(0.5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(0.75)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_validate_checks_values_in_one_sync(backend):
    """validate=True on a GPU (the triton backend's label check in its loss finalize launch, the
    torch backend's ops):
    a step syncs with the host once, gives the loss and gradients of validate=False,
    and a value out of range is a ValueError naming its task (a class id of a small head and of a
    vocabulary head, a bce target), also where the attention mask leaves it out on another task."""
    import warnings

    tasks = [Task("cls", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token"), Task("r", 1, "mse"),
             Task("lm", 300, "cross_entropy", level="token"), Task("tags", 4, "bce")]  # fmt: skip
    checked = MultiTaskHeads(64, tasks, backend=backend).to(DEVICE)
    unchecked = MultiTaskHeads(64, tasks, backend=backend, validate=False).to(DEVICE)
    unchecked.load_state_dict(checked.state_dict())
    h = torch.randn(2, 17, 64, device=DEVICE)
    mask = torch.ones(2, 17, dtype=torch.long, device=DEVICE)
    mask[1, 9:] = 0
    labels = {"cls": torch.randint(0, 3, (2,), device=DEVICE), "ner": torch.randint(0, 9, (2, 17), device=DEVICE),
              "r": torch.randn(2, device=DEVICE), "lm": torch.randint(0, 300, (2, 17), device=DEVICE),
              "tags": torch.rand(2, 4, device=DEVICE)}  # fmt: skip
    labels["ner"][1, 12] = 99  # behind the mask

    def step(heads, labels):
        heads.zero_grad(set_to_none=True)
        hidden = h.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = heads(hidden, labels, attention_mask=mask).loss
        loss.backward()
        return loss.detach(), hidden.grad, heads.weight.grad

    step(checked, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = step(checked, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    for got, expected in zip(results, step(unchecked, labels)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, position, value, match in [("cls", (0,), 3, "class ids must lie in \\[0, 3\\)"),
                                         ("lm", (0, 4), 300, "class ids must lie in \\[0, 300\\)"),
                                         ("tags", (1, 2), 1.5, "bce targets must lie in \\[0, 1\\]")]:  # fmt: skip
        bad = {**labels, name: labels[name].clone()}
        bad[name][position] = value
        with pytest.raises(ValueError, match=f"task '{name}': {match}"):
            step(checked, bad)


def test_cuda_graph_capture_with_validate_is_a_clear_error():
    """validate=True syncs with the host to read its checks, which a CUDA graph capture does not
    allow: the call raises a ValueError saying so before it syncs, the capture ends cleanly, and
    the heads then run eagerly as before."""
    tasks = [Task("cls", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token")]
    heads = MultiTaskHeads(64, tasks, backend="triton").to(DEVICE)
    h = torch.randn(2, 17, 64, device=DEVICE)
    labels = {"cls": torch.randint(0, 3, (2,), device=DEVICE), "ner": torch.randint(0, 9, (2, 17), device=DEVICE)}
    expected = heads(h, labels).loss
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        heads(h, labels)
    torch.cuda.current_stream().wait_stream(side)
    with pytest.raises(ValueError, match="validate=True .* CUDA graph capture .* validate=False"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            heads(h, labels)
    torch.testing.assert_close(heads(h, labels).loss, expected)


def test_cuda_graph_replays_a_training_step():
    """A whole step (small and vocabulary heads, forward and backward) captured in a CUDA graph
    and replayed on new inputs copied into the captured tensors matches an eager step, also once
    the cache of the op's small constants (task weights, divisors; made before the capture) has
    been emptied and the memory it freed filled with NaN. The label address table is made during
    the capture, and an eager step on the same labels runs before the first replay: a copy
    captured is only made at a replay, so that step must not be handed the captured table."""
    tasks = [Task("cls", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token"), Task("r", 1, "mse"),
             Task("lm", 300, "cross_entropy", level="token")]  # fmt: skip
    heads = MultiTaskHeads(64, tasks, backend="triton", validate=False).to(DEVICE)
    h = torch.randn(2, 17, 64, device=DEVICE, requires_grad=True)

    def new_labels():
        return {"cls": torch.randint(0, 3, (2,), device=DEVICE), "ner": torch.randint(0, 9, (2, 17), device=DEVICE),
                "r": torch.randn(2, device=DEVICE), "lm": torch.randint(0, 300, (2, 17), device=DEVICE)}  # fmt: skip

    labels = new_labels()

    def step():
        heads.zero_grad(set_to_none=True)
        h.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = heads(h, labels).loss
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    functional._CONSTANTS.clear()  # made anew below, on the side stream: its pool is the one refilled after the capture
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    triton_fused._TABLES.clear()
    graph = torch.cuda.CUDAGraph()
    heads.zero_grad(set_to_none=True)
    h.grad = None
    with torch.cuda.graph(graph):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            captured_loss = heads(h, labels).loss
        captured_loss.backward()
    captured = [h.grad, *(p.grad for p in heads.parameters())]
    functional._CONSTANTS.clear()
    with torch.cuda.stream(side):  # more than a 2 MiB segment of small blocks
        reused = [torch.full((4,), float("nan"), device=DEVICE) for _ in range(8192)]  # noqa: F841

    for _ in range(2):
        with torch.no_grad():
            h.copy_(torch.randn_like(h))
        for name, y in new_labels().items():
            labels[name].copy_(y)
        eager_loss = step()
        expected = [eager_loss, h.grad, *(p.grad for p in heads.parameters())]
        graph.replay()
        replayed = [captured_loss.clone()] + [g.clone() for g in captured]
        for got, want in zip(replayed, expected):
            assert rel_error(got, want) <= 1e-5


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_accumulating_gemm(beta, dtype):
    """``addmm_acc_`` on CUDA (out_dtype GEMMs; beta 0 never reads ``out``, NaN included)
    against float64, with odd sizes and a transposed operand."""
    from mtlfast.backends.base import addmm_acc_

    a = torch.randn(67, 45, device=DEVICE).to(dtype)
    b = torch.randn(29, 45, device=DEVICE).to(dtype).t()
    start = torch.randn(67, 29, device=DEVICE)
    out = torch.full_like(start, float("nan")) if beta == 0 else start.clone()
    addmm_acc_(out, a, b, beta=beta)
    expected = a.double() @ b.double() + (start.double() if beta else 0)
    assert rel_error(out, expected) <= 1e-6
