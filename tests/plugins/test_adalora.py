"""AdaLoRA: the formula by hand, parity with HF PEFT (outputs, files, one allocation step after
another), the budget schedule, the HF Trainer callback, and clear errors for bad configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from adapter_composer.plugins.adalora import AdaLoraController, budget_at
from adapter_composer.sites import linear_weight
from tests.models import BUILDERS, inputs, output, randomize

TOL = 1e-5


def _record(what: str, value: float) -> None:
    """Print a measured difference (visible with ``pytest -s``)."""
    print(f"{what}: {value:.3g}")


def _compose(arch: str, registry, **config):
    model = BUILDERS[arch]()
    g = Graph()
    g.adapter("a", "adalora", **{"total_step": 10, **config})
    return model, ac.compose(model, g, registry=registry)


# --- the formula, written out ---------------------------------------------------------


def _reference_model(composed, name):
    """A copy of the base model whose site weights are W + α/(r₀ + 1e-5) · P diag(Λ) Q."""
    ref = copy.deepcopy(composed.undo())
    cfg = composed.adapters[name].config
    for key, module in composed.adapters[name].modules.items():
        info = composed._rt.infos[name][key]
        layer = ref.get_submodule(info.path)
        w = linear_weight(layer).detach().clone()
        rows = slice(*info.out_slice) if info.out_slice else slice(None)
        p, lam, q = module.lora_B, module.lora_E.view(-1), module.lora_A
        w[rows] += cfg.alpha / (cfg.init_r + 1e-5) * p @ torch.diag(lam) @ q
        with torch.no_grad():
            layer.weight.copy_(w if isinstance(layer, torch.nn.Linear) else w.T)
    return ref


@pytest.mark.parametrize(
    "arch, targets",
    [
        ("llama", ["attn.q", "attn.k", "attn.v", "mlp.down"]),  # grouped-query k/v: 64 → 32
        ("gpt2", ["attn.q", "attn.v", "mlp.down"]),  # slices of the fused c_attn, Conv1D
        ("bert", ["attn.q", "attn.v"]),
    ],
)
def test_outputs_equal_the_formula(arch, targets, registry):
    pattern = {"attn.v": [True, False, True, False]}  # v sites keep 2 of 4; the scale keeps r₀ = 4
    model, composed = _compose(
        arch, registry, init_r=4, target_r=2, alpha=6, targets=targets, rank_pattern=pattern
    )
    assert {
        m.lora_A.shape[0] for k, m in composed.adapters["a"].modules.items() if "attn.v" in k
    } == {2}
    randomize(composed, std=0.3)
    batch = inputs()
    out = output(model, batch)
    reference = _reference_model(composed, "a")
    diff = (out - output(reference, batch)).abs().max().item()
    _record(f"formula {arch}", diff)
    assert diff <= TOL


def test_identity_at_init_and_merge_equals_unmerged(registry):
    batch = inputs()
    before = output(BUILDERS["llama"](), batch)
    model, composed = _compose(
        "llama", registry, init_r=4, target_r=2, targets=["attn.q", "mlp.up"]
    )
    assert all(
        torch.equal(m.lora_E, torch.zeros_like(m.lora_E))
        for m in composed.adapters["a"].modules.values()
    )
    torch.testing.assert_close(output(model, batch), before, rtol=0, atol=0)

    randomize(composed, std=0.3)
    unmerged = output(model, batch)
    assert not torch.allclose(unmerged, before, atol=1e-3)
    composed.merge()
    diff = (output(model, batch) - unmerged).abs().max().item()
    _record("merge vs unmerged", diff)
    assert diff <= TOL
    composed.unmerge()
    assert torch.equal(output(model, batch), unmerged)


# --- parity with PEFT: outputs and files ----------------------------------------------

PEFT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value"],
}


def _peft_model(arch: str, targets: list[str], seed: int = 11, **config):
    """A PEFT AdaLoRA model whose Λ and P are random (not the identity)."""
    torch.manual_seed(seed)
    settings = {"init_r": 4, "target_r": 2, "lora_alpha": 6, "total_step": 10, **config}
    model = get_peft_model(BUILDERS[arch](), AdaLoraConfig(target_modules=targets, **settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name or "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("arch", sorted(PEFT_TARGETS))
def test_peft_parity_both_directions(arch, registry, tmp_path):
    batch = inputs()
    peft_model = _peft_model(arch, PEFT_TARGETS[arch]).eval()
    reference = output(peft_model, batch)
    assert not torch.allclose(reference, output(BUILDERS[arch](), batch), atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")

    model = BUILDERS[arch]()
    composed = ac.from_peft(model, tmp_path / "peft", name="task", registry=registry)
    config = composed.adapters["task"].config
    assert (config.init_r, config.target_r, config.alpha, config.total_step) == (4, 2, 6.0, 10)
    diff = (output(model, batch) - reference).abs().max().item()
    _record(f"peft -> ours {arch}", diff)
    assert diff <= TOL

    composed.to_peft("task", tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "ADALORA" and exported["init_r"] == 4
    back = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "export").eval()
    diff = (output(back, batch) - reference).abs().max().item()
    _record(f"ours -> peft {arch}", diff)
    assert diff <= TOL


def test_peft_rank_pattern_is_applied_on_import_and_kept_on_export(registry, tmp_path):
    """PEFT saves only the singular values an allocation kept, and their masks as rank_pattern;
    the import builds each site with the kept rank (scaled by init_r still), zero included."""
    batch = inputs()
    peft_model = _peft_model("llama", ["q_proj", "v_proj"]).eval()
    masks = {
        "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True],
        "model.layers.0.self_attn.v_proj.lora_E": [False, True, False, False],
        "model.layers.1.self_attn.q_proj.lora_E": [False, False, False, False],
        "model.layers.1.self_attn.v_proj.lora_E": [True, True, True, True],
    }
    with torch.no_grad():  # what an allocation leaves: the masked singular values are zero
        for name, p in peft_model.named_parameters():
            key = name.removeprefix("base_model.model.").removesuffix(".default")
            if key in masks:
                p.mul_(torch.tensor(masks[key]).view(-1, 1))
    reference = output(peft_model, batch)
    peft_model.peft_config["default"].rank_pattern = {f"{k}.default": v for k, v in masks.items()}
    peft_model.save_pretrained(tmp_path / "peft")

    model = BUILDERS["llama"]()
    composed = ac.from_peft(model, tmp_path / "peft", registry=registry)
    modules = composed.adapters["default"].modules
    for key, mask in masks.items():
        module = modules["module." + key.removesuffix(".lora_E")]
        assert module.lora_A.shape[0] == module.lora_B.shape[1] == sum(mask)
        assert module.ranknum == 4
    diff = (output(model, batch) - reference).abs().max().item()
    _record("peft rank_pattern -> ours", diff)
    assert diff <= TOL

    composed.to_peft("default", tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert exported["rank_pattern"] == masks
    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "export").eval()
    diff = (output(back, batch) - reference).abs().max().item()
    _record("ours rank_pattern -> peft", diff)
    assert diff <= TOL


def test_peft_import_refusals_say_what(registry, tmp_path):
    peft_model = _peft_model("llama", ["q_proj"])
    peft_model.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(path.read_text())
    model = BUILDERS["llama"]()

    path.write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))  # without its tensors
    with pytest.raises(ac.AdapterFileError, match="modules_to_save names \\['lm_head'\\].*no tensors"):
        ac.from_peft(model, tmp_path / "p", registry=registry)

    bad = {"model.layers.0.self_attn.q_proj.lora_E": [True, False]}  # init_r is 4
    path.write_text(json.dumps({**config, "rank_pattern": bad}))
    with pytest.raises(CompositionError, match="rank_pattern masks must have init_r") as err:
        ac.from_peft(model, tmp_path / "p", registry=registry)
    assert "bad-config" in err.value.codes


# --- the orthogonal regulariser and the allocation, step by step against PEFT ---------

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8}


def _peft_factors(peft_model):
    """{(module path, factor): parameter} of a PEFT AdaLoRA model."""
    out = {}
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            body = name.removeprefix("base_model.model.").removesuffix(".default")
            path, factor = body.rsplit(".", 1)
            out[path, factor] = p
    return out


def test_regularization_is_pefts_and_the_formula(registry, tmp_path):
    peft_model = _peft_model("llama", ["q_proj", "v_proj"], orth_reg_weight=0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    model = BUILDERS["llama"]()
    composed = ac.from_peft(model, tmp_path / "peft", registry=registry)
    controller = AdaLoraController(composed, "default")
    norms = []
    for m in composed.adapters["default"].modules.values():
        p, q = m.lora_B.detach(), m.lora_A.detach()
        norms += [(p.T @ p - torch.eye(4)).norm(), (q @ q.T - torch.eye(4)).norm()]
    assert torch.isclose(controller.regularization(), 0.3 * sum(norms) / len(norms), rtol=1e-6)

    batch = inputs()
    with torch.no_grad():
        peft_loss = peft_model.base_model(**batch, labels=batch["input_ids"]).loss  # adds the term
        ours = model(**batch, labels=batch["input_ids"]).loss + controller.regularization()
    _record("loss with regulariser vs peft", (ours - peft_loss).abs().item())
    assert (ours - peft_loss).abs() <= TOL


def test_allocation_matches_peft_step_by_step(registry, tmp_path):
    """Same weights, same gradients (checked, then PEFT's are copied so both allocators read
    identical numbers), then PEFT's update_and_allocate(t) and our step(t) at every step of
    the schedule: the budgets, the masks and every weight stay identical."""
    peft_model = _peft_model(
        "llama", ["q_proj", "v_proj", "down_proj"], beta1=0.8, beta2=0.9, **SCHEDULE
    )
    peft_model.save_pretrained(tmp_path / "peft")
    model = BUILDERS["llama"]()
    composed = ac.from_peft(model, tmp_path / "peft", registry=registry)
    controller = AdaLoraController(composed, "default")
    theirs = _peft_factors(peft_model)
    ours = {
        (m.path, f): getattr(m, f)
        for m in composed.adapters["default"].modules.values()
        for f in ("lora_A", "lora_E", "lora_B")
    }
    assert theirs.keys() == ours.keys()
    allocator = peft_model.base_model.rankallocator
    opt_theirs = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    opt_ours = torch.optim.SGD(composed.parameters(), lr=0.05)
    peft_model.train()
    composed.train()
    for step in range(SCHEDULE["total_step"] + 2):
        batch = inputs(batch=2, length=8, seed=step)
        peft_model.base_model(**batch, labels=batch["input_ids"]).loss.backward()
        (model(**batch, labels=batch["input_ids"]).loss + controller.regularization()).backward()
        grad_diff = max((theirs[k].grad - ours[k].grad).abs().max().item() for k in ours)
        _record("gradient vs peft", grad_diff)
        assert grad_diff <= TOL
        for k in ours:
            ours[k].grad.copy_(theirs[k].grad)
        opt_theirs.step()
        opt_ours.step()
        expected_budget = allocator.budget_schedule(step)[0]
        peft_model.base_model.update_and_allocate(step)
        assert controller.step(step) == expected_budget
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
        assert all(torch.equal(theirs[k], ours[k]) for k in ours), (
            f"weights differ after step {step}"
        )
        pattern = peft_model.peft_config["default"].rank_pattern
        if pattern is not None:
            assert controller.rank_pattern() == {
                k.removesuffix(".default"): v for k, v in pattern.items()
            }
    ranks = controller.final_ranks()
    assert sum(ranks.values()) == controller.target_budget == 2 * len(ranks)
    assert len(set(ranks.values())) > 1, "the allocation should move rank between sites"
    for key, module in composed.adapters["default"].modules.items():
        assert int((module.lora_E != 0).sum()) == ranks[key]


# --- the schedule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "tinit, tfinal, total, delta",
    [(0, 0, 20, 1), (3, 4, 20, 2), (5, 0, 12, 3), (2, 9, 12, 1)],
)
def test_budget_follows_the_cubic_schedule(tinit, tfinal, total, delta, registry):
    model, composed = _compose(
        "llama",
        registry,
        init_r=6,
        target_r=2,
        tinit=tinit,
        tfinal=tfinal,
        total_step=total,
        deltaT=delta,
        targets=["attn.q", "attn.v", "mlp.up"],
    )
    controller = AdaLoraController(composed, "a")
    sites = len(composed.adapters["a"].modules)
    b0, bt = 6 * sites, 2 * sites
    assert (controller.initial_budget, controller.target_budget) == (b0, bt)
    for t in range(total + 3):
        if t <= tinit:
            expected = (b0, False)
        elif t > total - tfinal:
            expected = (bt, True)
        else:
            cubic = (b0 - bt) * (1 - (t - tinit) / (total - tfinal - tinit)) ** 3 + bt
            expected = (int(cubic), t % delta == 0)
        assert controller.budget(t) == expected == budget_at(t, controller.config, b0, bt)
    middle = [controller.budget(t)[0] for t in range(tinit, total - tfinal + 1)]
    assert middle == sorted(middle, reverse=True) and middle[0] == b0 and middle[-1] == bt


def test_trainer_callback_allocates_on_schedule(registry, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    total, tinit, tfinal, delta = 10, 2, 3, 2
    model, composed = _compose(
        "llama",
        registry,
        init_r=4,
        target_r=2,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta,
        total_step=total,
        orth_reg_weight=0.5,
        targets=["attn.q", "attn.v"],
    )
    controller = AdaLoraController(composed, "a")
    hooks = dict(model._forward_hooks)  # the composition's own
    row = inputs(batch=1, length=12, seed=4)["input_ids"][0].tolist()
    data = Dataset.from_dict({"input_ids": [row] * 16, "labels": [row] * 16})  # every batch alike
    with torch.no_grad():  # the first logged loss: the base model's (Λ = 0) plus the regulariser
        first = model(input_ids=torch.tensor([row]), labels=torch.tensor([row])).loss
        first = first + controller.regularization()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=total,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[controller.as_trainer_callback()]
    )
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(first.item(), abs=1e-4)
    assert dict(model._forward_hooks) == hooks, "the regulariser's hook outlived training"
    history = controller.history
    assert [a.step for a in history] == list(range(total))
    b0, bt = controller.initial_budget, controller.target_budget
    for a in history:
        cubic = (b0 - bt) * (1 - (a.step - tinit) / (total - tfinal - tinit)) ** 3 + bt
        expected = b0 if a.step <= tinit else bt if a.step >= total - tfinal else int(cubic)
        assert a.budget == expected
        assert a.masked == (
            tinit < a.step < total - tfinal and a.step % delta == 0 or a.step == total - tfinal
        )
        if a.masked:
            assert a.kept == a.budget
    assert [a.kept for a in history if a.masked] == sorted(
        (a.kept for a in history if a.masked), reverse=True
    )
    ranks = controller.final_ranks()
    assert sum(ranks.values()) == bt
    for key, module in composed.adapters["a"].modules.items():
        assert int((module.lora_E != 0).sum()) == ranks[key]


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, words",
    [
        ({"tinit": 6, "tfinal": 4, "total_step": 10}, ["tinit + tfinal", "total_step"]),
        ({"tinit": 0, "tfinal": 12, "total_step": 10}, ["tinit + tfinal", "total_step"]),
        ({"init_r": 4, "target_r": 6}, ["target_r", "init_r"]),
        ({"total_step": None}, ["total_step"]),
    ],
)
def test_bad_config_is_a_clear_composition_error(config, words, registry):
    model = BUILDERS["llama"]()
    g = Graph()
    g.adapter("a", "adalora", targets=["attn.q"], **{"total_step": 10, **config})
    with pytest.raises(CompositionError) as err:
        ac.compose(model, g, registry=registry)
    assert err.value.codes == ["bad-config"]
    message = str(err.value)
    assert all(w in message for w in words), message


def test_controller_misuse_is_explained(registry):
    model, composed = _compose("llama", registry, init_r=2, target_r=1, targets=["attn.q"])
    controller = AdaLoraController(composed, "a")
    with pytest.raises(
        RuntimeError, match=r"after loss.backward\(\) and before optimizer.zero_grad"
    ):
        controller.step(0)
    with pytest.raises(KeyError, match="no adapter 'b'"):
        AdaLoraController(composed, "b")
    composed.undo()
    g = Graph()
    g.adapter("l", "lora", targets=["attn.q"])
    lora = ac.compose(BUILDERS["llama"](), g, registry=registry)
    with pytest.raises(ValueError, match="uses method 'lora'"):
        AdaLoraController(lora, "l")
