"""adapter-composer demo: declare → validate → plan → apply → train → merge → save/load → PEFT.

Runs offline on a tiny random Llama built from a config, in a few seconds on a CPU:

    python examples/demo.py          # from a source checkout
    adapter-composer demo            # from any install
    python -m adapter_composer.demo
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adapter_composer as ac


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def toy_batches(seed: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """A task with structure to learn: each sequence counts upwards from a random start."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 200, (8, 1), generator=g)
        ids = (start + torch.arange(24)) % 256
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def main(steps: int, workdir: Path) -> None:
    t0 = time.perf_counter()
    model = tiny_llama()
    batches = toy_batches(0)

    # 1. Declare a composition: a LoRA on attention and a DoRA on the MLP, summed with weights.
    g = ac.Graph()
    g.adapter("attn_lora", "lora", r=8, alpha=16, targets=["attn.q", "attn.k", "attn.v", "attn.o"])
    g.adapter("mlp_dora", "lora", r=4, alpha=8, dora=True, targets=["mlp.up", "mlp.down"])
    g.sum("attn_lora", "mlp_dora", weights=[1.0, 0.5])
    print("Graph:\n" + g.tree() + "\n")

    # 2. Validation reports every problem at once, before the model is touched.
    bad = g.copy()
    bad.adapter("typo", "lorra")
    bad.adapter("oops", "lora", r=0, targets=["attn.q"])
    bad.adapter("where", "lora", targets=["attn.qq"])
    try:
        ac.compose(model, bad)
    except ac.CompositionError as err:
        print(f"A broken graph is refused with {len(err.diagnostics)} diagnostics:")
        print("  " + "\n  ".join(f"[{d.code}] {d.message}" for d in err.diagnostics) + "\n")

    # 3. Plan (pure) and apply (in place, reversible).
    composed = ac.compose(model, g)
    print(composed.plan.explain().split("\n\nAdapters")[0].splitlines()[0])
    print("\n".join(composed.plan.explain().splitlines()[1:6]) + "\n  ...\n")
    print(composed.trainable_parameters(), "\n")

    # 4. Train the adapters only.
    opt = torch.optim.AdamW(composed.param_groups(lr=1e-2))
    composed.train()
    first = None
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    composed.eval()

    # 5. Merge exactly, save, reload onto a fresh model, export to PEFT's format.
    probe = batches[0]
    with torch.no_grad():
        out = model(**probe).logits
        composed.merge()
        merged = model(**probe).logits
        composed.unmerge()
    print(f"\nmerged vs unmerged: max |Δ| = {(merged - out).abs().max():.2e}")
    saved = composed.save(workdir / "composition")
    fresh = tiny_llama()
    loaded = ac.load(fresh, saved)
    with torch.no_grad():
        same = torch.equal(fresh(**probe).logits, out)
    print(
        f"saved to {saved} ({', '.join(sorted(p.name for p in saved.iterdir()))}); reload bit-identical: {same}"
    )
    loaded.undo()
    composed.undo()
    print(
        f"undo() restored the original model; done in {time.perf_counter() - t0:.1f} s (loss {first:.3f} → {loss.item():.3f})"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``python -m adapter_composer.demo`` and the CLI)."""
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to save (default: a temporary directory)"
    )


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapter-composer demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_with(parser.parse_args(argv))


def run_with(args: argparse.Namespace) -> int:
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(args.steps, Path(tmp))
    else:
        main(args.steps, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
