"""Calls into mtlfast as a user's type-checked code makes them. Not a test module: ``make lint``
checks it with mypy against the package as installed (``py.typed``), where ``assert_type``
fails on a type other than the one stated, and so does a call the signatures refuse."""

import torch
from torch import Tensor, nn
from typing_extensions import assert_type

from mtlfast import MultiTaskHeads, MultiTaskOutput, Task, TaskLayout, last_token, multitask_loss

tasks = [Task("sentiment", 3, "cross_entropy"), Task("ner", 9, "cross_entropy", level="token")]
heads = MultiTaskHeads(16, tasks, dropout=0.1)
hidden, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
labels = {"sentiment": torch.tensor([0, 2]), "ner": torch.randint(0, 9, (2, 5))}

out = heads(hidden, labels, attention_mask=mask, pooled=last_token(hidden, mask), num_items_in_batch={"ner": 7})
assert_type(out, MultiTaskOutput)
assert_type(out.loss, Tensor | None)
assert_type(out.losses, dict[str, Tensor])
assert_type(heads(hidden).logits, dict[str, Tensor] | None)
assert_type(heads.tasks, tuple[Task, ...])

functional = multitask_loss(hidden, heads.weight, None, TaskLayout(tuple(tasks)), labels, task_weights={"ner": 0.5})
assert_type(functional, MultiTaskOutput)
assert_type(heads.to_linears(), dict[str, nn.Linear])
assert_type(MultiTaskHeads.from_linears(tasks, heads.to_linears()), MultiTaskHeads)
