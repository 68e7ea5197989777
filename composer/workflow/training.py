"""A small multi-task training loop a researcher can read and change.

    result = train(composed, heads, tasks, tokenizer, TrainConfig(steps=500), out_dir="runs/x")

One step: draw a mixed batch (each row carries its task key), run the encoder once with
``route=`` the task keys when the composition routes, pool, apply each row's task head,
add the mix load-balancing loss and any callback's extra loss (AdaLoRA's orthogonality
term), backward, let callbacks act (AdaLoRA's budget step), clip, step. Evaluation runs per
task on its dev split; checkpoints hold the composition (``Composed.save``), the heads,
the optimizer, the scheduler, the sampler and the RNG, so ``resume=True`` continues an
interrupted run exactly where its last checkpoint left it.

Callbacks are plain objects with any of ``extra_loss(step) -> Tensor | None``,
``after_backward(step)`` and ``after_step(step)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.mixture import MixtureSampler, collate
from adapter_composer.workflow.tasks import Task, check_tasks, metric_value

CHECKPOINTS = "checkpoints"


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
    eval_batch_size: int = 64
    checkpoint_every: int = 0  # 0: a checkpoint at the end only (when out_dir is given)
    seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.evaluations[-1]["scores"] if self.evaluations else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _routes(composed: Any) -> bool:
    hook = composed._patch.model_hook
    return bool(hook is not None and hook.route_keys)


def encode_batch(composed: Any, heads: Any, batch: Mapping[str, Any], model: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the encoder once for a mixed batch and every row's task head (``model`` and
    ``heads`` may be DistributedDataParallel wrappers)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if _routes(composed):
        inputs["route"] = list(batch["tasks"])
    out = (model or composed.model)(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return heads(hidden, batch["attention_mask"], batch["tasks"])


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(composed: Any, heads: TaskHeads, tasks: Mapping[str, Task], tokenizer: Any, batch_size: int = 64) -> dict[str, float]:
    """The dev metric of every task that has a dev split."""
    was_training = composed.model.training
    composed.eval()
    heads.eval()
    scores = {}
    pad = tokenizer.pad_token_id or 0
    for name, task in tasks.items():
        if task.dev is None:
            continue
        examples = task.encode(tokenizer, "dev")
        predictions, labels = [], []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad)
            outputs = encode_batch(composed, heads, batch)
            _, values = TaskHeads.predictions(outputs, heads.specs)[name]
            predictions += values
            labels += [x["label"] for x in chunk]
        scores[name] = metric_value(task.spec.metric, predictions, labels)
    composed.train(was_training)
    heads.train(was_training)
    return scores


# --- checkpoints ----------------------------------------------------------------------


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, values in state["state"].items():
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, step: int, composed: Any, heads: nn.Module, optimizer: Any, scheduler: Any, sampler: MixtureSampler, config: TrainConfig) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temporary directory renamed into place)."""
    root = Path(directory) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    composed.save(tmp / "composition")
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp / "heads.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    trainer = {
        "step": step,
        "config": asdict(config),
        "optimizer": meta,
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "python_random": repr(random.getstate()),
    }
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    root = Path(directory) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return steps[-1] if steps else None


def load_checkpoint(path: Path, composed: Any, heads: nn.Module, optimizer: Any, scheduler: Any, sampler: MixtureSampler) -> int:
    from adapter_composer.formats.composition import read_manifest
    from adapter_composer.formats.files import read_safetensors

    manifest = read_manifest(path / "composition")
    for name, entry in manifest["adapters"].items():
        if name not in composed.adapters:
            raise ComposerError(f"checkpoint {path} holds adapter {name!r}, which this composition does not have")
        composed.replace_weights(name, read_safetensors(path / "composition" / entry["file"]))
    if manifest.get("operators_file"):
        from adapter_composer.formats.composition import load_operator_tensors

        load_operator_tensors(composed, read_safetensors(path / "composition" / manifest["operators_file"]))
    heads.load_state_dict(load_file(str(path / "heads.safetensors")))
    trainer = json.loads((path / "trainer.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, trainer["optimizer"]))
    scheduler.load_state_dict(trainer["scheduler"])
    sampler.load_state_dict(trainer["sampler"])
    torch.set_rng_state(tensors["rng.torch"])
    import ast

    random.setstate(ast.literal_eval(trainer["python_random"]))
    return int(trainer["step"])


# --- the loop -------------------------------------------------------------------------


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    warm = max(1, int(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    return factor


def default_optimizer(composed: Any, heads: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = composed.param_groups(config.lr, config.weight_decay)
    groups.append({"params": list(heads.parameters()), "lr": config.head_lr or config.lr, "weight_decay": config.weight_decay})
    return torch.optim.AdamW(groups)


def train(
    composed: Any,
    heads: TaskHeads,
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
    """Train the composition's adapters and the heads on a mixture of ``tasks``."""
    check_tasks(tasks)
    missing = [t for t in tasks if t not in heads.heads]
    if missing:
        raise ComposerError(f"no head for task(s) {missing}; build TaskHeads with every task")
    names = list(train_tasks or tasks)
    rank, world = _distributed()
    seed_everything(config.seed)
    examples = {n: tasks[n].encode(tokenizer, "train") for n in names}
    # every rank draws its own batches; DDP averages the gradients (the batch is per rank)
    sampler = MixtureSampler(examples, config.batch_size, config.sampling, config.temperature, config.seed + rank)  # type: ignore[arg-type]
    optimizer = optimizer_factory(composed, heads, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    result = TrainResult(steps=config.steps)
    start = 0
    if resume and out_dir is not None and (last := latest_checkpoint(Path(out_dir))) is not None:
        start = load_checkpoint(last, composed, heads, optimizer, scheduler, sampler)
    model, head_model = composed.model, heads
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # routed rows leave other adapters without gradients: find_unused_parameters
        model = DDP(composed.model, find_unused_parameters=True)
        head_model = DDP(heads, find_unused_parameters=True)
    writer = out_dir is not None and rank == 0
    pad = tokenizer.pad_token_id or 0
    composed.train()
    heads.train()
    progress = _progress(config if rank == 0 else dataclasses.replace(config, progress=False), start)
    for step in range(start, config.steps):
        batch = collate(sampler.next_batch(), pad)
        loss = heads.loss(encode_batch(composed, head_model, batch, model), batch["labels"])
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
            result.evaluations.append({"step": done, "scores": evaluate(composed, heads, tasks, tokenizer, config.eval_batch_size)})
        if writer and config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(Path(out_dir), done, composed, heads, optimizer, scheduler, sampler, config)
    progress.close()
    result.evaluations.append({"step": config.steps, "scores": evaluate(composed, heads, tasks, tokenizer, config.eval_batch_size)})
    if writer:
        save_checkpoint(Path(out_dir), config.steps, composed, heads, optimizer, scheduler, sampler, config)
    composed.eval()
    heads.eval()
    return result


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
