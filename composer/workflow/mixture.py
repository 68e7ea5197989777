"""Sampling a mixture of tasks: proportional, temperature-scaled or uniform.

    pᵢ = nᵢ / Σ nⱼ                   proportional
    pᵢ = nᵢ^(1/T) / Σ nⱼ^(1/T)       temperature T (T = 1: proportional, T → ∞: uniform)
    pᵢ = 1 / k                       uniform

Every example of a batch draws its task from p, then the next example of that task (each
task is read in a seeded random order, reshuffled when it runs out), so a batch mixes
tasks and each example carries its task key — the key ``route`` and ``mix`` see. The
sampler's whole state is a few integers, saved in checkpoints so a resumed run continues
the same stream.

Length grouping (``group=k``): the sampler draws ``k`` batches' worth of examples at once,
sorts them by length, cuts them into ``k`` batches and serves those in a seeded random
order. The mixture and each task's order are unchanged; a batch holds examples of similar
length, so padding to its longest row (:func:`collate`) wastes little. The pending batches
are part of the sampler's state.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

Sampling = Literal["proportional", "temperature", "uniform"]


def mixture_weights(sizes: Mapping[str, int], sampling: Sampling = "proportional", temperature: float = 1.0) -> dict[str, float]:
    if not sizes:
        raise ValueError("a mixture needs at least one task")
    if any(n <= 0 for n in sizes.values()):
        raise ValueError(f"every task needs examples: {dict(sizes)}")
    if sampling == "uniform":
        raw = {k: 1.0 for k in sizes}
    elif sampling == "proportional":
        raw = {k: float(n) for k, n in sizes.items()}
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError("the sampling temperature must be > 0")
        raw = {k: float(n) ** (1.0 / temperature) for k, n in sizes.items()}
    else:
        raise ValueError(f"unknown sampling {sampling!r}; choose proportional, temperature or uniform")
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


class MixtureSampler:
    """Draws batches of examples from several tasks (see the module docstring)."""

    def __init__(
        self,
        examples: Mapping[str, Sequence[dict[str, Any]]],
        batch_size: int,
        sampling: Sampling = "proportional",
        temperature: float = 1.0,
        seed: int = 0,
        group: int = 1,
    ):
        if group < 1:
            raise ValueError(f"length grouping takes group >= 1 batches (1: off), not {group}")
        self.examples = dict(examples)
        self.group = group
        self.names = list(self.examples)
        self.batch_size = batch_size
        self.weights = mixture_weights({k: len(v) for k, v in self.examples.items()}, sampling, temperature)
        self.seed = seed
        self.state: dict[str, Any] = {"draws": 0, "epochs": {k: 0 for k in self.names}, "cursor": {k: 0 for k in self.names}, "pending": []}
        self._orders: dict[str, tuple[int, list[int]]] = {}  # task → (epoch, its row order)

    def _order(self, task: str) -> list[int]:
        epoch = self.state["epochs"][task]
        if task not in self._orders or self._orders[task][0] != epoch:
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{task}:{epoch}".encode()))
            self._orders[task] = (epoch, torch.randperm(len(self.examples[task]), generator=g).tolist())
        return self._orders[task][1]

    def _task_choices(self, n: int) -> list[str]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state["draws"])
        probs = torch.tensor([self.weights[k] for k in self.names])
        picks = torch.multinomial(probs, n, replacement=True, generator=g)
        self.state["draws"] += 1
        return [self.names[i] for i in picks.tolist()]

    def _draw(self, n: int) -> list[tuple[str, int]]:
        """The next ``n`` (task, row) references of the mixture."""
        refs = []
        for task in self._task_choices(n):
            order = self._order(task)
            cursor = self.state["cursor"][task]
            refs.append((task, order[cursor]))
            cursor += 1
            if cursor == len(order):
                self.state["epochs"][task] += 1
                cursor = 0
            self.state["cursor"][task] = cursor
        return refs

    def _grouped(self) -> list[list[tuple[str, int]]]:
        """``group`` batches cut from one length-sorted pool, in a seeded random order."""
        draw = self.state["draws"]
        pool = sorted(self._draw(self.batch_size * self.group), key=lambda r: len(self.examples[r[0]][r[1]]["input_ids"]))
        batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        g = torch.Generator().manual_seed(self.seed * 7_919 + draw)
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def next_batch(self) -> list[dict[str, Any]]:
        if self.group == 1:
            refs = self._draw(self.batch_size)
        else:
            if not self.state["pending"]:
                self.state["pending"] = self._grouped()
            refs = self.state["pending"].pop(0)
        return [self.examples[task][row] for task, row in refs]

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.state["draws"],
            "epochs": dict(self.state["epochs"]),
            "cursor": dict(self.state["cursor"]),
            "pending": [[list(r) for r in batch] for batch in self.state["pending"]],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = {
            "draws": int(state["draws"]),
            "epochs": dict(state["epochs"]),
            "cursor": dict(state["cursor"]),
            "pending": [[(str(t), int(i)) for t, i in batch] for batch in state.get("pending", [])],
        }
        self._orders = {}


def collate(batch: Sequence[dict[str, Any]], pad_id: int, length: int | None = None) -> dict[str, Any]:
    """Pad to the longest example (dynamic padding) or to ``length``; keep the task key of
    every row."""
    longest = max(len(x["input_ids"]) for x in batch)
    if length is not None and length < longest:
        raise ValueError(f"cannot pad to {length} tokens: a row has {longest}")
    length = length or longest
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    types = torch.zeros((len(batch), length), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        mask[i, :n] = 1
        if "token_type_ids" in x:
            types[i, :n] = torch.tensor(x["token_type_ids"])
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "tasks": [x["task"] for x in batch], "labels": [x["label"] for x in batch]}
    if any("token_type_ids" in x for x in batch):
        out["token_type_ids"] = types
    return out
