"""Concurrent calls on one composed model: threads and asyncio tasks never see each other's
routing keys, gates, balancing losses or memos; activation checkpointing recomputes a layer
in the state of the call that ran it.

Every check compares each concurrent output with the same call made alone (bounded loops on
tiny models: a few threads × a few dozen calls).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest
import torch

import adapter_composer as ac
from adapter_composer import Graph
from adapter_composer.runtime.state import StatefulCheckpoint
from tests.models import inputs, randomize, tiny_bert, tiny_llama

THREADS = 4
CALLS = 25


def _routed(registry):
    """A route over a LoRA, a DoRA LoRA (grouped path) and a stack of LoRA and IA3."""
    model = tiny_llama()
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q", "attn.v", "mlp.down"])
    g.adapter("b", "lora", r=2, dora=True, targets=["attn.q", "mlp.down"])
    g.adapter("c", "lora", r=3, targets=["attn.v"])
    g.adapter("s", "ia3", targets=["attn.v", "mlp.down"])
    g.route({"ka": "a", "kb": "b", "kc": g.stack("c", "s")}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


def _jobs(n: int):
    keys = [["ka", "kb", None], ["kc", "ka", "kb"], ["kb", "kb", "kc"], [None, "kc", "ka"], ["ka", "ka", "ka"]]
    return [(inputs(batch=3, length=7, seed=10 + j), keys[j % len(keys)]) for j in range(n)]


def _run_threads(target, n: int) -> None:
    """Run target(j) for j < n in n threads started together; re-raise the first error."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(j: int) -> None:
        try:
            barrier.wait()
            target(j)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("how", ["keyword", "context"])
def test_threads_get_their_own_routing(registry, how):
    model, composed = _routed(registry)
    jobs = _jobs(THREADS)
    with torch.no_grad():
        reference = [model(**batch, route=keys).logits for batch, keys in jobs]
    wrong = [0] * THREADS

    def work(j: int) -> None:
        batch, keys = jobs[j]
        for _ in range(CALLS):
            with torch.no_grad():
                if how == "keyword":
                    out = model(**batch, route=keys).logits
                else:
                    with composed.routing(keys):
                        out = model(**batch).logits
            wrong[j] += not torch.equal(out, reference[j])

    _run_threads(work, THREADS)
    assert wrong == [0] * THREADS, f"outputs that differ from the same call made alone, per thread: {wrong}"


def test_asyncio_tasks_get_their_own_routing(registry):
    """Tasks interleave at awaits (a routing context entered, then a yield, then the call) and
    run calls in worker threads (asyncio.to_thread copies the task's context)."""
    model, composed = _routed(registry)
    jobs = _jobs(THREADS)
    with torch.no_grad():
        reference = [model(**batch, route=keys).logits for batch, keys in jobs]

    def forward(batch):
        with torch.no_grad():
            return model(**batch).logits

    async def task(j: int) -> int:
        batch, keys = jobs[j]
        wrong = 0
        for i in range(CALLS // 2):
            with composed.routing(keys):
                await asyncio.sleep(0)  # let the other tasks enter their routing contexts
                out = await asyncio.to_thread(forward, batch) if i % 2 else forward(batch)
            wrong += not torch.equal(out, reference[j])
        return wrong

    async def main() -> list[int]:
        return list(await asyncio.gather(*(task(j) for j in range(THREADS))))

    assert asyncio.run(main()) == [0] * THREADS


def test_generate_from_threads(registry):
    model, composed = _routed(registry)
    jobs = [(inputs(batch=3, length=5, seed=30 + j)["input_ids"], keys) for j, (_, keys) in enumerate(_jobs(3))]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = [model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), route=keys, **kwargs) for ids, keys in jobs]
    wrong = [0] * len(jobs)

    def work(j: int) -> None:
        ids, keys = jobs[j]
        for i in range(4):
            if i % 2:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), route=keys, **kwargs)
            else:
                with composed.routing(keys):
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            wrong[j] += not torch.equal(out, reference[j])

    _run_threads(work, len(jobs))
    assert wrong == [0] * len(jobs)


def test_sublayer_inputs_do_not_cross_threads(registry):
    """BERT's sublayer sites read their input from another module (a capture hook): that input
    belongs to the call, not to the site."""
    model = tiny_bert()
    g = Graph()
    for name in ("p", "q"):
        g.adapter(name, "bottleneck", style="parallel", bottleneck=8, targets=["attn", "mlp"])
    g.route({"kp": "p", "kq": "q"})
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    jobs = [(inputs(batch=2, length=6, seed=40 + j), [["kp", "kq"], ["kq", None], ["kp", "kp"]][j]) for j in range(3)]
    with torch.no_grad():
        reference = [model(**batch, route=keys).last_hidden_state for batch, keys in jobs]
    wrong = [0] * len(jobs)

    def work(j: int) -> None:
        batch, keys = jobs[j]
        for _ in range(CALLS):
            with torch.no_grad():
                out = model(**batch, route=keys).last_hidden_state
            wrong[j] += not torch.equal(out, reference[j])

    _run_threads(work, len(jobs))
    assert wrong == [0] * len(jobs)


def _mixed(registry, **options):
    model = tiny_llama()
    g = Graph()
    for i in range(3):
        g.adapter(f"e{i}", "lora", r=2, targets=["attn.q", "mlp.down"])
    g.mix("e0", "e1", "e2", name="experts", **options)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.5)
    return model, composed


def test_recorded_gates_and_aux_loss_belong_to_the_thread(registry):
    model, composed = _mixed(registry, top_k=2)
    batches = [inputs(batch=2, length=6, seed=50 + j) for j in range(THREADS)]
    reference = []
    for batch in batches:
        with composed.record_gates() as gates, torch.no_grad():
            model(**batch)
        reference.append(({k: v.clone() for k, v in gates.items()}, composed.aux_loss()))
    wrong = [0] * THREADS

    def work(j: int) -> None:
        for _ in range(CALLS):
            if j % 2 == 0:  # these threads record; the others only call
                with composed.record_gates() as gates, torch.no_grad():
                    model(**batches[j])
                same = gates.keys() == reference[j][0].keys() and all(torch.equal(gates[k], reference[j][0][k]) for k in gates)
                wrong[j] += not same
            else:
                with torch.no_grad():
                    model(**batches[j])
            wrong[j] += not torch.equal(composed.aux_loss(), reference[j][1])

    _run_threads(work, THREADS)
    assert wrong == [0] * THREADS


def _grads(composed) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in composed.parameters()]


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_backward_recomputes_in_its_calls_state(registry, reentrant):
    """A later call (another route) between forward and backward, and a backward run where no
    call state is current (CUDA runs backward on its own threads), give the same gradients."""
    batch = inputs(batch=3, length=8)
    keys, other = ["kb", "ka", "kc"], ["ka", None, "ka"]
    model, composed = _routed(registry)
    composed.train()
    model(**batch, labels=batch["input_ids"], route=keys).loss.backward()
    expected = _grads(composed)

    for backward_in in ("later call", "empty context"):
        model, composed = _routed(registry)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        composed.train()
        if reentrant:
            model.enable_input_require_grads()
        loss = model(**batch, labels=batch["input_ids"], route=keys).loss
        if backward_in == "later call":
            with torch.no_grad():
                model(**inputs(batch=3, length=8, seed=9), route=other)
            loss.backward()
        else:
            contextvars.Context().run(loss.backward)
        for got, want in zip(_grads(composed), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        composed.undo()
        funcs = [getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()]
        assert all(not isinstance(f, StatefulCheckpoint) for f in funcs)  # undo put the originals back
