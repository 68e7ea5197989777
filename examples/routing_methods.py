"""Multi-task routing methods from the literature on a tiny model, in a few seconds.

    python examples/routing_methods.py            # about 10 s on one CPU thread
    python examples/routing_methods.py --steps 20 # quicker

A library of four LoRA "experts" (random, on a tiny random Llama) and unseen tasks defined
by teachers (the base model with some composition of those experts). It shows:

  arrow     training-free token routing over the library (prototypes from the experts' SVD)
  lorahub   a CMA-ES search of composition weights from 5 examples, against the uniform sum
  poly      Polytropon/MHR: 4 LoRA skills + a learned task × skill allocation, trained on 3 tasks
            distilled from 3 teachers, with the route giving each row its task

Scores are KL(teacher ‖ model) per sequence on held-out inputs (lower is better).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import adapter_composer as ac
from adapter_composer.plugins import lorahub, poly

EXPERTS = ["e0", "e1", "e2", "e3"]
TARGETS = ["attn.q", "attn.v", "mlp.down"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 128, (n, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def library(g: ac.Graph) -> None:
    for name in EXPERTS:
        g.adapter(name, "lora", r=4, alpha=8, targets=TARGETS)


def load_library(composed) -> None:
    """The experts' weights: the same random factors in every model of this script."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in EXPERTS:
            for _, p in sorted(composed.adapters[name].named_parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.6)


def composed_with(build) -> tuple[LlamaForCausalLM, ac.Composed]:
    model, g = tiny_llama(), ac.Graph()
    library(g)
    build(g)
    composed = ac.compose(model, g)
    load_library(composed)
    return model, composed.eval()


def logits(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).logits


def kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return float(F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"))


def teacher(weights: list[float]) -> LlamaForCausalLM:
    model, _ = composed_with(lambda g: g.op("lorahub", *EXPERTS, weights=weights, name="hub"))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="Poly training steps")
    parser.add_argument("--budget", type=int, default=40, help="LoraHub evaluations (the paper: 40)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # matrices this small only lose time to thread hand-offs
    t0 = time.perf_counter()
    few, held = batch(5, seed=10), batch(24, seed=11)
    target = teacher([0.9, 0.0, -0.6, 0.0])  # the unseen task
    t_few, t_held = logits(target, few), logits(target, held)
    rows = {"base model": kl(logits(tiny_llama(), held), t_held)}

    uniform, _ = composed_with(lambda g: g.sum(*EXPERTS, weights=[0.25] * 4, name="uniform"))
    rows["uniform sum (1/4 each)"] = kl(logits(uniform, held), t_held)

    arrow, arrow_c = composed_with(lambda g: g.op("arrow", *EXPERTS, top_k=2, name="arrow"))
    rows["arrow (top-2, training-free)"] = kl(logits(arrow, held), t_held)
    with arrow_c.record_gates() as gates:
        logits(arrow, held)
    share = gates["arrow@layers.0.attn.q"].mean(dim=(0, 1))
    print("arrow: mean gate per expert at layers.0.attn.q:", [round(float(s), 3) for s in share])

    hub, hub_c = composed_with(lambda g: g.op("lorahub", *EXPERTS, name="hub"))
    found = lorahub.search(hub_c, "hub", lambda: kl(logits(hub, few), t_few), budget=args.budget, seed=0)
    rows[f"lorahub (CMA-ES, {found.evaluations} evaluations, 5 examples)"] = kl(logits(hub, held), t_held)
    print("lorahub: weights", [round(w, 2) for w in found.weights], "(the teacher's: [0.9, 0, -0.6, 0])")

    # Polytropon / MHR: three tasks, each distilled from its own teacher, one shared pool of skills
    teachers = {"t0": teacher([0.9, 0.0, -0.6, 0.0]), "t1": teacher([0.0, 0.8, 0.0, 0.5]), "t2": teacher([0.5, 0.5, 0.5, 0.0])}
    model, g = tiny_llama(), ac.Graph()
    poly.declare(g, "mt", list(teachers), skills=4, n_splits=2, r=4, alpha=8, targets=TARGETS)
    mt = ac.compose(model, g)
    opt = torch.optim.AdamW(mt.parameters(), lr=3e-2)
    train_keys = [t for t in teachers for _ in range(4)]  # a mixed batch: 4 rows per task
    mt.train()
    for step in range(args.steps):
        inputs = batch(len(train_keys), seed=100 + step)
        targets = torch.cat([logits(t, {k: v[4 * i : 4 * i + 4] for k, v in inputs.items()}) for i, t in enumerate(teachers.values())])
        loss = F.kl_div(model(**inputs, route=train_keys).logits.log_softmax(-1), targets.log_softmax(-1), log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, args.steps - 1):
            print(f"poly: step {step:3d} training KL {loss.item():.3f}")
    mt.eval()
    for task, t in teachers.items():
        rows[f"poly, task {task} (trained)"] = kl(logits(model, held, route=[task] * 24), logits(t, held))
    with tempfile.TemporaryDirectory() as d:  # the allocations are saved with the composition
        mt.save(d)
        again = ac.load(tiny_llama(), d)
        same = torch.equal(logits(again.model, held, route=["t1"] * 24), logits(model, held, route=["t1"] * 24))
    print(f"poly: {mt.trainable_parameters().trainable:,} trainable parameters; reload bit-identical: {same}")

    print("\n| setup | KL on held-out inputs |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.4f} |")
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
