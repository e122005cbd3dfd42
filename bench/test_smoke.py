"""Quick smoke test of the benchmark CLI (part of ``make test``): one CPU workload, two
providers, the JSON schema and the Markdown report."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from mtlfast.bench.__main__ import main, run_one
from mtlfast.bench.providers import PROVIDERS, make_linears, skip_reason
from mtlfast.bench.workloads import WORKLOADS

from mtlfast import MultiTaskHeads


def test_cli_writes_results(tmp_path):
    doc = main(["--device", "cpu", "--workloads", "bert-base-4task-cpu", "--providers", "eager", "mtlfast-torch",
                "--out", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(doc))
    for key in ("device", "torch", "triton", "commit", "command", "results"):
        assert key in saved
    assert saved["peers"]["transformers"] == importlib.metadata.version("transformers")
    rows = {r["provider"]: r for r in saved["results"]}
    for provider in ("eager", "mtlfast-torch"):
        row = rows[provider]
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_mb"] is not None
    assert rows["mtlfast-torch"]["loss_rel_diff_vs_eager"] < 1e-4
    report = (tmp_path / "results.md").read_text()
    assert "| bert-base-4task-cpu | mtlfast-torch |" in report
    assert f"transformers {saved['peers']['transformers']}" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.exists(tmp_path / "results.png")


def test_merge_keeps_each_runs_ceilings(tmp_path):
    from mtlfast.bench import merge, report

    for name, copy_rate in (("bert", 2.9e12), ("big", 3.1e12)):
        run = {"device": "gpu", "torch": "t", "triton": "t", "commit": "c", "date": "d", "command": f"run {name}",
               "ceilings": {"copy_bytes_per_s": copy_rate, "bf16_flops_per_s": 7e14},
               "results": [{"workload": name, "provider": "eager", "ms": 1.0, "peak_mb": 1.0, "status": "ok"}]}  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(run))
    doc = merge.merge([str(tmp_path / "bert"), str(tmp_path / "big")])
    assert [c["workloads"] for c in doc["ceilings"]] == [["bert"], ["big"]]
    text = report.markdown(doc)
    assert "(bert run): copy 2.90 TB/s" in text and "(big run): copy 3.10 TB/s" in text
    assert doc["command"] == "run bert ; run big" and len(doc["results"]) == 2


def test_memory_ratio_needs_a_baseline_above_noise():
    from mtlfast.bench import report

    rows = [{"workload": "w", "provider": p, "ms": 1.0, "peak_mb": mb, "status": "ok"}
            for p, mb in (("eager", -0.1), ("mtlfast-torch", 3.9))]  # fmt: skip
    doc = {"device": "cpu", "torch": "t", "triton": "t", "commit": "c", "date": "d", "command": "x", "results": rows}
    assert "| w | mtlfast-torch | 1.000 | 1.00x | - | -x | 3.9 | -x |" in report.markdown(doc)
    rows[0]["peak_mb"] = 2.0
    assert "| w | mtlfast-torch | 1.000 | 1.00x | - | -x | 3.9 | 1.95x |" in report.markdown(doc)
    rows[1]["peak_mb"] = -0.5
    assert "| w | mtlfast-torch | 1.000 | 1.00x | - | -x | -0.5 | -x |" in report.markdown(doc)


def test_warm_runs_each_provider_once(capsys):
    from mtlfast.bench import warm

    warm.main(["--device", "cpu", "--workloads", "bert-base-4task-cpu", "--providers", "eager", "mtlfast-torch",
               "mtlfast-cuda"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[warm bert-base-4task-cpu] eager: ") and lines[0].endswith(" ok")
    assert lines[1].endswith(" ok") and "skipped: mtlfast has no 'cuda' backend" in lines[2]


def test_fp32_hidden_states_under_autocast():
    """``--fp32-hidden``: fp32 inputs under the autocast dtype (bf16 here, on the CPU), each
    provider's loss checked against eager's, rows named apart from the usual runs."""
    workload = WORKLOADS["bert-base-4task-cpu"]
    eager = run_one(workload, "eager", "cpu", torch.bfloat16, True, None, None, torch.float32)
    assert eager["status"] == "ok" and eager["workload"] == "bert-base-4task-cpu (float32 hidden)", eager
    row = run_one(workload, "mtlfast-torch", "cpu", torch.bfloat16, True, eager["loss"], None, torch.float32)
    assert row["status"] == "ok" and row["loss_rel_diff_vs_eager"] < 2e-2, row


def test_main_grad_provider_holds_its_buffer_before_the_step(monkeypatch):
    """mtlfast-triton-main-grad's heads (built here over the torch backend, which the CPU runs)
    have their fp32 main_grad from the start, and a step adds into it, not into .grad."""
    original = MultiTaskHeads.from_linears

    def from_linears_on_torch(tasks, linears, **options):
        return original(tasks, linears, **{**options, "backend": "torch"})

    monkeypatch.setattr(MultiTaskHeads, "from_linears", from_linears_on_torch)
    workload = WORKLOADS["bert-base-4task-cpu"]
    loss = PROVIDERS["mtlfast-triton-main-grad"][0](workload, make_linears(workload, "cpu"), torch.float32)
    weight = loss.parameters[0]
    assert weight.main_grad.dtype == torch.float32 and not weight.main_grad.any()
    hidden, labels = workload.make_inputs("cpu", torch.float32, 0)
    loss(hidden, labels).backward()
    assert weight.grad is None and weight.main_grad.abs().sum() > 0


def test_filter_provider_runs_only_where_a_vocabulary_head_is():
    """mtlfast-triton-filter differs from mtlfast-triton only on a vocabulary-sized head."""
    assert "no vocabulary-sized head" in skip_reason("mtlfast-triton-filter", "cuda", WORKLOADS["bert-base-4task"])
    assert skip_reason("mtlfast-triton-filter", "cuda", WORKLOADS["big-head-128k"]) is None
    assert skip_reason("mtlfast-triton-filter", "cpu", WORKLOADS["big-head-128k"]) == "needs a CUDA device"


def test_filter_tiles_counts_the_kept_tiles():
    """A threshold of 0 keeps every tile of rows that count (no dH dropped); one above any
    |softmax - target| none (all of dH dropped)."""
    from mtlfast.bench.filter_tiles import kept_share

    every = kept_share("big-head-128k-cpu", 64, 0.0)
    assert every["tiles"] > 1 and every["tiles_kept"] == every["tiles"] and every["dh_dropped_share"] == 0.0
    none = kept_share("big-head-128k-cpu", 64, 1.5)
    assert none["tiles_kept"] == 0 and abs(none["dh_dropped_share"] - 1.0) < 1e-6


def test_device_time_pass_fills_its_column(monkeypatch):
    """The second pass adds each step's kernels-alone time (on a GPU, a CUDA graph's replay; here
    a stand-in that runs the step once) and the report sets it against eager's; a step that
    cannot be captured gets a status instead, its wall-clock row kept."""
    from mtlfast.bench import measure, report
    from mtlfast.bench.__main__ import add_device_time

    workload = WORKLOADS["bert-base-4task-cpu"]

    def replay(step):
        assert torch.isfinite(step())
        return 0.25 if replay.provider == "mtlfast-torch" else 0.5

    monkeypatch.setattr(measure, "device_ms", replay)
    rows = [{"workload": workload.name, "provider": p, "ms": 1.0, "status": "ok"} for p in ("eager", "mtlfast-torch")]
    for row in rows:
        replay.provider = row["provider"]
        add_device_time(row, workload, "cpu", torch.float32)
    assert [row["device_ms"] for row in rows] == [0.5, 0.25]
    table = report.markdown({"device": "test", "torch": "", "triton": "", "commit": "", "date": "", "command": "",
                             "results": rows})  # fmt: skip
    assert "| mtlfast-torch | 1.000 | 1.00x | 0.250 | 2.00x |" in table

    def capture_fails(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(measure, "device_ms", capture_fails)
    row = {"workload": workload.name, "provider": "eager", "ms": 1.0, "status": "ok"}
    add_device_time(row, workload, "cpu", torch.float32)
    assert "device_ms" not in row and "not permitted" in row["device_status"] and row["status"] == "ok"


def test_device_time_pass_order_and_what_it_leaves_out(monkeypatch):
    """Captures run eager, mtlfast-triton, torch.compile, mtlfast's other steps, then the peers';
    a step that syncs with the host (validate=True) is not captured; after a capture fails, the
    rest are marked with its name rather than given errors the failed capture caused."""
    from mtlfast.bench import __main__ as bench_main

    captured = []

    def add_device_time(row, *args):
        captured.append(row["provider"])
        if row["provider"] == "mtlfast-reference":
            row["device_status"] = "error: operation not permitted when stream is capturing"
        else:
            row["device_ms"] = 0.5

    monkeypatch.setattr(bench_main, "add_device_time", add_device_time)
    workload = WORKLOADS["bert-base-4task-cpu"]
    providers = ["eager", "liger", "mtlfast-triton-validate", "torch-compile", "mtlfast-torch", "mtlfast-reference",
                 "cce", "mtlfast-triton"]  # fmt: skip
    rows = [{"workload": workload.name, "provider": p, "ms": 1.0, "status": "ok"} for p in providers]
    rows[1]["status"] = "skipped: not installed"
    seen = [row["provider"] for row in bench_main.device_time_pass(rows, workload, "cpu", torch.float32)]
    assert seen == ["eager", "mtlfast-triton", "torch-compile", "mtlfast-triton-validate", "mtlfast-torch",
                    "mtlfast-reference", "cce"]  # fmt: skip
    assert captured == ["eager", "mtlfast-triton", "torch-compile", "mtlfast-torch", "mtlfast-reference"]
    by_provider = {row["provider"]: row for row in rows}
    for provider in ("eager", "mtlfast-triton", "torch-compile", "mtlfast-torch"):
        assert by_provider[provider]["device_ms"] == 0.5
    assert "syncs with the host" in by_provider["mtlfast-triton-validate"]["device_status"]
    assert "device_ms" not in by_provider["mtlfast-triton-validate"]
    assert "not permitted" in by_provider["mtlfast-reference"]["device_status"]
    assert "device_ms" not in by_provider["cce"]
    assert by_provider["cce"]["device_status"] == "not measured: mtlfast-reference's capture failed before it in this process"
    assert "device_status" not in by_provider["liger"] and "device_ms" not in by_provider["liger"]


def test_host_phases_times_each_part():
    """profile_step --phases: the host's time per phase and the reference costs, all measured
    (the launch costs only on a GPU)."""
    from mtlfast.bench.profile_step import host_phases

    costs = host_phases("mtlfast-torch", WORKLOADS["bert-base-4task-cpu"], "cpu", torch.float32, steps=5)
    assert set(costs) == {"forward_us", "backward_us", "empty_us", "autograd_round_trip_us"}
    assert all(value > 0 for value in costs.values()), costs


def test_host_time_steps_through_stand_in_launches():
    """host_time runs mtlfast-triton's steps on the CPU with every small-path launch direct (to
    a stand-in) from the second step on."""
    import subprocess
    import sys

    code = ("from mtlfast.bench import host_time as h; h.stub_launches(); "
            "us = h.median_step_us('mtlfast-triton', steps=3, rounds=1); "
            "print(us, h._StandInKernel.direct_launches)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    us, direct = done.stdout.split()
    # 53 steps (50 to warm up), 4 launches each, all but the first step's direct
    assert float(us) > 0 and int(direct) == 52 * 4, done.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_transformers_imports_from_the_root():
    """From the checkout's root (``python -m`` there puts it first on sys.path), a top-level
    ``import kernels`` finds this checkout's ``kernels/``, which hands over to the Hugging Face
    ``kernels`` package that transformers imports, where it is installed."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face kernels package is not installed: nothing to shadow")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); import kernels; print(kernels.__file__); "
            "import transformers.integrations.hub_kernels, mtlfast.kernels.small_heads")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() != os.path.join(root, "kernels", "__init__.py"), done.stdout
