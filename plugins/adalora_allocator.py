"""AdaLoRA's rank allocation (Zhang et al. 2023, §3.2–3.3), computed as PEFT's ``RankAllocator``.

Importance of every entry w of P (``lora_B``), Λ (``lora_E``) and Q (``lora_A``), updated
after each backward pass while the budget can still change:

    I(w) = |w · ∂L/∂w|                          sensitivity
    Ī   ← β₁ Ī + (1 − β₁) I                     smoothed sensitivity
    Ū   ← β₂ Ū + (1 − β₂) |I − Ī|               uncertainty
    s(w) = Ī · Ū

Score of triplet i of a site (singular value Λᵢ, column Pᵢ of P, row Qᵢ of Q):

    Sᵢ = s(Λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji)

Budget (total rank over all sites) at step t, with b₀ the sum of the initial ranks,
b_T = target_r · (number of sites), T = total_step:

    b(t) = b₀                                                        t ≤ tinit
    b(t) = ⌊(b₀ − b_T) (1 − (t − tinit) / (T − tfinal − tinit))³ + b_T⌋   tinit < t < T − tfinal
    b(t) = b_T                                                       t ≥ T − tfinal

Every ``deltaT`` steps between tinit and T − tfinal, the singular values scoring at most
the (b₀ − b(t))-th smallest score are set to zero; at t = T − tfinal the final mask is
computed, and it is re-applied after every later step. As in PEFT, masked entries may
come back to life through the optimizer until the next allocation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ComposerError

__all__ = ["AdaLoraController", "Allocation", "budget_at"]

FACTORS = ("lora_A", "lora_E", "lora_B")


def budget_at(step: int, config: Any, initial: int, target: int) -> tuple[int, bool]:
    """(budget b(step), whether masks are recomputed at this step) for the cubic schedule."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return initial, False
    if step > total - tfinal:
        return target, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((initial - target) * remaining**3 + target), step % config.deltaT == 0


@dataclass(frozen=True)
class Allocation:
    """What one call of :meth:`AdaLoraController.step` did."""

    step: int
    budget: int  # the budget b(step) in force
    masked: bool  # the masks were recomputed from the importance scores at this step
    kept: int  # total rank kept by the masks after this step (Σ over sites)


class AdaLoraController:
    """Drives one AdaLoRA adapter of a composition through training.

    In a plain loop::

        controller = AdaLoraController(composed, adapter="task")
        for step, batch in enumerate(batches):
            loss = model(**batch).loss + controller.regularization()
            loss.backward()
            optimizer.step()
            controller.step(step)        # after backward, before zero_grad
            optimizer.zero_grad()

    With the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[controller.as_trainer_callback()])``.
    """

    def __init__(self, composed: Any, adapter: str = "default"):
        if adapter not in composed.adapters:
            raise KeyError(f"no adapter {adapter!r}; adapters: {sorted(composed.adapters)}")
        handle = composed.adapters[adapter]
        if handle.method != "adalora":
            raise ValueError(
                f"adapter {adapter!r} uses method {handle.method!r}; AdaLoraController drives 'adalora' adapters"
            )
        self.adapter = adapter
        self.config = handle.config
        self.modules: dict[str, nn.Module] = dict(sorted(handle.modules.items()))
        self.initial_budget = sum(m.lora_E.shape[0] for m in self.modules.values())
        self.target_budget = self.config.target_r * len(self.modules)
        self.masks = {
            k: torch.ones(m.lora_E.shape[0], dtype=torch.bool, device=m.lora_E.device)
            for k, m in self.modules.items()
        }
        self.history: list[Allocation] = []
        self.reset_importance()

    # --- the orthogonal regulariser ----------------------------------------------------

    def regularization(self) -> torch.Tensor:
        """orth_reg_weight · R, the term to add to the loss, with R computed as PEFT does:

            R = 1/(2n) Σ_sites ( ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F )      (n sites)

        The paper writes squared norms; PEFT (whose training we match) averages plain norms.
        """
        norms = []
        for module in self.modules.values():
            q, p = module.lora_A, module.lora_B
            for cov in (q @ q.T, p.T @ p):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                norms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        return self.config.orth_reg_weight * torch.stack(norms).mean()

    # --- importance scores -------------------------------------------------------------

    def reset_importance(self) -> None:
        self._sensitivity: dict[tuple[str, str], torch.Tensor] = {}
        self._uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, module in self.modules.items():
            for name in FACTORS:
                p = getattr(module, name)
                if p.grad is None:
                    raise RuntimeError(
                        f"AdaLoRA adapter {self.adapter!r}: {key}.{name} has no gradient; call "
                        "controller.step(step) after loss.backward() and before optimizer.zero_grad()"
                    )
                ipt = (p * p.grad).abs().detach()
                avg = self._sensitivity.get((key, name), torch.zeros_like(p))
                unc = self._uncertainty.get((key, name), torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self._sensitivity[key, name] = avg
                self._uncertainty[key, name] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """Sᵢ per site key, one score per singular value ([r])."""
        if not self._sensitivity:
            raise RuntimeError(
                f"AdaLoRA adapter {self.adapter!r} has no importance scores yet: call "
                "controller.step(step) at every training step from the first one"
            )
        out = {}
        for key in self.modules:
            s = {n: self._sensitivity[key, n] * self._uncertainty[key, n] for n in FACTORS}
            out[key] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return out

    # --- masks -------------------------------------------------------------------------

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        """Keep the ``budget`` best-scoring singular values over all sites; zero the others."""
        drop = self.initial_budget - budget
        if drop <= 0:
            self.masks = {k: torch.ones_like(m) for k, m in self.masks.items()}
            return
        scores = self.scores()
        device = next(iter(scores.values())).device
        threshold = torch.kthvalue(torch.cat([s.to(device) for s in scores.values()]), k=drop)
        for key, score in scores.items():
            self.masks[key] = score > threshold.values.item()
        self._apply_masks()

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for key, module in self.modules.items():
            module.lora_E.masked_fill_(~self.masks[key].view(-1, 1), 0.0)

    # --- the schedule ------------------------------------------------------------------

    def budget(self, step: int) -> tuple[int, bool]:
        """(b(step), whether masks are recomputed at ``step``): see :func:`budget_at`."""
        return budget_at(step, self.config, self.initial_budget, self.target_budget)

    def step(self, global_step: int) -> int:
        """Update the importance scores and, when the schedule says so, the masks (PEFT's
        ``update_and_allocate``). Call after backward, before zero_grad. Returns the budget."""
        final = self.config.total_step - self.config.tfinal
        budget, masked = self.budget(global_step)
        if global_step < final:
            self._update_importance()
            if masked:
                self._mask_to(budget)
        elif global_step == final:
            budget, masked = self.target_budget, True
            self._mask_to(budget)
            self.reset_importance()
        else:
            masked = False
            self._apply_masks()
        kept = sum(int(m.sum()) for m in self.masks.values())
        self.history.append(Allocation(global_step, budget, masked, kept))
        return budget

    def final_ranks(self) -> dict[str, int]:
        """{site key: rank kept by the latest allocation} (the initial ranks before the first)."""
        return {k: int(m.sum()) for k, m in self.masks.items()}

    def rank_pattern(self) -> dict[str, list[bool]]:
        """The masks as PEFT's ``rank_pattern``: ``{"<module path>.lora_E": [kept, ...]}``."""
        return {f"{self.modules[k].path}.lora_E": m.tolist() for k, m in self.masks.items()}

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The controller's state as named tensors (masks, importance EMAs, allocation history),
        saved with ``train()``'s checkpoints so a resumed run continues its estimates."""
        out: dict[str, torch.Tensor] = {f"mask/{k}": m.detach().cpu() for k, m in self.masks.items()}
        for (key, name), t in self._sensitivity.items():
            out[f"sensitivity/{key}/{name}"] = t.detach().cpu()
        for (key, name), t in self._uncertainty.items():
            out[f"uncertainty/{key}/{name}"] = t.detach().cpu()
        rows = [[a.step, a.budget, int(a.masked), a.kept] for a in self.history]
        out["history"] = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        return out

    def load_checkpoint_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`checkpoint_state`; refuses state of other sites or shapes."""
        masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask/")}
        if set(masks) != set(self.masks) or any(masks[k].shape != self.masks[k].shape for k in masks):
            raise ComposerError(
                f"AdaLoRA adapter {self.adapter!r}: the checkpoint's controller state is for other sites "
                f"({sorted(masks)[:3]}...) than this composition's ({sorted(self.masks)[:3]}...); resume "
                "with the composition and controller the checkpoint was written with"
            )
        estimates: dict[str, dict[tuple[str, str], torch.Tensor]] = {"sensitivity": {}, "uncertainty": {}}
        for name, value in tensors.items():
            kind, _, rest = name.partition("/")
            if kind in estimates:
                key, _, factor = rest.rpartition("/")
                if key not in self.modules or factor not in FACTORS:
                    raise ComposerError(f"AdaLoRA adapter {self.adapter!r}: unknown controller state {name!r} in the checkpoint")
                param = getattr(self.modules[key], factor)
                if value.shape != param.shape:
                    raise ComposerError(f"AdaLoRA adapter {self.adapter!r}: {name} has shape {tuple(value.shape)}, not {tuple(param.shape)}")
                estimates[kind][key, factor] = value.to(param.device, param.dtype)
        self.masks = {k: masks[k].to(self.masks[k].device, torch.bool) for k in self.masks}
        self._sensitivity, self._uncertainty = estimates["sensitivity"], estimates["uncertainty"]
        history = tensors.get("history", torch.zeros(0, 4, dtype=torch.int64))
        self.history = [Allocation(int(s), int(b), bool(m), int(k)) for s, b, m, k in history.tolist()]

    # --- adapter_composer.workflow.training.train callbacks ---------------------------------------------

    def extra_loss(self, step: int) -> torch.Tensor:
        """The orthogonality term, added to the loss by ``adapter_composer.workflow.training.train``."""
        return self.regularization()

    def after_backward(self, step: int) -> None:
        """The budget step, after backward and before the optimizer's zero_grad."""
        self.step(step)

    # --- Hugging Face Trainer ----------------------------------------------------------

    def _add_regularization(self, module: nn.Module, args: Any, output: Any) -> Any:
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if module.training and isinstance(loss, torch.Tensor):
            output["loss"] = loss + self.regularization().to(loss.dtype)
        return output

    def as_trainer_callback(self, regularize: bool = True) -> Any:
        """A ``transformers.TrainerCallback`` running :meth:`step` after every optimizer step
        (with ``state.global_step``, before zero_grad) and, with ``regularize``, adding
        :meth:`regularization` to the model's training loss through a forward hook that is
        removed when training ends."""
        from transformers import TrainerCallback

        controller = self

        class AdaLoraCallback(TrainerCallback):
            def __init__(self) -> None:
                self.hook: Any = None

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if regularize and model is not None and self.hook is None:
                    self.hook = model.register_forward_hook(controller._add_regularization)

            def on_optimizer_step(self, args, state, control, **kwargs):
                controller.step(state.global_step)

            def on_train_end(self, args, state, control, **kwargs):
                if self.hook is not None:
                    self.hook.remove()
                    self.hook = None

        return AdaLoraCallback()
