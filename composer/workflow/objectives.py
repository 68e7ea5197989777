"""What a training step optimises and what evaluation reads, for the models ``train()`` takes.

    TaskHeads on an encoder   pooled last hidden state → one head per task (heads.py)
    own classifier            ...ForSequenceClassification: the model's logits and its own loss
    own LM head               a causal LM: the model's own loss on the completion tokens

``objective_for(composed, heads, tasks)`` picks one: ``heads`` given means the first (the
model must return hidden states, i.e. be a bare encoder); ``heads=None`` means the model's
own head, refused with :class:`TrainingSetupError` when the model has none or a task does not
fit it (another label count, a regression task on a classifier, an lm task on an encoder).

Every objective has ``module`` (what it trains beside the composition, saved in checkpoints;
empty for a model's own head, whose trainable copy is an adapter of the composition),
``loss(batch, model)``, ``outputs(batch)`` (per-row outputs of a one-task batch, for
evaluation) and ``score(spec, outputs, labels)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.tasks import Task, TaskSpec, metric_value

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TrainingSetupError(ComposerError, ValueError):
    """The model, the heads and the tasks given to ``train()`` do not fit together."""


def model_inputs(composed: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    inputs = {k: v for k, v in batch.items() if k in INPUTS}
    hook = composed._patch.model_hook
    if hook is not None and hook.route_keys:
        inputs["route"] = list(batch["tasks"])
    return inputs


def own_head(model: nn.Module) -> str | None:
    """``"classifier"`` (…ForSequenceClassification), ``"lm"`` (a causal LM) or None."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "lm"
    return None


class HeadsObjective:
    """TaskHeads over the encoder's last hidden state."""

    def __init__(self, composed: Any, heads: TaskHeads):
        self.composed = composed
        self.module = heads

    def forward(self, batch: Mapping[str, Any], model: Any = None, heads: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = (model or self.composed.model)(**model_inputs(self.composed, batch))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise TrainingSetupError(
                f"{type(self.composed.model).__name__} returns no last_hidden_state, so TaskHeads cannot pool it; "
                "compose the bare encoder (e.g. model.bert) or pass heads=None to train the model's own head"
            )
        return (heads or self.module)(hidden, batch["attention_mask"], batch["tasks"])

    def loss(self, batch: Mapping[str, Any], model: Any = None, heads: Any = None) -> torch.Tensor:
        return self.module.loss(self.forward(batch, model, heads), batch["labels"])

    def outputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        (_, y), = self.forward(batch).values()
        return y

    def score(self, spec: TaskSpec, outputs: torch.Tensor, labels: Sequence[Any]) -> float:
        values = outputs if spec.kind == "regression" else outputs.argmax(-1)
        return metric_value(spec.metric, values.float().tolist(), labels)


class ClassifierObjective:
    """The model's own sequence-classification head: its logits, its own loss (cross-entropy,
    or MSE when ``num_labels == 1``)."""

    def __init__(self, composed: Any):
        self.composed = composed
        self.module = nn.ModuleDict()

    def _labels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        labels = torch.tensor(batch["labels"])
        return labels.float() if self.composed.model.config.num_labels == 1 else labels.long()

    def loss(self, batch: Mapping[str, Any], model: Any = None, heads: Any = None) -> torch.Tensor:
        out = (model or self.composed.model)(**model_inputs(self.composed, batch), labels=self._labels(batch))
        return out.loss

    def outputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        logits = self.composed.model(**model_inputs(self.composed, batch)).logits
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits

    score = HeadsObjective.score


class CausalLMObjective:
    """The causal LM's own loss: next-token cross-entropy over the completion tokens (each
    row's ``label`` prompt tokens and the padding are left out, as ``-100``)."""

    def __init__(self, composed: Any):
        self.composed = composed
        self.module = nn.ModuleDict()

    @staticmethod
    def targets(batch: Mapping[str, Any]) -> torch.Tensor:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for i, prompt in enumerate(batch["labels"]):
            labels[i, : int(prompt)] = -100
        return labels

    def loss(self, batch: Mapping[str, Any], model: Any = None, heads: Any = None) -> torch.Tensor:
        out = (model or self.composed.model)(**model_inputs(self.composed, batch), labels=self.targets(batch))
        return out.loss

    def outputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per row: [summed token NLL, tokens, tokens predicted right]."""
        logits = self.composed.model(**model_inputs(self.composed, batch)).logits[:, :-1].float()
        target = self.targets(batch)[:, 1:]
        keep = target != -100
        nll = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none") * keep
        right = (logits.argmax(-1) == target) & keep
        return torch.stack([nll.sum(1), keep.sum(1).to(nll.dtype), right.sum(1).to(nll.dtype)], dim=1)

    def score(self, spec: TaskSpec, outputs: torch.Tensor, labels: Sequence[Any]) -> float:
        nll, count, right = outputs.double().sum(0).tolist()
        if spec.metric == "perplexity":
            return math.exp(nll / max(count, 1.0))
        return right / max(count, 1.0)


def _check_fit(kind: str, model: nn.Module, tasks: Mapping[str, Task], composed: Any) -> None:
    name = type(model).__name__
    problems = []
    if kind == "classifier":
        n = model.config.num_labels
        for task in tasks.values():
            spec = task.spec
            if spec.kind == "lm":
                problems.append(f"task {spec.name!r} is an lm task; a sequence classifier has no LM head")
            elif spec.num_labels != n:
                problems.append(f"task {spec.name!r} has {spec.num_labels} label(s); the model's head has num_labels={n}")
        if not problems and not any(h.method == "module" for h in composed.adapters.values()):
            warnings.warn(
                f"{name}'s classification head is frozen (compose() freezes the base); if it is freshly "
                "initialised, add a trainable copy: graph.adapter('head', 'module') (PEFT's modules_to_save)",
                stacklevel=3,
            )
    else:
        problems += [f"task {t.spec.name!r} is a {t.spec.kind} task; a causal LM's own loss trains lm tasks" for t in tasks.values() if t.spec.kind != "lm"]
    if problems:
        raise TrainingSetupError(f"train() with the model's own head ({name}):\n  " + "\n  ".join(problems))


def objective_for(composed: Any, heads: TaskHeads | None, tasks: Mapping[str, Task]) -> HeadsObjective | ClassifierObjective | CausalLMObjective:
    model = composed.model
    kind = own_head(model)
    if heads is not None:
        if kind is not None:
            raise TrainingSetupError(
                f"{type(model).__name__} has its own {'classification' if kind == 'classifier' else 'LM'} head; "
                "pass heads=None to train it with its own loss, or compose the bare encoder to use TaskHeads"
            )
        missing = [t for t in tasks if t not in heads.heads]
        if missing:
            raise TrainingSetupError(f"no head for task(s) {missing}; build TaskHeads with every task")
        lm = [t for t, task in tasks.items() if task.spec.kind == "lm"]
        if lm:
            raise TrainingSetupError(f"lm task(s) {lm} need a causal LM's own head (heads=None), not TaskHeads")
        return HeadsObjective(composed, heads)
    if kind is None:
        raise TrainingSetupError(
            f"heads=None trains the model's own head, and {type(model).__name__} has none "
            "(…ForSequenceClassification or a causal LM); pass TaskHeads for a bare encoder"
        )
    _check_fit(kind, model, tasks, composed)
    return ClassifierObjective(composed) if kind == "classifier" else CausalLMObjective(composed)
