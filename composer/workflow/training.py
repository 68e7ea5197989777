"""A small multi-task training loop a researcher can read and change.

    result = train(composed, heads, tasks, tokenizer, TrainConfig(steps=500), out_dir="runs/x")

One step: draw a mixed batch (each row carries its task key), run the model once with
``route=`` the task keys when the composition routes, compute the objective's loss (TaskHeads
on the pooled encoder output, or with ``heads=None`` the model's own classifier or causal-LM
loss: see objectives.py), add the mix load-balancing loss and any callback's extra loss
(AdaLoRA's orthogonality term), backward, let callbacks act (AdaLoRA's budget step), clip,
step. Checkpoints (checkpoints.py) make ``resume=True`` continue an interrupted run exactly.

Speed: every task is tokenised once (``Task.encode`` caches), batches are padded to their
longest row and drawn in length-sorted groups (``length_grouping`` batches sorted together),
``length_percentile`` truncates training rows at that percentile of each task's lengths, and
evaluation runs without gradients on length-sorted batches of ``eval_batch_size``.

Callbacks are plain objects with any of ``extra_loss(step) -> Tensor | None``,
``after_backward(step)`` and ``after_step(step)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.workflow.checkpoints import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.mixture import MixtureSampler, collate
from adapter_composer.workflow.objectives import HeadsObjective, TrainingSetupError, objective_for
from adapter_composer.workflow.tasks import Task, check_tasks

__all__ = [
    "CHECKPOINTS", "TrainConfig", "TrainResult", "TrainingSetupError", "encode_batch", "evaluate",
    "latest_checkpoint", "load_checkpoint", "predict", "save_checkpoint", "train",
]


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup: float = 0.06  # fraction of the steps with a linear warm-up
    grad_clip: float | None = 1.0
    sampling: str = "proportional"
    temperature: float = 1.0
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int = 128
    checkpoint_every: int = 0  # 0: a checkpoint at the end only (when out_dir is given)
    seed: int = 0
    progress: bool = True
    length_grouping: int = 32  # batches drawn together and sorted by length (1: off)
    length_percentile: float | None = None  # truncate training rows at this percentile of the task's lengths
    autocast: str | None = None  # "bfloat16" or "float16": mixed precision for forward passes (weights stay fp32)

    def __post_init__(self) -> None:
        _check_autocast(self.autocast)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the training steps (evaluation excluded)

    @property
    def final(self) -> dict[str, float]:
        return self.evaluations[-1]["scores"] if self.evaluations else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def encode_batch(composed: Any, heads: Any, batch: Mapping[str, Any], model: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the encoder once for a mixed batch and every row's task head (``model`` and
    ``heads`` may be DistributedDataParallel wrappers)."""
    return HeadsObjective(composed, heads).forward(batch, model, heads)


def _check_autocast(autocast: str | None) -> str | None:
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise TrainingSetupError(f"autocast={autocast!r} is not a mixed-precision type; "
                                 f"use one of {sorted(AUTOCAST_DTYPES)} or None (full precision)")
    return autocast


def autocast_context(composed: Any, autocast: str | None) -> Any:
    """``torch.autocast`` on the model's device for ``autocast`` (None: a no-op context).
    On CPUs with AMX or AVX-512 bf16, "bfloat16" makes an encoder step about 1.7x faster."""
    if _check_autocast(autocast) is None:
        return contextlib.nullcontext()
    device = next((p.device.type for p in composed.model.parameters()), "cpu")
    return torch.autocast(device_type=device, dtype=AUTOCAST_DTYPES[autocast])


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- evaluation -----------------------------------------------------------------------


@torch.no_grad()
def predict(objective: Any, task: Task, tokenizer: Any, batch_size: int = 128, *, sort: bool = True, pad_to: int | None = None, split: str = "dev") -> torch.Tensor:
    """The objective's outputs for every row of ``split``, in data order. Rows are batched
    by length (``sort``) and padded to each batch's longest row, or to ``pad_to``."""
    examples = task.encode(tokenizer, split)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"])) if sort else list(range(len(examples)))
    pad = tokenizer.pad_token_id or 0
    parts = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        parts.append(objective.outputs(collate(chunk, pad, pad_to)).float())
    outputs = torch.cat(parts)
    result = torch.empty_like(outputs)
    result[torch.tensor(order)] = outputs
    return result


def evaluate(composed: Any, heads: TaskHeads | None, tasks: Mapping[str, Task], tokenizer: Any, batch_size: int = 128, *, autocast: str | None = None) -> dict[str, float]:
    """The dev metric of every task that has a dev split (``heads=None``: the model's own
    head); forward passes under ``autocast`` (see TrainConfig.autocast) when given."""
    objective = objective_for(composed, heads, {n: t for n, t in tasks.items() if t.dev is not None})
    was_training = composed.model.training
    composed.eval()
    objective.module.eval()
    scores = {}
    for name, task in tasks.items():
        if task.dev is None:
            continue
        with autocast_context(composed, autocast):
            outputs = predict(objective, task, tokenizer, batch_size)
        labels = [x["label"] for x in task.encode(tokenizer, "dev")]
        scores[name] = objective.score(task.spec, outputs, labels)
    composed.train(was_training)
    objective.module.train(was_training)
    return scores


# --- the loop -------------------------------------------------------------------------


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    warm = max(1, int(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    return factor


def default_optimizer(composed: Any, heads: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the composition's groups at ``lr`` and the heads at ``head_lr``."""
    groups = composed.param_groups(config.lr, config.weight_decay)
    if params := list(heads.parameters()):
        groups.append({"params": params, "lr": config.head_lr or config.lr, "weight_decay": config.weight_decay})
    if not any(g["params"] for g in groups):
        raise TrainingSetupError("nothing to train: the composition and the heads have no trainable parameters")
    return torch.optim.AdamW(groups)


def training_examples(tasks: Mapping[str, Task], names: Sequence[str], tokenizer: Any, config: TrainConfig) -> dict[str, list[dict[str, Any]]]:
    """Each task's training rows, tokenised once (truncated at ``length_percentile``)."""
    out = {}
    for n in names:
        cap = tasks[n].length_cap(tokenizer, config.length_percentile) if config.length_percentile else None
        out[n] = tasks[n].encode(tokenizer, "train", cap)
    return out


def train(
    composed: Any,
    heads: TaskHeads | None,
    tasks: Mapping[str, Task],
    tokenizer: Any,
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    optimizer_factory: Callable[[Any, nn.Module, TrainConfig], torch.optim.Optimizer] = default_optimizer,
    train_tasks: Sequence[str] | None = None,
) -> TrainResult:
    """Train the composition's adapters and the heads on a mixture of ``tasks``; with
    ``heads=None`` the model's own head and loss (a sequence classifier or a causal LM)."""
    check_tasks(tasks)
    objective = objective_for(composed, heads, tasks)
    heads = objective.module
    names = list(train_tasks or tasks)
    rank, world = _distributed()
    seed_everything(config.seed)
    examples = training_examples(tasks, names, tokenizer, config)
    # every rank draws its own batches; DDP averages the gradients (the batch is per rank)
    sampler = MixtureSampler(examples, config.batch_size, config.sampling, config.temperature, config.seed + rank, group=config.length_grouping)  # type: ignore[arg-type]
    optimizer = optimizer_factory(composed, heads, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    result = TrainResult(steps=config.steps)
    start = 0
    if resume and out_dir is not None and (last := latest_checkpoint(Path(out_dir))) is not None:
        start = load_checkpoint(last, composed, heads, optimizer, scheduler, sampler, callbacks)
    model, head_model = composed.model, heads
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # routed rows leave other adapters without gradients: find_unused_parameters
        model = DDP(composed.model, find_unused_parameters=True)
        if any(True for _ in heads.parameters()):
            head_model = DDP(heads, find_unused_parameters=True)
    writer = out_dir is not None and rank == 0
    pad = tokenizer.pad_token_id or 0
    composed.train()
    heads.train()
    progress = _progress(config if rank == 0 else dataclasses.replace(config, progress=False), start)
    clock = time.perf_counter()
    for step in range(start, config.steps):
        batch = collate(sampler.next_batch(), pad)
        with autocast_context(composed, config.autocast):
            loss = objective.loss(batch, model, head_model)
            total = loss + composed.aux_loss()
        for cb in callbacks:
            extra = getattr(cb, "extra_loss", None)
            if extra is not None and (value := extra(step)) is not None:
                total = total + value
        total.backward()
        for cb in callbacks:
            if hasattr(cb, "after_backward"):
                cb.after_backward(step)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for cb in callbacks:
            if hasattr(cb, "after_step"):
                cb.after_step(step)
        if not math.isfinite(loss.item()):
            raise ComposerError(f"the loss became {loss.item()} at step {step}; lower the learning rate")
        result.losses.append(loss.item())
        progress.update(loss.item())
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            result.seconds += time.perf_counter() - clock
            result.evaluations.append({"step": done, "scores": evaluate(composed, _heads_arg(objective), tasks, tokenizer, config.eval_batch_size, autocast=config.autocast)})
            clock = time.perf_counter()
        if writer and config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(Path(out_dir), done, composed, heads, optimizer, scheduler, sampler, config, callbacks)
    progress.close()
    result.seconds += time.perf_counter() - clock
    result.evaluations.append({"step": config.steps, "scores": evaluate(composed, _heads_arg(objective), tasks, tokenizer, config.eval_batch_size, autocast=config.autocast)})
    if writer:
        save_checkpoint(Path(out_dir), config.steps, composed, heads, optimizer, scheduler, sampler, config, callbacks)
    composed.eval()
    heads.eval()
    return result


def _heads_arg(objective: Any) -> TaskHeads | None:
    return objective.module if isinstance(objective, HeadsObjective) else None


class _progress:
    """A tqdm bar when asked for (and available), silent otherwise."""

    def __init__(self, config: TrainConfig, start: int):
        self.bar = None
        if config.progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=config.steps, initial=start, desc="train", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
