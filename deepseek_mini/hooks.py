"""Training hooks: the seams of the training loop, and DeepSeekMoE's load balancing, the first feature in them.

``deepseek_mini.train`` runs the same plain step for every model; what a feature adds to a
step it adds through a ``TrainHook``, never through an ``if is_moe`` branch in the loop. One
step, with the seams marked::

    x, y = sampler.next_batch()
    output = model(x, return_aux=True)            # (logits (B, T, V), aux): aux["routing"] per MoE layer
    loss = cross_entropy(output[0], y)
    loss += sum(hook.extra_loss(model, (x, y), output, step))      # MoE balance loss; MTP loss (ch. 04)
    loss.backward()
    hook.after_backward(model, step)              # gradient sync across data-parallel ranks (ch. 06)
    clip_grad_norm_(...); optimizer.step()
    hook.after_optimizer_step(model, step)        # MoE bias update; FP8 scale bookkeeping (ch. 05)
    record |= hook.metrics(model, step)           # MaxVio; per-depth MTP losses; ...

The extra losses are logged under their names (``history`` and ``metrics.jsonl``), as are the
metrics; a key may come from one hook only, and a hook returns the same keys at every step.
A hook whose state must survive a resume (an FP8 amax history, say) returns it from
``state_dict`` (tensors and plain Python values only: checkpoints load with
``weights_only=True``); the checkpoint stores it under the hook's ``name``.

``MoEBalancing`` is DeepSeek-V3's load-balancing recipe (arXiv 2412.19437 §2.1.2): the
auxiliary-loss-free bias update after each optimizer step, from the whole step's load, plus
an optional balance loss (the complementary sequence-wise loss, eqs. 17-20, or the
conventional batch-wise auxiliary loss). It does nothing on a model without MoE layers, so
``default_hooks`` can always include it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepseek_mini.moe import balance_loss, max_violation, moe_layers, update_bias

__all__ = ["TrainHook", "MoEBalancing", "BALANCE_LOSSES"]

BALANCE_LOSSES = ("sequence", "batch", "none")


class TrainHook:
    """A feature of the training loop. Every method is optional: the defaults do nothing.

    ``step`` is the number of the step being taken, counted from 1; all calls of one step
    get the same number. ``model`` is the eager module (also when training runs through
    ``torch.compile``): hooks read and change its parameters and buffers.
    """

    name: str = "hook"                     # unique within a run: keys the hook's state in checkpoints
    progress_keys: tuple[str, ...] = ()    # metrics shown on the progress bar

    def extra_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], output: Any,
                   step: int) -> dict[str, torch.Tensor]:
        """Scalar losses added to the language-modelling loss, by name (each is also logged).

        ``output`` is this forward pass's ``(logits, aux)`` (``Transformer.forward`` with
        ``return_aux=True``): read what a loss needs from it, not from module attributes, so
        that it belongs to this pass (micro-batches, ``torch.compile``)."""
        return {}

    def after_backward(self, model: nn.Module, step: int) -> None:
        """The gradients are complete (before clipping and the optimizer step)."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """``optimizer.step()`` has applied this step's update."""

    def metrics(self, model: nn.Module, step: int) -> dict[str, float]:
        """Numbers to log for this step (called after ``after_optimizer_step``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (tensors and plain Python values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"hook {self.name!r} keeps no state, but the checkpoint holds some for it "
                             f"({sorted(state)})")


class MoEBalancing(TrainHook):
    """DeepSeek-V3's load balancing for DeepSeekMoE (§2.1.2), as a training hook.

    * ``extra_loss``: ``balance_loss`` of the forward pass's routing (``output[1]["routing"]``,
      padding left out), ``alpha * sum_i f_i P_i`` summed over MoE layers (``"sequence"``: eqs. 17-20; ``"batch"``: the conventional auxiliary
      loss; ``"none"`` or ``alpha == 0``: no loss), logged as ``balance_loss``.
    * ``after_optimizer_step``: per MoE layer, the tokens each expert received during the
      step (every micro-batch: the layers count until this call) move the bias,
      ``b_i += gamma * sign(mean load - load_i)``, then the count is reset. With
      ``process_group`` the load is first summed over that group (the data-parallel ranks,
      chapter 06), so every rank applies the same update; with ``None`` this process's load
      is used as is.
    * ``metrics``: ``maxvio``, the step's MaxVio (max load / mean load - 1) averaged over MoE
      layers, and ``balance_loss = 0.0`` when no loss is added, so runs compare.

    Evaluation runs the model in eval mode, where MoE layers count nothing, so it never
    moves the bias. On a model without MoE layers every method does nothing.
    """

    name = "moe_balancing"
    progress_keys = ("maxvio",)

    def __init__(self, bias_update_speed: float = 0.001, balance_loss: str = "sequence", alpha: float = 1e-4,
                 process_group: dist.ProcessGroup | None = None) -> None:
        for label, value in (("bias_update_speed", bias_update_speed), ("alpha", alpha)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{label} ({value!r}) must be a number >= 0")
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss ({balance_loss!r}) must be 'sequence', 'batch' or 'none'")
        self.gamma, self.kind, self.alpha, self.process_group = bias_update_speed, balance_loss, alpha, process_group
        self._adds_loss = False
        self._loads: list[torch.Tensor] = []

    def extra_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], output: Any,
                   step: int) -> dict[str, torch.Tensor]:
        _, aux = output
        loss = balance_loss(aux["routing"], self.kind, self.alpha)   # None: kind 'none', alpha 0 or no MoE layer
        self._adds_loss = loss is not None
        return {} if loss is None else {"balance_loss": loss}

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self._loads = []
        for layer in moe_layers(model):
            load = layer.tokens_per_expert.clone()
            if self.process_group is not None:
                dist.all_reduce(load, group=self.process_group)
            if self.gamma and load.sum() > 0:
                update_bias(layer.gate.bias, load, self.gamma)
            layer.tokens_per_expert.zero_()
            self._loads.append(load)

    def metrics(self, model: nn.Module, step: int) -> dict[str, float]:
        if not self._loads:
            return {}
        record = {"maxvio": sum(max_violation(load) for load in self._loads) / len(self._loads)}
        if not self._adds_loss:
            record["balance_loss"] = 0.0
        return record
