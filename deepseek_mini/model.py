"""Assemble a DeepSeek-style decoder from its config: embedding, blocks, final norm, head.

This module is hand-written and grows as chapters land: the components it wires together
are exported from the lecture notebooks (``layers``, ``rope``, ``attention`` from chapter
01). Which attention and which feed-forward network a layer gets is decided here, from
config *fields*, never from sizes:

* attention: baseline MHA/GQA (``kv_lora_rank is None``) or Multi-head Latent Attention
  (chapter 02, DeepSeek-V3 §2.1.1), naive or absorbed by ``attn_impl``;
* feed-forward: the dense SwiGLU MLP, or DeepSeekMoE from layer ``first_k_dense_replace``
  on when ``n_routed_experts`` is set (chapter 03, §2.1.2);
* Multi-Token Prediction: ``num_nextn_predict_layers`` = D MTP modules in ``model.mtp``
  (chapter 04, §2.2), each with the block the config puts at index ``num_hidden_layers + k``;
  they share ``embed`` and ``head`` with the main model by reference, and ``forward`` never
  runs them (``deepseek_mini.mtp.mtp_logits`` does, from ``aux["hidden"]``).

Construction never initialises weights; ``init_weights`` does (the torchtitan pattern),
so ``build_model(config, device="meta")`` lays out even the 671B model instantly and
without memory, for parameter accounting (chapter 09). Every module initialises its own
weights (``init_weights`` on each); which buffers stay FP32 whatever the model is cast to is
the dtype policy of ``deepseek_mini.precision``.

The model is also the platform later chapters build on:

* **Stages** (pipeline parallelism, chapter 06): ``layers`` is an ``nn.ModuleDict`` keyed by
  layer id, and ``embed``, ``norm``, ``head`` may be None; ``cut`` makes a stage, and a chain
  of stages computes exactly the whole model.
* **Ragged batches** (GRPO, chapter 08; speculative decoding with MTP, chapter 04): per-row
  ``positions``, a ``padding_mask``, and caches whose rows have their own lengths.
* **Token ids are checked once**, by ``check_tokens`` where they enter, never in ``forward``,
  which would otherwise synchronise a GPU on every decoded token.

* **Context extension** (chapter 07): ``rope_scaling`` (YaRN, PI or NTK-aware) sets the RoPE
  tables' frequencies and attention factor (``rope.rope_parameters``) and the attention's
  softmax scale (``rope.softmax_scale``); ``rope_interleave`` picks RoPE's pair layout.

A config field the model does not build is refused, never ignored: ``attention_bias`` with
MLA raises ``NotImplementedError`` naming the field and the value that builds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepseek_mini.attention import Attention, ragged_causal_mask
from deepseek_mini.config import ModelConfig, load_config
from deepseek_mini.layers import MLP, Block, RMSNorm, init_linear
from deepseek_mini.mla import MLA
from deepseek_mini.moe import MoE, Routing
from deepseek_mini.mtp import MTPModule
from deepseek_mini.precision import FP32Buffers
from deepseek_mini.rope import rope_cos_sin, rope_dim, rope_parameters, softmax_scale

__all__ = ["Transformer", "build_model", "check_tokens", "count_parameters", "cut", "ParameterCount"]


def _make_attention(config: ModelConfig) -> nn.Module:
    if config.uses_mla:
        return MLA(config.hidden_size, config.num_attention_heads, kv_lora_rank=config.kv_lora_rank,
                   q_lora_rank=config.q_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
                   qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
                   eps=config.rms_norm_eps, attn_impl=config.attn_impl,
                   softmax_scale=softmax_scale(config), rope_interleave=config.rope_interleave)
    return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                     bias=config.attention_bias, softmax_scale=softmax_scale(config),
                     rope_interleave=config.rope_interleave)


def _make_ffn(config: ModelConfig, layer_id: int) -> nn.Module:
    if not config.is_moe_layer(layer_id):
        return MLP(config.hidden_size, config.intermediate_size)
    if config.topk_method == "group_limited_greedy":
        raise ValueError("topk_method 'group_limited_greedy' is DeepSeek-V2's router, which deepseek_mini "
                         "does not build; use 'noaux_tc' (V3, group-limited with the balancing bias) or 'greedy'")
    n_group, topk_group = (config.n_group, config.topk_group) if config.topk_method == "noaux_tc" else (1, 1)
    return MoE(config.hidden_size, moe_inter_dim=config.moe_intermediate_size,
               n_routed_experts=config.n_routed_experts, n_shared_experts=config.n_shared_experts,
               topk=config.num_experts_per_tok, n_group=n_group, topk_group=topk_group,
               route_scale=config.routed_scaling_factor, score_func=config.scoring_func,
               normalize=config.norm_topk_prob)


def _make_block(config: ModelConfig, layer_id: int) -> Block:
    return Block(_make_attention(config), _make_ffn(config, layer_id), config.hidden_size, config.rms_norm_eps)


def _unbuilt_features(config: ModelConfig) -> list[str]:
    """What ``config`` asks for that this model does not build yet (one clause per field)."""
    unbuilt = []
    if config.uses_mla and config.attention_bias:
        unbuilt.append("attention_bias=True with MLA is not built (DeepSeek-V3's attention projections "
                       "have no bias): set attention_bias to false")
    return unbuilt


def _countable_config(config: ModelConfig) -> ModelConfig:
    """``config`` without context extension and the RoPE layout, which hold no parameters: what
    ``count_parameters`` builds on the meta device (no RoPE tables of 163,840 rows for V3)."""
    return config.replace(rope_scaling=None, rope_interleave=True)


class Transformer(FP32Buffers):
    """Decoder-only language model: tokens (B, T) -> next-token logits (B, T, vocab_size).

    Names follow DeepSeek-V3's inference code: ``embed``, ``layers``, ``norm``, ``head``.
    The head is untied from the embedding (HF ``tie_word_embeddings=False``).

    ``layers`` is an ``nn.ModuleDict`` keyed by layer id ("0", "1", ...), so the state-dict keys
    are ``layers.3.attn.wq.weight`` whatever else the model holds. A pipeline stage is this same
    class with layers removed (``cut``, or ``del model.layers["3"]``; torchtitan's way), and
    ``embed``, ``norm`` and ``head`` may be None: without ``embed`` it takes hidden states, without
    ``head`` it returns them. RoPE tables are shared by every layer and kept by every stage; caches
    are keyed by layer id, so a stage holding layers 30-45 runs as it is.

    ``mtp`` holds the Multi-Token Prediction modules (``num_nextn_predict_layers`` of them, else
    None; state-dict keys ``mtp.0.eh_proj.weight`` ...). They belong with the head: a stage
    without the head has none.
    """

    fp32_buffers = ("rope_cos", "rope_sin")     # angles up to 163,840 positions need FP32 (chapter 07)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if unbuilt := _unbuilt_features(config):
            raise NotImplementedError("; ".join(unbuilt))
        self.config = config
        d = config.hidden_size
        self.embed: nn.Embedding | None = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleDict({
            str(i): _make_block(config, i) for i in range(config.num_hidden_layers)})
        self.norm: RMSNorm | None = RMSNorm(d, config.rms_norm_eps)
        self.head: nn.Linear | None = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        n = config.num_hidden_layers                     # MTP module k's block is the layer at index n + k
        self.mtp: nn.ModuleList | None = nn.ModuleList(
            MTPModule(_make_block(config, n + k), d, config.rms_norm_eps)
            for k in range(config.num_nextn_predict_layers)) if config.num_nextn_predict_layers else None
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from the (possibly extended) frequencies; the attention
        factor scales both tables, as transformers does (1 for plain RoPE and for V3's YaRN)."""
        inv_freq, attention_factor = rope_parameters(self.config)
        cos, sin = rope_cos_sin(inv_freq, self.config.max_position_embeddings)
        return cos * attention_factor, sin * attention_factor

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Weights ~ N(0, initializer_range^2), biases 0, norm gains 1: each module initialises its
        own (``init_weights``), called in the order the model built them, so one generator draws
        reproducible numbers. A stage initialises only what it holds. The RoPE tables are
        recomputed (``to_empty`` leaves buffers uninitialised)."""
        std = self.config.initializer_range
        if self.embed is not None:
            init_linear(self.embed, std, generator)
        for layer in self.layers.values():
            layer.init_weights(std, generator)
        if self.norm is not None:
            self.norm.init_weights(std, generator)
        if self.head is not None:
            if self.config.tie_word_embeddings and self.embed is not None:
                self.head.weight = self.embed.weight     # moving off the meta device replaced the parameters
            init_linear(self.head, std, generator)
        for module in self.mtp or []:                    # last: the main model draws what it drew without MTP
            module.init_weights(std, generator)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Fill the buffers no checkpoint holds (``to_empty`` leaves them uninitialised): the
        RoPE tables, recomputed, and the MoE layers' token counts, zeroed. ``init_weights`` and
        ``from_pretrained`` both end with it."""
        cos, sin = self._rope_tables()
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for name, buffer in self.named_buffers():
            if name.endswith("tokens_per_expert"):
                buffer.zero_()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> dict[str, Any]:
        """An empty KV cache for each layer this model (or stage) holds, keyed by layer id like
        ``layers``, for decoding up to max_len positions."""
        max_len = self.config.max_position_embeddings if max_len is None else max_len
        if not 0 < max_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_len ({max_len}) must be in [1, max_position_embeddings="
                             f"{self.config.max_position_embeddings}]")
        weight = next(self.parameters())
        return {layer_id: layer.attn.new_cache(batch_size, max_len, device=weight.device, dtype=weight.dtype)
                for layer_id, layer in self.layers.items()}

    def _check_inputs(self, x: torch.Tensor, start_pos: int, cache: dict | None,
                      positions: torch.Tensor | None, padding_mask: torch.Tensor | None) -> None:
        """Shapes, dtypes and positions, all known on the host: nothing here waits for a GPU.
        Token ids are checked once, by ``check_tokens`` at the entry points."""
        if self.embed is not None and not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == torch.long):
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"tokens must be a (batch, seq_len) int64 tensor, got {got}")
        if self.embed is None and not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.is_floating_point()
                                       and x.shape[-1] == self.config.hidden_size):
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"this stage has no embedding: pass hidden states (batch, seq_len, "
                             f"hidden_size={self.config.hidden_size}) as floats, got {got}")
        if not isinstance(start_pos, int):
            raise ValueError(f"start_pos must be an int, got {type(start_pos).__name__}; pass per-row "
                             "positions (batch, seq_len) as positions=")
        shape, end = tuple(x.shape[:2]), start_pos + x.shape[1]
        if positions is None and (start_pos < 0 or end > self.config.max_position_embeddings):
            raise ValueError(f"positions {start_pos}..{end - 1} exceed max_position_embeddings "
                             f"({self.config.max_position_embeddings}); use a shorter input or a larger config")
        for name, t, dtype in (("positions", positions, torch.long), ("padding_mask", padding_mask, torch.bool)):
            if t is not None and not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == dtype):
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a {shape} {dtype} tensor like the input's (batch, seq_len), got {got}")
        if cache is not None and (not isinstance(cache, dict) or cache.keys() != self.layers.keys()):
            got = sorted(cache, key=int) if isinstance(cache, dict) else type(cache).__name__
            raise ValueError(f"cache holds layers {got}, the model {list(self.layers)}; use model.new_cache()")

    def _attention_inputs(self, batch: int, length: int, start_pos: int, cache: dict | None,
                          positions: torch.Tensor | None, padding_mask: torch.Tensor | None):
        """What every layer shares, computed once per forward: the RoPE rows, the position(s) and the mask."""
        if positions is None and padding_mask is None:         # every row at start_pos..: the simple path
            end = start_pos + length
            return (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]), start_pos, None
        if positions is None:
            positions = torch.arange(start_pos, start_pos + length, device=self.rope_cos.device).expand(batch, length)
        if cache is None and padding_mask is None:
            mask = None                                         # plain causal: SDPA's own mask
        else:
            mask = ragged_causal_mask(positions, padding_mask, next(iter(cache.values())).max_len if cache else None)
        return (self.rope_cos[positions], self.rope_sin[positions]), positions, mask

    def hidden_states(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None, *,
                      positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                      routing: list[Routing] | None = None) -> torch.Tensor:
        """Everything but the head: the final normalised hidden states (B, T, d) of a whole model;
        a stage without ``norm`` returns its last layer's residual stream. ``routing``, if given,
        collects each MoE layer's ``Routing``, in layer order."""
        self._check_inputs(x, start_pos, cache, positions, padding_mask)
        h = x if self.embed is None else self.embed(x)
        rope, where, mask = self._attention_inputs(x.shape[0], x.shape[1], start_pos, cache, positions, padding_mask)
        for layer_id, layer in self.layers.items():
            # an MoE layer also takes the token mask (padding loads no expert) and the routing list
            moe_inputs = {"token_mask": padding_mask, "routing": routing} if isinstance(layer.ffn, MoE) else {}
            h = layer(h, rope, where, None if cache is None else cache[layer_id], mask, **moe_inputs)
        return h if self.norm is None else self.norm(h)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None, *,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Logits (B, T, vocab_size) for tokens x (B, T) at positions start_pos..start_pos+T-1.

        A stage without ``embed`` takes hidden states x (B, T, d); one without ``head`` returns them.
        Ragged batches (GRPO, speculative decoding): ``positions`` (B, T) places each row's tokens
        (RoPE angle, and cache slot: with a cache, slot = position, so each row has its own
        length and its padding must follow its real tokens, which overwrite it later);
        ``padding_mask`` (B, T) is True at real tokens, False at padding that no token may attend
        to. Neither is range-checked here, and neither are token ids: an out-of-range id fails
        inside ``nn.Embedding`` (IndexError on CPU, a device-side assert on GPU). Checking would
        read a tensor's min and max, a GPU sync per decoded token; ``check_tokens`` does it once
        where the ids come in (``generate``, the trainer).

        ``return_aux=True`` returns ``(logits, aux)``: ``aux["routing"]`` holds each MoE layer's
        ``Routing`` of this pass (affinities, chosen experts, token mask), what the balance losses
        need. Returned, not kept on the layers, so every micro-batch has its own and
        ``torch.compile`` traces it; training hooks receive it (``MoEBalancing``).
        ``aux["hidden"]`` is the final hidden state (B, T, d) the head read, where the MTP chain
        starts (``deepseek_mini.mtp.mtp_logits``, the ``MultiTokenPrediction`` hook).
        """
        routing: list[Routing] | None = [] if return_aux else None
        h = self.hidden_states(x, start_pos, cache, positions=positions, padding_mask=padding_mask, routing=routing)
        out = h if self.head is None else self.head(h)
        return (out, {"routing": routing, "hidden": h}) if return_aux else out


def check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    """Raise a one-line ``ValueError`` unless every id in ``tokens`` is in [0, vocab_size).

    Call it once where ids enter (``generate`` does on its prompts; the trainer on its data):
    ``Transformer.forward`` does not, because reading the min and max waits for the GPU.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex():
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"token ids must be an integer tensor, got {got}")
    if tokens.numel() and tokens.device.type != "meta":
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got min {low}, max {high}")


def cut(model: Transformer, layer_ids: Iterable[int | str], *, embed: bool = False, head: bool = False) -> Transformer:
    """A pipeline stage of ``model``: a copy holding only the layers ``layer_ids``, plus the embedding
    if ``embed`` (the first stage) and the final norm and head if ``head`` (the last stage).

    The stage is the model with the rest removed (torchtitan's way), so its state-dict keys are
    the whole model's (``layers.2.ffn.gate.bias``) and checkpoints load into it with
    ``strict=False``. The removed parts are never copied: cut a model built on the meta device,
    then materialise each stage where it runs. Chained, the stages compute exactly the whole model::

        stages = [cut(model, [0, 1], embed=True), cut(model, [2, 3], head=True)]
        h = tokens
        for stage in stages:
            h = stage(h)        # hidden states between stages, logits at the end
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"cut needs a deepseek_mini Transformer, got {type(model).__name__}")
    keep = {str(i) for i in layer_ids}
    if unknown := sorted(keep - set(model.layers), key=int):
        raise ValueError(f"layer {unknown[0]} is not in the model, which holds layers {list(model.layers)}")
    removed = [layer for layer_id, layer in model.layers.items() if layer_id not in keep]
    removed += [] if embed else [model.embed]
    removed += [] if head else [model.norm, model.head, model.mtp]     # MTP sits with the head (§3.2.1)
    # deepcopy with the removed modules memoised as None copies only what the stage keeps.
    try:
        stage = copy.deepcopy(model, memo={id(module): None for module in removed if module is not None})
    except RuntimeError as error:       # a tensor with autograd history, kept by a module after forward
        raise ValueError("cut the model before running it: a module holds a tensor from its last forward "
                         f"pass that cannot be copied ({str(error).split('.')[0]})") from error
    for layer_id in [layer_id for layer_id in stage.layers if layer_id not in keep]:
        del stage.layers[layer_id]
    return stage


def build_model(config: ModelConfig | str, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, seed: int | None = None) -> Transformer:
    """Construct the model for ``config`` (a ModelConfig or a preset name / config path).

    On ``device="meta"`` no memory is allocated and no weights are initialised: use it to
    inspect shapes and count parameters of configurations too large to materialise.
    ``seed`` makes initialisation reproducible without touching the global RNG.
    Raises ``NotImplementedError`` (on every device) for a field the model does not build
    (``attention_bias`` with MLA).
    """
    config = load_config(config) if not isinstance(config, ModelConfig) else config
    device = torch.device(device)
    with torch.device("meta"):        # shapes only: no memory, no RNG draws by nn.Linear's own init
        model = Transformer(config)
    if device.type != "meta":
        model = model.to_empty(device=device)
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator)
    if dtype is not None:
        model = model.to(dtype)       # the dtype policy keeps the FP32 buffers (deepseek_mini.precision)
    return model


@dataclass(frozen=True)
class ParameterCount:
    """Parameter totals of the main model: all of them, and those used for one token."""

    total: int
    activated: int
    embedding: int
    head: int
    mtp: int = 0        # the MTP modules (§2.2), not in total: their embedding and head are the main model's

    def __str__(self) -> str:
        mtp = f" | MTP {_human(self.mtp)}" if self.mtp else ""
        return (f"total {_human(self.total)} | activated per token {_human(self.activated)} "
                f"| embedding {_human(self.embedding)} | head {_human(self.head)}{mtp}")


def _human(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def count_parameters(model_or_config: nn.Module | ModelConfig | str) -> ParameterCount:
    """Total and activated-per-token parameter counts of the main model, and the MTP modules' apart.

    A config or preset name is built on the meta device first, so this works for 671B (YaRN,
    which adds no parameter, is left out of that build). Activated = total minus the routed
    experts a token does not use (chapter 03); for a dense model the two are equal. The MTP
    modules (chapter 04) are not part of the main model's total, as in the paper's 671B; their
    own parameters are ``mtp`` (the embedding and head they share are counted once, in the main
    model).
    """
    if isinstance(model_or_config, (ModelConfig, str)):
        config = load_config(model_or_config) if isinstance(model_or_config, str) else model_or_config
        model_or_config = build_model(_countable_config(config), device="meta")
    model = model_or_config
    mtp = getattr(model, "mtp", None) or nn.ModuleList()
    mtp_ids = {id(p) for p in mtp.parameters()}
    unique = {id(p): p for p in model.parameters() if id(p) not in mtp_ids}
    total = sum(p.numel() for p in unique.values())
    in_mtp = {id(m) for m in mtp.modules()}
    inactive = sum(m.inactive_parameters() for m in model.modules()
                   if hasattr(m, "inactive_parameters") and id(m) not in in_mtp)
    embedding = model.embed.weight.numel() if getattr(model, "embed", None) is not None else 0
    head = model.head.weight.numel() if getattr(model, "head", None) is not None else 0
    return ParameterCount(total=total, activated=total - inactive, embedding=embedding, head=head,
                          mtp=sum(p.numel() for p in mtp.parameters()))
