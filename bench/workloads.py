"""The benchmark workloads, defined exactly. CPU variants (``-cpu``) are scaled down so
that all of them finish within a few minutes on 2 cores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlfast import Task

LOSS_CYCLE = ("cross_entropy", "bce", "mse")


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    seq_len: int
    hidden: int
    tasks: tuple[Task, ...]
    ignore_rate: float = 0.15  # share of token cross-entropy labels set to ignore_index
    note: str = ""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def rows(self, task: Task) -> int:
        return self.tokens if task.level == "token" else self.batch

    def flops(self) -> float:
        """Matrix FLOPs of one training step at the floor: logits, dH and dW GEMMs."""
        return sum(3 * 2 * self.rows(t) * self.hidden * t.num_outputs for t in self.tasks)

    def min_bytes(self, compute_bytes: int = 2) -> float:
        """Fewest bytes one step must move: H read, dH written, fp32 W read and dW written, labels read."""
        total_c = sum(t.num_outputs for t in self.tasks)
        hidden = 2 * self.tokens * self.hidden * compute_bytes
        params = 2 * total_c * (self.hidden + 1) * 4
        labels = sum(self.rows(t) * (8 if t.loss == "cross_entropy" else 4 * t.num_outputs) for t in self.tasks)
        return float(hidden + params + labels)

    def make_inputs(self, device: str, dtype: torch.dtype, seed: int = 0):
        """``(hidden [B, S, D] leaf in dtype, labels dict)`` with fresh random values."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        hidden = torch.randn(self.batch, self.seq_len, self.hidden, generator=gen).to(device=device, dtype=dtype)
        labels = {}
        for task in self.tasks:
            lead = (self.batch, self.seq_len) if task.level == "token" else (self.batch,)
            if task.loss == "cross_entropy":
                y = torch.randint(0, task.num_outputs, lead, generator=gen)
                if task.level == "token" and self.ignore_rate:
                    y = y.masked_fill(torch.rand(lead, generator=gen) < self.ignore_rate, task.ignore_index)
            elif task.loss == "bce":
                y = (torch.rand((*lead, task.num_outputs), generator=gen) > 0.5).float()
            else:
                y = torch.randn((*lead, task.num_outputs), generator=gen)
            labels[task.name] = y.to(device)
        return hidden.requires_grad_(True), labels


def _bert_tasks() -> tuple[Task, ...]:
    return (
        Task("sentiment", 3, "cross_entropy"),
        Task("ner", 9, "cross_entropy", level="token"),
        Task("similarity", 1, "mse"),
        Task("topics", 20, "bce"),
    )


def _many_tasks(count: int = 64) -> tuple[Task, ...]:
    return tuple(Task(f"task{k:02d}", 2 + (7 * k) % 15, LOSS_CYCLE[k % 3], level="token") for k in range(count))


def _big_head(vocab: int) -> tuple[Task, ...]:
    return (Task("lm", vocab, "cross_entropy", level="token"), Task("ner", 9, "cross_entropy", level="token"))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("bert-base-4task", 32, 512, 768, _bert_tasks()),
        Workload("many-tasks-64", 16, 512, 1024, _many_tasks()),
        Workload("big-head-128k", 4, 2048, 4096, _big_head(128256)),
        Workload("bert-base-4task-cpu", 8, 128, 768, _bert_tasks(), note="B=8, S=128"),
        Workload("many-tasks-64-cpu", 4, 128, 256, _many_tasks(), note="B=4, S=128, D=256"),
        Workload("big-head-128k-cpu", 1, 512, 256, _big_head(32000), note="B=1, S=512, D=256, 32000 classes"),
        Workload(
            "memory-32k-cpu", 8, 256, 256,
            (Task("vocab", 32000, "cross_entropy", level="token"), Task("ner", 9, "cross_entropy", level="token"),
             Task("sentiment", 3, "cross_entropy")),
            note="the foundation issue's memory step: B=8, S=256, D=256",
        ),  # fmt: skip
    )
}
GPU_WORKLOADS = ("bert-base-4task", "many-tasks-64", "big-head-128k")
CPU_WORKLOADS = ("bert-base-4task-cpu", "many-tasks-64-cpu", "big-head-128k-cpu")
