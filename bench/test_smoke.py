"""Quick smoke test of the benchmark CLI (part of ``make test``): one CPU workload, two
providers, the JSON schema and the Markdown report."""

import importlib.util
import json
import os

from mtlfast.bench.__main__ import main


def test_cli_writes_results(tmp_path):
    doc = main(["--device", "cpu", "--workloads", "bert-base-4task-cpu", "--providers", "eager", "mtlfast-torch",
                "--out", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(doc))
    for key in ("device", "torch", "triton", "commit", "command", "results"):
        assert key in saved
    rows = {r["provider"]: r for r in saved["results"]}
    for provider in ("eager", "mtlfast-torch"):
        row = rows[provider]
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_mb"] is not None
    assert rows["mtlfast-torch"]["loss_rel_diff_vs_eager"] < 1e-4
    report = (tmp_path / "results.md").read_text()
    assert "| bert-base-4task-cpu | mtlfast-torch |" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.exists(tmp_path / "results.png")
