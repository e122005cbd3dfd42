"""The README's Python blocks run as written, each given the objects its prose assumes (an
encoder, a data loader, a language model, a few micro-batches): the smallest Hugging Face models
built from configs (nothing downloaded), on the CPU but where a block moves its heads to the GPU.
``AutoModel.from_pretrained`` hands back that encoder; on a host without CUDA, ``.cuda()`` is left
out and ``torch.autocast("cuda")`` disables itself."""

import re
from pathlib import Path

import pytest
import torch

from mtlfast import MultiTaskHeads, Task

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
BERT_TASKS = [Task("sentiment", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token"),
              Task("similarity", 1, "mse"), Task("topics", 20, "bce")]  # fmt: skip
B, S, D = 2, 6, 768


def _bert_labels(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"sentiment": torch.randint(0, 3, (B,), generator=gen), "ner": torch.randint(0, 9, (B, S), generator=gen),
            "similarity": torch.randn(B, generator=gen), "topics": torch.rand(B, 20, generator=gen)}  # fmt: skip


def _namespace(block: str, monkeypatch) -> dict:
    """What the block's prose assumes, by the names it uses; and the first block's imports, which
    a reader has made by then."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    names: dict = {"torch": torch, "MultiTaskHeads": MultiTaskHeads, "Task": Task}
    if "from_pretrained" in block:
        config = transformers.BertConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=12,
                                         intermediate_size=64, vocab_size=50)  # fmt: skip
        encoder = transformers.BertModel(config)
        monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *args, **kwargs: encoder)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, S - 2 :] = 0
        names["loader"] = [{"input_ids": torch.randint(0, 50, (B, S), generator=gen), "attention_mask": mask,
                            "sentiment": labels["sentiment"], "ner_tags": labels["ner"], "score": labels["similarity"],
                            "topics": labels["topics"]}
                           for labels in (_bert_labels(gen), _bert_labels(gen))]  # fmt: skip
    if "lm_head" in block:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
        input_ids = torch.randint(0, 300, (B, S), generator=gen)
        attention_mask = torch.ones(B, S, dtype=torch.long)
        attention_mask[1, S - 3 :] = 0
        hidden = model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        names.update(model=model, input_ids=input_ids, attention_mask=attention_mask, hidden=hidden)
    if "shared_params" in block:
        trunk = torch.nn.Linear(D, D)
        names.update(heads=MultiTaskHeads(D, BERT_TASKS), hidden=trunk(torch.randn(B, S, D, generator=gen)),
                     labels=_bert_labels(gen), shared_params=list(trunk.parameters()))  # fmt: skip
    if "micro_batches" in block:  # on the device the block moves the heads to
        device = "cuda" if ".cuda()" in block else "cpu"
        batches = [(torch.randn(B, S, D, generator=gen, dtype=torch.bfloat16), _bert_labels(gen)) for _ in range(3)]
        names.update(tasks=BERT_TASKS, K=3, micro_batches=[
            (hidden.to(device), {name: label.to(device) for name, label in labels.items()}) for hidden, labels in batches])
    return names


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, monkeypatch):
    block = BLOCKS[index]
    if not torch.cuda.is_available():
        block = block.replace(".cuda()", "")
    names = _namespace(block, monkeypatch)
    exec(compile(block, f"README.md block {index}", "exec"), names)
    if "aux_loss" in names:
        assert torch.isfinite(names["aux_loss"]) and names["aux_loss"].requires_grad
    if "task_grads" in names:
        assert len(names["task_grads"]) == len(BERT_TASKS)
    if "micro_batches" in names:
        main_grad = names["heads"].weight.main_grad
        assert main_grad.dtype == torch.float32 and main_grad.abs().sum() > 0 and names["heads"].weight.grad is None


def test_readme_has_the_blocks_this_test_knows():
    """A block added to the README needs its objects here (or none)."""
    assert len(BLOCKS) == 4
