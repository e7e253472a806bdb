"""Assemble a DeepSeek-style decoder from its config: embedding, blocks, final norm, head.

This module is hand-written and grows as chapters land: the components it wires together
are exported from the lecture notebooks (``layers``, ``rope``, ``attention`` from chapter
01). Which attention and which feed-forward network a layer gets is decided here, from
config *fields*, never from sizes:

* attention: baseline MHA/GQA (``kv_lora_rank is None``) or Multi-head Latent Attention
  (chapter 02, DeepSeek-V3 §2.1.1), naive or absorbed by ``attn_impl``;
* feed-forward: the dense SwiGLU MLP, or DeepSeekMoE from layer ``first_k_dense_replace``
  on when ``n_routed_experts`` is set (chapter 03, §2.1.2).

Construction never initialises weights; ``init_weights`` does (the torchtitan pattern),
so ``build_model(config, device="meta")`` lays out even the 671B model instantly and
without memory, for parameter accounting (chapter 09).

A config field the model does not build yet is refused, never ignored: ``rope_scaling``
(YaRN, chapter 07), ``num_nextn_predict_layers > 0`` (Multi-Token Prediction, chapter 04),
``rope_interleave=False`` and ``attention_bias`` with MLA raise ``NotImplementedError``
naming the field and the value that builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepseek_mini.attention import Attention
from deepseek_mini.config import ModelConfig, load_config
from deepseek_mini.layers import MLP, Block, RMSNorm
from deepseek_mini.mla import MLA
from deepseek_mini.moe import Gate, MoE
from deepseek_mini.rope import rope_cos_sin, rope_frequencies

__all__ = ["Transformer", "build_model", "count_parameters", "ParameterCount"]


def _make_attention(config: ModelConfig) -> nn.Module:
    if config.uses_mla:
        return MLA(config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.q_lora_rank,
                   config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                   config.rms_norm_eps, config.attn_impl)
    return Attention(config.hidden_size, config.num_attention_heads,
                     config.num_key_value_heads, bias=config.attention_bias)


def _make_ffn(config: ModelConfig, layer_id: int) -> nn.Module:
    if not config.is_moe_layer(layer_id):
        return MLP(config.hidden_size, config.intermediate_size)
    if config.topk_method == "group_limited_greedy":
        raise ValueError("topk_method 'group_limited_greedy' is DeepSeek-V2's router, which deepseek_mini "
                         "does not build; use 'noaux_tc' (V3, group-limited with the balancing bias) or 'greedy'")
    n_group, topk_group = (config.n_group, config.topk_group) if config.topk_method == "noaux_tc" else (1, 1)
    return MoE(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts,
               config.n_shared_experts, config.num_experts_per_tok, n_group, topk_group,
               config.routed_scaling_factor, config.scoring_func, config.norm_topk_prob)


def _unbuilt_features(config: ModelConfig) -> list[str]:
    """What ``config`` asks for that this model does not build yet (one clause per field)."""
    unbuilt = []
    if config.rope_scaling is not None:
        unbuilt.append("rope_scaling (YaRN) is built in chapter 07: set rope_scaling to None (null) "
                       "to build this model")
    if config.num_nextn_predict_layers > 0:
        unbuilt.append(f"num_nextn_predict_layers = {config.num_nextn_predict_layers} > 0 (Multi-Token "
                       "Prediction) is built in chapter 04: set num_nextn_predict_layers to 0 to build "
                       "this model")
    if not config.rope_interleave:
        unbuilt.append("rope_interleave=False (RoPE on split halves, the layout of some converted "
                       "checkpoints) is not built: deepseek_mini rotates interleaved pairs like "
                       "DeepSeek-V3's own checkpoint (chapter 01): set rope_interleave to true")
    if config.uses_mla and config.attention_bias:
        unbuilt.append("attention_bias=True with MLA is not built (DeepSeek-V3's attention projections "
                       "have no bias): set attention_bias to false")
    return unbuilt


def _main_model_config(config: ModelConfig) -> ModelConfig:
    """The config of the main model's parameters: without the MTP modules (counted apart,
    DeepSeek-V3 §2.2), and without YaRN and the RoPE layout, which hold no parameters."""
    return config.replace(rope_scaling=None, num_nextn_predict_layers=0, rope_interleave=True)


def _rope_dim(config: ModelConfig) -> int:
    """Channels RoPE rotates per head: all of them in MHA, the decoupled d_h^R part in MLA."""
    return config.qk_rope_head_dim if config.uses_mla else config.head_dim


class Transformer(nn.Module):
    """Decoder-only language model: tokens (B, T) -> next-token logits (B, T, vocab_size).

    Names follow DeepSeek-V3's inference code: ``embed``, ``layers``, ``norm``, ``head``.
    The head is untied from the embedding (HF ``tie_word_embeddings=False``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if unbuilt := _unbuilt_features(config):
            raise NotImplementedError("; ".join(unbuilt))
        self.config = config
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(
            Block(_make_attention(config), _make_ffn(config, i), d, config.rms_norm_eps)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_frequencies(_rope_dim(self.config), self.config.rope_theta)
        return rope_cos_sin(inv_freq, self.config.max_position_embeddings)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Linear and embedding weights ~ N(0, initializer_range^2), biases 0, norm gains 1."""
        if self.config.tie_word_embeddings:   # moving off the meta device replaces parameters: re-tie
            self.head.weight = self.embed.weight
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, Gate):    # router centroids e_i like any weight; the balancing bias b_i = 0
                module.weight.normal_(0.0, std, generator=generator)
                module.bias.zero_()
            elif isinstance(module, MoE):     # load counters: to_empty() left them uninitialised
                module.tokens_per_expert.zero_()
        cos, sin = self._rope_tables()
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> list:
        """One empty KV cache per layer for decoding up to max_len positions."""
        max_len = self.config.max_position_embeddings if max_len is None else max_len
        if not 0 < max_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_len ({max_len}) must be in [1, max_position_embeddings="
                             f"{self.config.max_position_embeddings}]")
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        return [layer.attn.new_cache(batch_size, max_len, device=device, dtype=dtype) for layer in self.layers]

    def _check_tokens(self, tokens: torch.Tensor, start_pos: int, cache: list | None) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch, seq_len) int64 tensor, got {got}")
        end = start_pos + tokens.shape[1]
        if start_pos < 0 or end > self.config.max_position_embeddings:
            raise ValueError(f"positions {start_pos}..{end - 1} exceed max_position_embeddings "
                             f"({self.config.max_position_embeddings}); use a shorter input or a larger config")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}; use model.new_cache()")
        if tokens.device.type != "meta" and tokens.numel() and not (
                0 <= int(tokens.min()) and int(tokens.max()) < self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, vocab_size={self.config.vocab_size}), "
                             f"got min {int(tokens.min())}, max {int(tokens.max())}")

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0, cache: list | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, d), before the output head."""
        self._check_tokens(tokens, start_pos, cache)
        end = start_pos + tokens.shape[1]
        rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, start_pos, None if cache is None else cache[i])
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: list | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for tokens (B, T) at positions start_pos..start_pos+T-1."""
        return self.head(self.hidden_states(tokens, start_pos, cache))


def build_model(config: ModelConfig | str, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, seed: int | None = None) -> Transformer:
    """Construct the model for ``config`` (a ModelConfig or a preset name / config path).

    On ``device="meta"`` no memory is allocated and no weights are initialised: use it to
    inspect shapes and count parameters of configurations too large to materialise.
    ``seed`` makes initialisation reproducible without touching the global RNG.
    Raises ``NotImplementedError`` (on every device) for a feature a later chapter builds,
    e.g. the ``deepseek-v3`` preset's YaRN and MTP; ``count_parameters`` still counts it.
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
        model = model.to(dtype)
        for module in model.modules():    # balancing state stays FP32: bf16 would round away bias
            if isinstance(module, Gate):  # updates of gamma = 0.001 (an FP32 buffer, §2.1.2) and
                module.bias.data = module.bias.data.float()   # miscount loads above 256 tokens
            elif isinstance(module, MoE):
                module.tokens_per_expert.data = module.tokens_per_expert.data.float()
    return model


@dataclass(frozen=True)
class ParameterCount:
    """Parameter totals of the main model: all of them, and those used for one token."""

    total: int
    activated: int
    embedding: int
    head: int

    def __str__(self) -> str:
        return (f"total {_human(self.total)} | activated per token {_human(self.activated)} "
                f"| embedding {_human(self.embedding)} | head {_human(self.head)}")


def _human(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def count_parameters(model_or_config: nn.Module | ModelConfig | str) -> ParameterCount:
    """Total and activated-per-token parameter counts (main model; the MTP module excluded).

    A config or preset name is built on the meta device first, so this works for 671B; its
    main model is counted, so YaRN and MTP, which later chapters build and which add no
    parameter to it, do not stop ``count_parameters("deepseek-v3")``.
    Activated = total minus the routed experts a token does not use (chapter 03); for a
    dense model the two are equal.
    """
    if isinstance(model_or_config, (ModelConfig, str)):
        config = load_config(model_or_config) if isinstance(model_or_config, str) else model_or_config
        model_or_config = build_model(_main_model_config(config), device="meta")
    model = model_or_config
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    embedding = model.embed.weight.numel() if hasattr(model, "embed") else 0
    head = model.head.weight.numel() if hasattr(model, "head") else 0
    return ParameterCount(total=total, activated=total - inactive, embedding=embedding, head=head)
