"""Training hooks: the seams of the training loop, and DeepSeekMoE's load balancing, the first feature in them.

``deepseek_mini.train`` runs the same plain step for every model; what a feature adds to a
step it adds through a ``TrainHook``, never through an ``if is_moe`` branch in the loop. One
step, with the seams marked (``prepare_model`` runs once, before them)::

    hook.prepare_model(model)                     # once: after build_model, before the optimizer (FP8, ch. 05)
    x, y = sampler.next_batch()                   # y (B, T + D): D more targets for MTP's D depths
    output = model(x, return_aux=True)            # (logits (B, T, V), aux): aux["routing"] per MoE layer
    loss = cross_entropy(output[0], y[:, :T])
    loss += sum(hook.extra_loss(model, (x, y), output, step))      # MTP loss (ch. 04); MoE balance loss
    loss.backward()
    hook.after_backward(model, step)              # gradient sync across data-parallel ranks (ch. 06)
    clip_grad_norm_(...); optimizer.step()
    hook.after_optimizer_step(model, step)        # MoE bias update; FP8 scale bookkeeping (ch. 05)
    record |= hook.metrics(model, step)           # per-depth MTP losses; MaxVio; ...

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

``FP8Training`` is DeepSeek-V3's FP8 mixed precision (§3.3, chapter 05): its ``prepare_model``
swaps the model's eligible linears for ``deepseek_mini.fp8.FP8Linear`` before the optimizer is
built, so the optimizer holds the same (FP32 master) parameters; a resume converts the fresh
model the same way and then loads the checkpoint (the parameter names do not change).

``MultiTokenPrediction`` is DeepSeek-V3's MTP objective (§2.2, eqs. 21-25): the D MTP modules
run from the main model's final hidden state and their mean cross-entropy, weighted by
lambda (0.3, then 0.1: §4.2), is added to the loss. It does nothing on a model without MTP
modules. It comes before ``MoEBalancing``: the MTP blocks' MoE routing joins the pass's
routing list, so the balance loss covers them like any MoE layer (the bias update and MaxVio
already do: the MTP blocks count their load like any MoE layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepseek_mini.config import ModelConfig
from deepseek_mini.moe import balance_loss, max_violation, moe_layers, update_bias
from deepseek_mini.mtp import mtp_lambda, mtp_logits, mtp_losses

__all__ = ["TrainHook", "MoEBalancing", "MultiTokenPrediction", "FP8Training", "BALANCE_LOSSES"]

BALANCE_LOSSES = ("sequence", "batch", "none")


class TrainHook:
    """A feature of the training loop. Every method is optional: the defaults do nothing.

    ``step`` is the number of the step being taken, counted from 1; all calls of one step
    get the same number. ``model`` is the eager module (also when training runs through
    ``torch.compile``): hooks read and change its parameters and buffers.
    """

    name: str = "hook"                     # unique within a run: keys the hook's state in checkpoints
    progress_keys: tuple[str, ...] = ()    # metrics shown on the progress bar

    def set_process_groups(self, data_parallel: dist.ProcessGroup | None,
                           pipeline: dist.ProcessGroup | None) -> None:
        """A parallel run (chapter 06) gives each hook its groups once, before the first step:
        ``data_parallel``, the ranks that hold the same layers and see different data (the
        expert-parallel ranks among them: they hold different experts of the same MoE layers,
        but route their own tokens through the same gates);
        ``pipeline``, the ranks whose stages together make the whole model. ``model`` is then
        this rank's stages (a ``ModuleList``), and ``extra_loss`` runs once per stage and
        micro-batch with that stage's model and output."""

    def prepare_model(self, model: nn.Module) -> None:
        """Change the freshly built model in place (swap modules, cast parameters), once per run,
        before the optimizer is built and before a resume loads the checkpoint into the model.
        Keep the parameter names: checkpoints are keyed by them."""

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

    def applies_to(self, model_config: ModelConfig) -> bool:
        """Whether the hook does anything for a model of this config. A resumed checkpoint may
        lack a hook that does not (one added to the defaults after it was written, such as
        ``MultiTokenPrediction`` for a model without MTP modules); any other missing hook
        would change the run, so the resume is refused."""
        return True


class MoEBalancing(TrainHook):
    """DeepSeek-V3's load balancing for DeepSeekMoE (§2.1.2), as a training hook.

    * ``extra_loss``: ``balance_loss`` of the forward pass's routing (``output[1]["routing"]``,
      padding left out), ``alpha * sum_i f_i P_i`` summed over MoE layers (``"sequence"``: eqs. 17-20; ``"batch"``: the conventional auxiliary
      loss; ``"none"`` or ``alpha == 0``: no loss), logged as ``balance_loss``.
    * ``after_optimizer_step``: per MoE layer, the tokens each expert received during the
      step (every micro-batch: the layers count until this call) move the bias,
      ``b_i += gamma * sign(mean load - load_i)``, then the count is reset. With
      ``process_group`` the load is first summed over that group (chapter 06: every rank that
      routes its own tokens through the layer's gate, i.e. all data-parallel ranks of the
      layer's pipeline stage, expert-parallel ones included; never WORLD), so every rank applies
      the same update; with ``None`` this process's load is used as is.
    * ``metrics``: ``maxvio``, the step's MaxVio (max load / mean load - 1) averaged over MoE
      layers, and ``balance_loss = 0.0`` when no loss is added, so runs compare. With
      ``stage_group`` (the pipeline ranks, chapter 06), the average is over the layers of every
      stage: each rank's sum and count are summed over that group.

    Evaluation runs the model in eval mode, where MoE layers count nothing, so it never
    moves the bias. On a model without MoE layers every method does nothing.
    """

    name = "moe_balancing"
    progress_keys = ("maxvio",)

    def __init__(self, bias_update_speed: float = 0.001, balance_loss: str = "sequence", alpha: float = 1e-4,
                 process_group: dist.ProcessGroup | None = None,
                 stage_group: dist.ProcessGroup | None = None) -> None:
        for label, value in (("bias_update_speed", bias_update_speed), ("alpha", alpha)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{label} ({value!r}) must be a number >= 0")
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss ({balance_loss!r}) must be 'sequence', 'batch' or 'none'")
        self.gamma, self.kind, self.alpha, self.process_group = bias_update_speed, balance_loss, alpha, process_group
        self.stage_group = stage_group
        self._adds_loss = False
        self._loads: list[torch.Tensor] = []

    def set_process_groups(self, data_parallel: dist.ProcessGroup | None,
                           pipeline: dist.ProcessGroup | None) -> None:
        """The load is summed over ``data_parallel`` (unless a group was given), MaxVio over ``pipeline``."""
        self.process_group = self.process_group if self.process_group is not None else data_parallel
        self.stage_group = self.stage_group if self.stage_group is not None else pipeline

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
        total, count = sum(max_violation(load) for load in self._loads), len(self._loads)
        if self.stage_group is not None:   # every pipeline rank takes part, also one without MoE layers
            device = "cuda" if dist.get_backend(self.stage_group) == "nccl" else "cpu"
            both = torch.tensor([float(total), float(count)], dtype=torch.float64, device=device)
            dist.all_reduce(both, group=self.stage_group)
            total, count = both.tolist()
        if not count:
            return {}
        record = {"maxvio": total / count}
        if not self._adds_loss:
            record["balance_loss"] = 0.0
        return record


class MultiTokenPrediction(TrainHook):
    """DeepSeek-V3's Multi-Token Prediction objective (§2.2, eqs. 21-25), as a training hook.

    * ``extra_loss``: the D MTP modules run from the pass's final hidden state
      (``output[1]["hidden"]``; ``mtp_logits``): depth k reads the hidden state of depth k - 1
      and the embedding of token t_{i+k}, and predicts t_{i+k+1}. The loss added is
      ``mtp_loss = lambda / D * sum_k L^k_MTP`` (eq. 25), each L^k the mean cross-entropy
      over the T positions (eq. 24). The batch's targets ``y`` are (B, T + D): the trainer
      draws windows D tokens longer (``Batcher(extra_targets=D)``), so every depth has a
      target at every position; the main loss uses ``y[:, :T]``. The MTP blocks' MoE routing
      is appended to ``output[1]["routing"]``, so a later ``MoEBalancing`` adds their balance
      loss too.
    * lambda follows ``mtp_lambda``: ``lambda_early`` (0.3) for the first ``lambda_switch``
      (10/14.8: V3 switched after 10T of 14.8T tokens, §4.2) of ``total_steps``, then
      ``lambda_late`` (0.1).
    * ``metrics``: ``mtp_loss_1`` ... ``mtp_loss_D`` (each depth's unweighted L^k) and
      ``mtp_lambda``.

    The main model does not depend on the MTP modules: ``Transformer.forward`` never runs them,
    so generation and evaluation ignore them and they can be dropped after training (or kept
    as the draft of self-speculative decoding). On a model without MTP modules every method
    does nothing. The hook keeps no state: lambda is a function of the step.
    """

    name = "mtp"
    progress_keys = ("mtp_loss_1",)

    def __init__(self, total_steps: int, lambda_early: float = 0.3, lambda_late: float = 0.1,
                 lambda_switch: float = 10.0 / 14.8) -> None:
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
            raise ValueError(f"total_steps ({total_steps!r}) must be a positive integer")
        for label, value in (("lambda_early", lambda_early), ("lambda_late", lambda_late)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{label} ({value!r}) must be a number >= 0")
        switch_ok = isinstance(lambda_switch, (int, float)) and not isinstance(lambda_switch, bool)
        if not switch_ok or not 0 <= lambda_switch <= 1:
            raise ValueError(f"lambda_switch ({lambda_switch!r}) must be a fraction of the run in [0, 1]")
        self.total_steps, self.lambda_early, self.lambda_late = total_steps, lambda_early, lambda_late
        self.lambda_switch = lambda_switch
        self._losses: list[torch.Tensor] = []
        self._lambda = 0.0

    def weight(self, step: int) -> float:
        """lambda at ``step`` (from 1)."""
        return mtp_lambda(step, self.total_steps, self.lambda_early, self.lambda_late, self.lambda_switch)

    def extra_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], output: Any,
                   step: int) -> dict[str, torch.Tensor]:
        self._losses = []
        if not getattr(model, "mtp", None):
            return {}
        (x, y), (_, aux) = batch, output
        depth, length = len(model.mtp), x.shape[1]
        if y.shape != (x.shape[0], length + depth):
            raise ValueError(f"MTP needs targets (batch, seq_len + D) = {(x.shape[0], length + depth)} for inputs "
                             f"{tuple(x.shape)} and D = {depth}, got {tuple(y.shape)}: draw the windows with "
                             f"Batcher(..., extra_targets={depth})")
        losses = mtp_losses(mtp_logits(model, aux["hidden"], y, routing=aux["routing"]), y)
        self._losses, self._lambda = [loss.detach() for loss in losses], self.weight(step)
        return {"mtp_loss": self._lambda / depth * sum(losses)}

    def metrics(self, model: nn.Module, step: int) -> dict[str, float]:
        if not self._losses:
            return {}
        record = {f"mtp_loss_{k}": loss.item() for k, loss in enumerate(self._losses, start=1)}
        record["mtp_lambda"] = self._lambda
        return record

    def applies_to(self, model_config: ModelConfig) -> bool:
        return model_config.num_nextn_predict_layers > 0


class FP8Training(TrainHook):
    """DeepSeek-V3's fine-grained FP8 training (§3.3), as a training hook.

    * ``prepare_model``: ``deepseek_mini.fp8.convert_to_fp8`` replaces every plain ``nn.Linear``
      whose name contains none of ``skip`` (default: embedding, output head, MoE gate, which
      §3.3.1 keeps in high precision) by an ``FP8Linear``: Fprop, Dgrad and Wgrad run in E4M3
      with 1x128 / 128x128 scales, the parameters (master weights) and gradients stay FP32.
      The names converted are in ``converted``. It runs before the optimizer is built, so the
      optimizer steps the very parameters the FP8 layers use.
    * ``metrics``: none. The scales are computed online from each tile's amax (no delayed
      scaling, no amax history), so the hook keeps no state.

    On a CPU the GEMMs are emulated (the reference, about 2x the step time of FP32 on the toy);
    on CUDA the Triton kernels run. The toy's routed experts are stacked tensors, not linears,
    and stay FP32.
    """

    name = "fp8"

    def __init__(self, skip: tuple[str, ...] | None = None, block: int = 128, amax_floor: float | None = None) -> None:
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            raise ValueError(f"block ({block!r}) must be a positive integer")
        self.skip, self.block, self.amax_floor = skip, block, amax_floor
        self.converted: list[str] = []

    def prepare_model(self, model: nn.Module) -> None:
        from deepseek_mini.fp8.linear import KEEP_HIGH_PRECISION, convert_to_fp8   # imported when used

        kwargs = {"block": self.block} if self.amax_floor is None else {"block": self.block,
                                                                       "amax_floor": self.amax_floor}
        self.converted = convert_to_fp8(model, KEEP_HIGH_PRECISION if self.skip is None else self.skip, **kwargs)
