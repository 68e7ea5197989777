"""Per-task prediction heads on a pooled encoder output (classification or regression).

Heads are ordinary trainable modules beside the composition (PEFT's ``modules_to_save``):
one ``Linear(hidden, num_labels)`` per task, applied to the rows of that task only.
Classification rows use cross-entropy, regression rows mean-squared error; the batch loss
is the mean over rows whatever their task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapter_composer.workflow.tasks import TaskSpec


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors under the attention mask (as sentence-transformers)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TaskHeads(nn.Module):
    def __init__(self, specs: Mapping[str, TaskSpec], hidden: int, dropout: float = 0.1, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "first"):
            raise ValueError("pooling is 'mean' or 'first' (the first token, e.g. [CLS])")
        self.specs = dict(specs)
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, spec.num_labels) for name, spec in self.specs.items()})

    @torch.no_grad()
    def start_at_label_mean(self, name: str, labels: Sequence[float]) -> None:
        """A fresh regression head predicts the mean training label (its bias), not 0: on a
        0-5 scale such as STS-B the first steps' errors are then the labels' spread, not 2.7
        on average, whose large early gradients can collapse the encoder's features (LoRA
        at lr 3e-3 did, for one seed in three)."""
        if self.specs[name].kind != "regression":
            raise ValueError(f"task {name!r} is a classification task; start_at_label_mean is for regression heads")
        if not labels:
            raise ValueError(f"task {name!r}: no labels to take the mean of")
        self.heads[name].bias.fill_(sum(float(v) for v in labels) / len(labels))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(hidden, mask) if self.pooling == "mean" else hidden[:, 0]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, tasks: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{task: (row indices, outputs)}: outputs are logits [n, C] or scores [n]."""
        pooled = self.dropout(self.pool(hidden, mask))
        out = {}
        for name in dict.fromkeys(tasks):
            if name not in self.heads:
                raise KeyError(f"no head for task {name!r}; heads: {sorted(self.heads)}")
            rows = torch.tensor([i for i, t in enumerate(tasks) if t == name], device=hidden.device)
            y = self.heads[name](pooled.index_select(0, rows).to(self.heads[name].weight.dtype))
            out[name] = (rows, y.squeeze(-1) if self.specs[name].kind == "regression" else y)
        return out

    def loss(self, outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], labels: Sequence[Any]) -> torch.Tensor:
        total, count = None, 0
        for name, (rows, y) in outputs.items():
            if y.dtype in (torch.float16, torch.bfloat16):
                y = y.float()  # the loss in fp32 under autocast (a float64 model keeps float64)
            target = torch.tensor([labels[i] for i in rows.tolist()], device=y.device)
            if self.specs[name].kind == "regression":
                part = F.mse_loss(y, target.to(y.dtype), reduction="sum")
            else:
                part = F.cross_entropy(y, target.long(), reduction="sum")
            total = part if total is None else total + part
            count += len(rows)
        return total / max(count, 1)

    @staticmethod
    def predictions(outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], specs: Mapping[str, TaskSpec]) -> dict[str, tuple[list[int], list[float]]]:
        result = {}
        for name, (rows, y) in outputs.items():
            values = y if specs[name].kind == "regression" else y.argmax(-1)
            result[name] = (rows.tolist(), values.float().tolist())
        return result
