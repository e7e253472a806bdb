"""Checkpoints in and out: Hugging Face DeepSeek-V3 weights <-> deepseek_mini.

DeepSeek-V3's weights are published in the Hugging Face layout: a ``config.json`` and
``model.safetensors`` (or shards listed by ``model.safetensors.index.json``). Our modules keep
the official inference code's names instead (``wq_a``, ``wkv_b``, ``ffn.w1`` ...), so this
module is the one explicit adapter between the two (the torchtitan pattern):

============================================================  =====================================
Hugging Face (``model.layers.{i}.`` prefix inside a layer)     deepseek_mini (``layers.{i}.``)
============================================================  =====================================
``model.embed_tokens.weight``, ``model.norm.weight``,         ``embed.weight``, ``norm.weight``,
``lm_head.weight``                                            ``head.weight``
``input_layernorm``, ``post_attention_layernorm``             ``attn_norm``, ``ffn_norm``
``self_attn.q_a_proj``, ``q_a_layernorm``, ``q_b_proj``       ``attn.wq_a``, ``attn.q_norm``,
(or ``q_proj``)                                               ``attn.wq_b`` (or ``attn.wq``)
``self_attn.kv_a_proj_with_mqa``, ``kv_a_layernorm``,         ``attn.wkv_a``, ``attn.kv_norm``,
``kv_b_proj``, ``o_proj``                                     ``attn.wkv_b``, ``attn.wo``
``mlp.gate_proj``, ``up_proj``, ``down_proj`` (dense layer)   ``ffn.w1``, ``ffn.w3``, ``ffn.w2``
``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``     ``ffn.gate.weight``, ``ffn.gate.bias``
``mlp.shared_experts.{gate,up,down}_proj``                    ``ffn.shared_experts.w1/w3/w2``
``mlp.experts.{e}.{gate,up,down}_proj`` (released layout)     ``ffn.experts.w1[e]``, ``w3[e]``,
                                                              ``w2[e]``: stacked (E, out, in)
``mlp.experts.gate_up_proj`` (E, 2I, d), ``down_proj``        the same, fused in transformers 5.x:
(E, d, I)                                                     rows [0, I) of expert e are w1
**MTP module k** = layer ``n + k`` (n = num_hidden_layers):    ``mtp.{k}.`` prefix:
``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``       ``enorm``, ``hnorm``, ``eh_proj``,
                                                              ``shared_head.norm`` (same names)
its decoder-layer tensors (``self_attn.*``, ``mlp.*`` ...)    ``block.`` + the names above
``embed_tokens``, ``shared_head.head``: copies of             none: shared by reference; checked
``model.embed_tokens`` and ``lm_head``                        equal on load, written on save
============================================================  =====================================

The router bias ``e_score_correction_bias`` is b_i of DeepSeek-V3 §2.1.2 (eq. 16), kept in FP32.

Three details of the released checkpoint (arXiv 2412.19437; ``book/facts.md``):

* **FP8 weights.** The linear weights are stored in E4M3 with one FP32 ``weight_scale_inv`` per
  128 x 128 block (§3.3.2); the value is the block times its scale.
  :func:`deepseek_mini.fp8.quant.dequantize_weight` (chapter 05; also the MLA absorbed
  path's dequantiser) restores it while loading, one tensor at a time. A model whose linears store
  FP8 weights (``FP8Linear.store_fp8_``) is saved dequantised, in the model's dtype.
* **The MTP module** (§2.2) is stored as one more layer, ``model.layers.61`` (module k of D at
  ``num_hidden_layers + k``). Its ``eh_proj`` (d, 2d) multiplies [enorm(embedding); hnorm(h)],
  embedding first (columns ``[:, :d]``), which is what ``MTPModule`` computes, so it loads as
  it is; eq. 21 writes the other order. The layer also stores its own copies of the embedding
  and the output head (``embed_tokens``, ``shared_head.head``), equal to the main model's: our
  MTP modules use the main model's by reference, so the loader checks the copies and drops
  them, and the saver writes them back as the released files do. ``from_pretrained(dir,
  num_nextn_predict_layers=0)`` loads the main model alone.
* **RoPE layout.** Our RoPE rotates interleaved pairs (x0, x1), (x2, x3) ..., like the
  official code and transformers' ``rope_interleave=True``. A score q . k is unchanged when the
  same permutation reorders the rope channels of both q and k, so such checkpoints load as
  they are; one written with ``rope_interleave=False`` (pairs (x_j, x_{j+d/2})) has its rope
  rows of ``q_b_proj`` and ``kv_a_proj_with_mqa`` reordered into interleaved pairs on load.

Loading streams: the model is laid out on the meta device, allocated once (``to_empty``) and
filled tensor by tensor from the memory-mapped files, so the weights are never held twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_mini.config import ModelConfig
from deepseek_mini.fp8.quant import dequantize_weight
from deepseek_mini.model import Transformer, build_model

__all__ = ["from_pretrained", "save_pretrained", "hf_config_dict"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"            # "<name>.weight" -> "<name>.weight_scale_inv"
FP8_BLOCK = (128, 128)                 # §3.3.2: one weight scale per 128 x 128 block
MAX_SHARD_BYTES = 5 * 2**30            # transformers' default shard size
ExpertLayout = Literal["per_expert", "fused"]

# Hugging Face name -> ours, outside the decoder layers.
_TOP_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
# Inside layer i: "model.layers.{i}.<HF suffix>" -> "layers.{i}.<our suffix>".
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
}
_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # SwiGLU: w2(silu(w1 x) * w3 x)
_OUR_LAYER_NAMES = {ours: hf for hf, ours in _LAYER_NAMES.items()}
_OUR_TOP_NAMES = {ours: hf for hf, ours in _TOP_NAMES.items()}

# MTP module k is the checkpoint's layer num_hidden_layers + k (§2.2). Its own tensors keep their
# names under "mtp.{k}."; its decoder layer's take _LAYER_NAMES under "mtp.{k}.block.".
_MTP_NAMES = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
# The MTP layer's stored copies of the shared embedding and head -> the main tensor each must equal.
_MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_OUR_KEY_RE = re.compile(r"(?:layers\.(\d+)|mtp\.(\d+))\.(.+)")    # a decoder layer's or an MTP module's
_OUR_EXPERT_RE = re.compile(r"ffn\.experts\.(\d+)\.(w[123])\.weight")
_STACKED_RE = re.compile(r"((?:layers\.\d+|mtp\.\d+\.block)\.ffn\.experts)\.(w[123])")   # (E, out, in)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


# ----------------------------------------------------------------------------- FP8
def _dense_state(model: Transformer) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with FP8-stored linear weights dequantised and their scales dropped."""
    state = model.state_dict()
    for key in [k for k in state if k.endswith(".weight_scale_inv")]:
        prefix = key.removesuffix("weight_scale_inv")
        block = getattr(model.get_submodule(prefix[:-1]), "block", 128)
        state[prefix + "weight"] = dequantize_weight(state[prefix + "weight"], state.pop(key), block,
                                                     model.embed.weight.dtype)
    return state


def _per_expert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each stacked expert weight (E, out, in) split into E views, one per expert.

    Our MoE layers stack their routed experts (``GroupedExperts``: ``layers.{i}.ffn.experts.w1``,
    ``mtp.{k}.block.ffn.experts.w1`` in an MTP module);
    the released checkpoint names every expert. Under the per-expert names
    ``layers.{i}.ffn.experts.{e}.w1.weight`` (expert by expert, as N_r separate modules list them)
    each checkpoint tensor has one target, and copying into a view fills the stacked weight.
    """
    split: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _STACKED_RE.fullmatch(key)
        if match is None:
            split[key] = tensor
        elif match[2] == "w1":                      # the layer's first stacked weight: emit all experts
            for e in range(tensor.shape[0]):
                for name in ("w1", "w2", "w3"):
                    split[f"{match[1]}.{e}.{name}.weight"] = state[f"{match[1]}.{name}"][e]
    return split


# ------------------------------------------------------------------- config.json
def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config`` as a transformers 5.x ``DeepseekV3Config`` JSON object (``rope_parameters`` layout).

    Our ``greedy`` router is written as ``noaux_tc`` with one group (plain top-k of s_i + b_i),
    which is what it computes; a model without MoE layers gets ``first_k_dense_replace =
    num_hidden_layers`` and placeholder expert counts that build nothing (``from_pretrained``
    reads that as no MoE layer at all, the MTP layers included).
    """
    _check_exportable(config)
    rope = {"rope_type": "default"} if config.rope_scaling is None else {
        **{k: v for k, v in config.rope_scaling.items() if k != "type"},
        "rope_type": config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))}
    grouped = config.topk_method == "noaux_tc"
    moe = {
        "n_routed_experts": config.n_routed_experts, "n_shared_experts": config.n_shared_experts,
        "num_experts_per_tok": config.num_experts_per_tok, "moe_intermediate_size": config.moe_intermediate_size,
        "n_group": config.n_group if grouped else 1, "topk_group": config.topk_group if grouped else 1,
        "first_k_dense_replace": config.first_k_dense_replace,
    } if config.uses_moe else {
        "n_routed_experts": 1, "n_shared_experts": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 1,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": config.num_hidden_layers,
    }
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_attention_heads,
        "q_lora_rank": config.q_lora_rank, "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim, "qk_rope_head_dim": config.qk_rope_head_dim,
        "qk_head_dim": config.qk_head_dim, "head_dim": config.qk_rope_head_dim, "v_head_dim": config.v_head_dim,
        "attention_bias": False, "attention_dropout": 0.0,
        **moe,
        "routed_scaling_factor": config.routed_scaling_factor, "norm_topk_prob": config.norm_topk_prob,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "hidden_act": config.hidden_act, "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range, "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        "rope_interleave": config.rope_interleave,
        "tie_word_embeddings": config.tie_word_embeddings,
        "num_nextn_predict_layers": config.num_nextn_predict_layers,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _check_exportable(config: ModelConfig) -> None:
    """The DeepseekV3 checkpoint layout describes MLA with a sigmoid, bias-corrected router only."""
    if not config.uses_mla:
        raise ValueError("the DeepSeek-V3 checkpoint layout needs Multi-head Latent Attention "
                         "(kv_lora_rank set); this model uses baseline multi-head attention")
    if config.uses_moe and config.scoring_func != "sigmoid":
        raise ValueError(f"scoring_func ({config.scoring_func!r}): transformers' DeepseekV3 router uses "
                         "sigmoid affinities only (DeepSeek-V3 eq. 15)")
    scaling = config.rope_scaling or {}
    if scaling.get("type", scaling.get("rope_type")) == "ntk":
        raise ValueError("rope_scaling type 'ntk' (static NTK-aware scaling, chapter 07) has no transformers "
                         "equivalent (its 'dynamic' type rescales with the length): use 'yarn' or 'linear'")


def _checkpoint_config(raw: dict[str, Any], source: str, overrides: dict[str, Any]) -> tuple[ModelConfig, int, bool]:
    """The config (with ``overrides``), the checkpoint's MTP depth, and whether rope rows need interleaving."""
    config = ModelConfig.from_dict(raw, source=source)
    mtp_depth, interleaved = config.num_nextn_predict_layers, config.rope_interleave
    if not config.uses_mla:
        raise ValueError(f"{source}: no kv_lora_rank; DeepSeek-V3 checkpoints use Multi-head Latent Attention")
    if config.attention_bias:
        raise ValueError(f"{source}: attention_bias is true, but deepseek_mini's MLA has no projection "
                         "biases (DeepSeek-V3 uses none)")
    if config.uses_moe and (config.scoring_func, config.topk_method) != ("sigmoid", "noaux_tc"):
        raise ValueError(f"{source}: scoring_func {config.scoring_func!r} with topk_method {config.topk_method!r}; "
                         "the DeepseekV3 layout means sigmoid affinities with group-limited top-k ('noaux_tc')")
    config = config.replace(**{"rope_interleave": True, **overrides})
    return config, mtp_depth, not interleaved


def _config_to_build(config: ModelConfig, mtp_depth: int, layers: set[int], overrides: dict[str, Any]) -> ModelConfig:
    """``config`` with the MTP depth to build, given the decoder layers the checkpoint holds tensors of.

    The checkpoint's depth D when any MTP layer (``num_hidden_layers`` ..) is stored, none when
    none is: transformers writes ``num_nextn_predict_layers: 1`` into every DeepseekV3 config it
    saves and never saves an MTP layer. A ``num_nextn_predict_layers`` override decides instead.
    """
    n = config.num_hidden_layers
    if "num_nextn_predict_layers" not in overrides and not any(n <= layer < n + mtp_depth for layer in layers):
        config = config.replace(num_nextn_predict_layers=0)
    if config.uses_moe and "n_routed_experts" not in overrides and config.first_k_dense_replace >= n:
        # no main layer is MoE: the expert fields describe nothing (save_pretrained's placeholders),
        # and the MTP layers are dense too, though a reader going by layer index would make them MoE
        config = config.replace(n_routed_experts=None)
    return config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _checkpoint_dtype(raw: dict[str, Any]) -> torch.dtype:
    """The floating dtype config.json records (``dtype``, older ``torch_dtype``); float32 if none."""
    name = raw.get("dtype", raw.get("torch_dtype"))
    return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _fp8_block(raw: dict[str, Any], config_path: Path) -> tuple[int, int]:
    """The FP8 block of ``quantization_config.weight_block_size`` (128 x 128 when absent)."""
    quant = raw.get("quantization_config")
    if quant is None:
        return FP8_BLOCK
    if not isinstance(quant, dict):
        raise ValueError(f"{config_path}: quantization_config ({quant!r}) must be an object, "
                         'e.g. {"quant_method": "fp8", "weight_block_size": [128, 128]}')
    block = quant.get("weight_block_size", list(FP8_BLOCK))
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{config_path}: quantization_config.weight_block_size ({block!r}) must be "
                         "two positive integers (rows, columns), e.g. [128, 128]")
    return block[0], block[1]


# ----------------------------------------------------------------------- loading
def from_pretrained(directory: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", **overrides: Any) -> Transformer:
    """Load a Hugging Face DeepSeek-V3 checkpoint directory into a :class:`Transformer` (eval mode).

    Reads ``config.json`` (transformers 5.x or the older layout) and ``model.safetensors``
    or the shards of ``model.safetensors.index.json``, tensor by tensor. Both expert layouts
    load (fused 3-D or per expert) and FP8 weights are dequantised, in the MTP layers too.

    The MTP modules (§2.2; layers ``num_hidden_layers`` .. of the checkpoint) are built and loaded
    when the checkpoint stores them, with its depth D; their copies of the embedding and the head
    are checked equal to the main model's and dropped (the modules share those by reference).
    None are built when no MTP tensor is stored (transformers' own saves claim D = 1 without
    one). ``num_nextn_predict_layers=0`` (or any depth below D) drops the modules beyond it,
    silently: their tensors are not read.

    ``dtype`` defaults to the one config.json records (bfloat16 for DeepSeek-V3; float32 when
    absent). ``overrides`` replace config fields before building, e.g. ``attn_impl="naive"``.
    A checkpoint with ``rope_scaling`` (YaRN, chapter 07) is built with it.
    Raises ``ValueError`` naming the tensor and the file for a missing, unexpected or
    mis-shaped weight, and for an MTP copy of the embedding or head that differs from it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {str(directory)!r} does not exist (or is not a directory)")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face checkpoint directory")
    raw = _read_json(config_path)
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    if dtype is not None and dtype not in _DTYPES.values():
        raise ValueError(f"dtype ({dtype}) must be one of {', '.join(map(str, _DTYPES.values()))}")
    dtype = _checkpoint_dtype(raw) if dtype is None else dtype
    config, mtp_depth, permute_rope = _checkpoint_config(raw, f"config file {str(config_path)!r}", overrides)
    locations, where = _tensor_locations(directory)
    layers = {layer for name in locations if (layer := _layer_of(name)) is not None}
    config = _config_to_build(config, mtp_depth, layers, overrides)
    block = _fp8_block(raw, config_path)

    model = build_model(config, device="meta", dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:        # to_empty() made new parameters: tie the head again
        model.head.weight = model.embed.weight
    loader = _Loader(model, config, locations, where, mtp_depth, permute_rope, block)
    loader.load(directory)
    model.reset_buffers()
    return model.eval()


def _tensor_locations(directory: Path) -> tuple[dict[str, str], str]:
    """Tensor name -> file name, from model.safetensors or the sharded index; and what to call it."""
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: WEIGHTS_FILE for name in f.keys()}, str(single)
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' object naming each tensor's shard")
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise ValueError(f"{index} lists the shard {shard}, which is not in {directory}")
        return dict(weight_map), str(index)
    raise ValueError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")


class _Piece(NamedTuple):
    """Where part of a checkpoint tensor goes: our state key, the expert of a fused tensor, its rows."""

    key: str
    expert: int | None = None
    rows: slice | None = None


class _Loader:
    """Copies every checkpoint tensor into the model's state, with the checks that name it."""

    def __init__(self, model: Transformer, config: ModelConfig, locations: dict[str, str], where: str,
                 mtp_depth: int, permute_rope: bool, block: tuple[int, ...]) -> None:
        self.model, self.config, self.locations, self.where = model, config, locations, where
        self.permute_rope, self.block = permute_rope, block
        with torch.no_grad():                      # views of the stacked experts, filled in place
            self.targets = _per_expert_state(model.state_dict(keep_vars=True))
        self.pending = set(self.targets) - ({"head.weight"} if config.tie_word_embeddings else set())
        n, depth = config.num_hidden_layers, config.num_nextn_predict_layers
        self.dropped = set(range(n + depth, n + mtp_depth))     # MTP layers beyond the depth built: not read
        self.used_scales: set[str] = set()

    def load(self, directory: Path) -> None:
        by_file: dict[str, list[str]] = {}
        for name, file in self.locations.items():
            if _layer_of(name) not in self.dropped:
                by_file.setdefault(file, []).append(name)
        copies: list[tuple[str, str, str]] = []
        with ExitStack() as stack, torch.no_grad():
            handles: dict[str, Any] = {}

            def open_file(file: str):
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(directory / file), framework="pt"))
                return handles[file]

            for file, names in by_file.items():
                for name in sorted(names):
                    if name.endswith(SCALE_SUFFIX):
                        continue
                    if (shared := self._shared_copy(name)) is not None:
                        copies.append((name, file, shared))      # checked once the main tensor is in
                    else:
                        self._load_tensor(name, file, open_file)
            if self.pending:
                missing = [_hf_name(key, self.config) for key in self.targets if key in self.pending]
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ValueError(f"missing tensor {missing[0]}{more} in {self.where}")
            for name, file, shared in copies:
                self._check_copy(name, file, shared, open_file)
        unused = sorted(s for s in self.locations if s.endswith(SCALE_SUFFIX) and s not in self.used_scales
                        and _layer_of(s) not in self.dropped)
        if unused:
            raise ValueError(f"unexpected tensor {unused[0]} in {self.where}: a scale without an FP8 weight "
                             f"{unused[0].removesuffix(SCALE_SUFFIX)}")

    def _shared_copy(self, name: str) -> str | None:
        """The main tensor (our key) that MTP tensor ``name`` is a stored copy of, if it is one."""
        match = _LAYER_RE.fullmatch(name)
        if match is None or match[2] not in _MTP_COPIES:
            return None
        n = self.config.num_hidden_layers
        return _MTP_COPIES[match[2]] if n <= int(match[1]) < n + self.config.num_nextn_predict_layers else None

    def _check_copy(self, name: str, file: str, shared: str, open_file: Callable[[str], Any]) -> None:
        """An MTP layer's copy of the embedding or head must equal the main model's: we keep one, shared."""
        handle = open_file(file)
        view, target = handle.get_slice(name), self.targets[shared]
        shape = tuple(view.get_shape())
        if shape != tuple(target.shape):
            raise ValueError(f"tensor {name} in {file} has shape {shape}, expected {tuple(target.shape)} "
                             f"(a copy of {_hf_name(shared, self.config)})")
        scales = self._scales(name, file, view.get_dtype(), open_file)
        value = self._dequantised(handle.get_tensor(name), scales, None, name, file)
        if not torch.equal(value.to(device=target.device, dtype=target.dtype), target):
            raise ValueError(f"tensor {name} in {file} differs from {_hf_name(shared, self.config)}: deepseek_mini's "
                             "MTP modules share the main model's embedding and head (DeepSeek-V3 §2.2), so a "
                             "stored copy must equal it; pass num_nextn_predict_layers=0 to load the main model only")

    def _scales(self, name: str, file: str, dtype: str, open_file: Callable[[str], Any]) -> Any:
        """The ``weight_scale_inv`` slice of an FP8 tensor ``name`` (None if not FP8), with the checks."""
        scale_name = name + SCALE_SUFFIX
        fp8 = dtype.startswith("F8")
        if fp8 and scale_name not in self.locations:
            raise ValueError(f"FP8 tensor {name} in {file} has no {scale_name} to dequantise it with")
        if not fp8 and scale_name in self.locations:
            raise ValueError(f"unexpected tensor {scale_name} in {self.where}: {name} is not FP8 "
                             f"(dtype {dtype})")
        if not fp8:
            return None
        self.used_scales.add(scale_name)
        return open_file(self.locations[scale_name]).get_slice(scale_name)

    def _dequantised(self, value: torch.Tensor, scales: Any, expert: int | None, name: str,
                     file: str) -> torch.Tensor:
        """``value`` times its FP8 block scales (those of ``expert`` in a fused tensor); as is if not FP8."""
        if scales is None:
            return value
        scale = scales[expert] if expert is not None else scales[:]
        try:
            return dequantize_weight(value, scale, self.block)
        except ValueError as exc:
            raise ValueError(f"tensor {name} in {file}: {exc}") from None

    def _load_tensor(self, name: str, file: str, open_file: Callable[[str], Any]) -> None:
        handle = open_file(file)
        view = handle.get_slice(name)
        pieces = self._pieces(name, file, tuple(view.get_shape()))
        if not pieces:
            return
        shape, expected = tuple(view.get_shape()), self._expected_shape(name, pieces)
        if shape != expected:
            raise ValueError(f"tensor {name} in {file} has shape {shape}, expected {expected} "
                             f"(for {pieces[0].key}{' ...' if len(pieces) > 1 else ''})")
        scales = self._scales(name, file, view.get_dtype(), open_file)
        fused = pieces[0].expert is not None
        for expert in range(self.config.n_routed_experts) if fused else [None]:
            # fused layout: read one expert at a time, never the whole (E, 2I, d) tensor
            value = view[expert] if expert is not None else handle.get_tensor(name)
            value = self._dequantised(value, scales, expert, name, file)
            for piece in pieces:
                if piece.expert == expert:
                    self._copy(piece.key, value if piece.rows is None else value[piece.rows], name)

    def _pieces(self, name: str, file: str, shape: tuple[int, ...]) -> list[_Piece]:
        """The parts of our state that checkpoint tensor ``name`` fills (none: skip it)."""
        config = self.config
        if name in _TOP_NAMES:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                return []                         # tied: the head is the embedding
            return [_Piece(_TOP_NAMES[name])]
        match = _LAYER_RE.fullmatch(name)
        if match is None:
            raise ValueError(f"unexpected tensor {name} in {file}: no deepseek_mini parameter corresponds to it")
        layer, suffix = int(match[1]), match[2]
        n, depth = config.num_hidden_layers, config.num_nextn_predict_layers
        if layer >= n + depth:
            raise ValueError(f"unexpected tensor {name} in {file}: the model that config.json describes has "
                             f"{n} layers and {depth} MTP layers (num_nextn_predict_layers), so no layer {layer}")
        mtp = layer >= n                          # MTP module layer - n (§2.2): its own tensors, then a block
        if mtp and suffix in _MTP_NAMES:
            return [_Piece(f"mtp.{layer - n}.{suffix}")]
        prefix = f"mtp.{layer - n}.block." if mtp else f"layers.{layer}."
        if suffix in _FUSED and config.is_moe_layer(layer):
            inter = config.moe_intermediate_size
            if suffix == "mlp.experts.down_proj":
                return [_Piece(f"{prefix}ffn.experts.{e}.w2.weight", e) for e in range(config.n_routed_experts)]
            return [piece for e in range(config.n_routed_experts)       # (E, 2I, d): gate rows first
                    for piece in (_Piece(f"{prefix}ffn.experts.{e}.w1.weight", e, slice(0, inter)),
                                  _Piece(f"{prefix}ffn.experts.{e}.w3.weight", e, slice(inter, 2 * inter)))]
        if (expert := _EXPERT_RE.fullmatch(suffix)) is not None:
            key = f"{prefix}ffn.experts.{expert[1]}.{_EXPERT_NAMES[expert[2]]}.weight"
        elif suffix.startswith("mlp.shared_experts.") and 0 in shape and config.n_shared_experts == 0:
            return []                             # transformers builds zero-width shared experts for N_s = 0
        elif suffix in _LAYER_NAMES:
            key = prefix + _LAYER_NAMES[suffix]
        else:
            raise ValueError(f"unexpected tensor {name} in {file}: no deepseek_mini parameter corresponds to it")
        if key not in self.targets:
            raise ValueError(f"unexpected tensor {name} in {file}: the model that config.json describes "
                             f"has no {key}")
        return [_Piece(key)]

    def _expected_shape(self, name: str, pieces: list[_Piece]) -> tuple[int, ...]:
        """The checkpoint shape: our parameter's, or (E, 2I, d) / (E, d, I) for fused experts."""
        first = tuple(self.targets[pieces[0].key].shape)
        if pieces[0].expert is None:
            return first
        rows = first[0] * (2 if name.endswith("gate_up_proj") else 1)
        return (self.config.n_routed_experts, rows, first[1])

    def _copy(self, key: str, value: torch.Tensor, name: str) -> None:
        if key not in self.pending:
            raise ValueError(f"tensor {name} in {self.where} loads {key} a second time: the checkpoint mixes "
                             "the fused and the per-expert layouts, or repeats a tensor")
        if self.permute_rope and key.endswith(("attn.wq.weight", "attn.wq_b.weight", "attn.wkv_a.weight")):
            value = _interleave_rope_rows(value, key, self.config)
        self.targets[key].copy_(value)
        self.pending.discard(key)


def _layer_of(name: str) -> int | None:
    match = _LAYER_RE.fullmatch(name)
    return int(match[1]) if match else None


def _interleave_rope_rows(weight: torch.Tensor, key: str, config: ModelConfig) -> torch.Tensor:
    """Reorder the rope output rows from half-split pairs (j, j + d/2) to interleaved (2j, 2j + 1).

    Applied to the query and to the shared rope key alike, so q . k is the same sum in a new order.
    """
    dr = config.qk_rope_head_dim
    order = torch.arange(dr).view(2, dr // 2).t().flatten()          # [0, d/2, 1, d/2 + 1, ...]
    if key.endswith("wkv_a.weight"):                                 # rows: [c_kv (d_c); k_rope (d_h^R)]
        return torch.cat([weight[:-dr], weight[-dr:][order]])
    per_head = weight.view(config.num_attention_heads, config.qk_head_dim, -1)   # rows: per head [nope; rope]
    nope, rope = per_head.split([config.qk_nope_head_dim, dr], dim=1)
    return torch.cat([nope, rope[:, order]], dim=1).flatten(0, 1)


# ------------------------------------------------------------------------ saving
def _hf_name(key: str, config: ModelConfig) -> str:
    """Our state key -> its Hugging Face name in the released (per-expert) layout.

    MTP module k (``mtp.{k}.``) is the checkpoint's layer ``num_hidden_layers + k`` (§2.2).
    """
    if key in _OUR_TOP_NAMES:
        return _OUR_TOP_NAMES[key]
    match = _OUR_KEY_RE.fullmatch(key)
    if match is not None:
        layer_id, module, suffix = match.groups()
        if module is not None:
            prefix = f"model.layers.{config.num_hidden_layers + int(module)}."
            if suffix in _MTP_NAMES:
                return prefix + suffix
            suffix = suffix.removeprefix("block.") if suffix.startswith("block.") else ""
        else:
            prefix = f"model.layers.{layer_id}."
        if (expert := _OUR_EXPERT_RE.fullmatch(suffix)) is not None:
            hf = {ours: hf for hf, ours in _EXPERT_NAMES.items()}[expert[2]]
            return f"{prefix}mlp.experts.{expert[1]}.{hf}.weight"
        if suffix in _OUR_LAYER_NAMES:
            return prefix + _OUR_LAYER_NAMES[suffix]
    raise ValueError(f"{key} has no name in the DeepSeek-V3 checkpoint layout")


def _hf_tensors(model: Transformer, layout: ExpertLayout) -> Iterator[tuple[str, Callable[[], torch.Tensor], int]]:
    """(Hugging Face name, a function making the tensor, its size in bytes), in state-dict order.

    Each MTP layer ends with the copies of the embedding and head that the released files store.
    """
    config = model.config
    state = _per_expert_state(_dense_state(model))
    for key, tensor in state.items():
        if key == "head.weight" and config.tie_word_embeddings:
            continue
        name = _hf_name(key, config)
        expert = _OUR_EXPERT_RE.search(key)
        if expert is None or layout == "per_expert":
            yield name, (lambda t=tensor: t), tensor.numel() * tensor.element_size()
        elif expert[1] == "0" and expert[2] == "w1":       # the layer's first expert: write the fused pair
            moe = model.get_submodule(key[:expert.start()] + "ffn")
            prefix = name[:name.index("mlp.experts.")] + "mlp.experts."
            size = sum(p.numel() * p.element_size() for p in moe.experts.parameters())
            gate_up = lambda m=moe: torch.cat([m.experts.w1, m.experts.w3], dim=1)   # noqa: E731  (E, 2I, d)
            yield prefix + "gate_up_proj", gate_up, size * 2 // 3
            yield prefix + "down_proj", lambda m=moe: m.experts.w2, size // 3
        if key.endswith("ffn.gate.bias") and config.n_shared_experts == 0:
            # transformers builds a zero-width shared expert for N_s = 0: give it its empty tensors
            d, dtype = config.hidden_size, model.embed.weight.dtype
            prefix = name.removesuffix("gate.e_score_correction_bias") + "shared_experts."
            for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                yield f"{prefix}{proj}.weight", (lambda s=shape: torch.empty(s, dtype=dtype)), 0
        if key.startswith("mtp.") and key.endswith(".shared_head.norm.weight"):   # the module's last tensor
            layer_prefix = name.removesuffix("shared_head.norm.weight")
            for stored, shared in _MTP_COPIES.items():     # real copies: safetensors refuses shared memory
                weight = model.get_parameter(shared)
                yield (layer_prefix + stored, lambda w=weight: w.detach().to("cpu", copy=True),
                       weight.numel() * weight.element_size())


def save_pretrained(model: Transformer, directory: str | Path, expert_layout: ExpertLayout = "per_expert",
                    max_shard_size: int = MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face DeepSeek-V3 checkpoint that transformers 5.x loads.

    ``config.json`` in the transformers 5.x layout, and ``model.safetensors`` (or shards of at
    most ``max_shard_size`` bytes with ``model.safetensors.index.json``). ``expert_layout``
    ``"per_expert"`` writes the released names (what transformers itself saves, and what the
    official code and other runtimes read); ``"fused"`` writes transformers' in-memory 3-D
    tensors, built one shard at a time. Files of an earlier checkpoint in ``directory`` are
    refused unless ``overwrite=True``, which replaces them; other files (a tokenizer) are kept.
    Every file is written under a temporary name and renamed into place only once all are
    written, so a failed save (a full disk, Ctrl-C) leaves the earlier checkpoint whole; its
    files the new one does not reuse (other shards, the index) are deleted last.
    Returns the directory.
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"save_pretrained needs a deepseek_mini Transformer, got {type(model).__name__}")
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout ({expert_layout!r}) must be 'per_expert' or 'fused'")
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"max_shard_size ({max_shard_size!r}) must be a positive number of bytes")
    if model.embed is None or model.head is None or len(model.layers) != model.config.num_hidden_layers:
        raise ValueError(f"save_pretrained needs the whole model, got a pipeline stage holding layers "
                         f"{list(model.layers)}{'' if model.embed is not None else ' without the embedding'}"
                         f"{'' if model.head is not None else ' without the head'}; save each stage's "
                         "state_dict() instead, or the model before cutting it")
    if model.embed.weight.is_meta:
        raise ValueError("the model is on the meta device: it has no weights to save")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    old = [directory / CONFIG_FILE, directory / INDEX_FILE, *directory.glob("model*.safetensors")]
    old = [path for path in old if path.is_file()]
    if old and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint ({old[0].name}); "
                              "pass overwrite=True to replace it")
    config = hf_config_dict(model.config, model.embed.weight.dtype)
    directory.mkdir(parents=True, exist_ok=True)

    shards: list[list[tuple[str, Callable[[], torch.Tensor]]]] = [[]]
    shard_bytes, total = 0, 0
    for name, make, size in _hf_tensors(model, expert_layout):
        if shards[-1] and shard_bytes + size > max_shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, make))
        shard_bytes, total = shard_bytes + size, total + size
    names = [WEIGHTS_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written: dict[str, Path] = {}        # final name -> the temporary file holding it
    try:
        weight_map = {}
        for file, shard in zip(names, shards):
            tensors = {name: make().detach().cpu().contiguous() for name, make in shard}
            written[file] = _temporary_file(directory, file)
            save_file(tensors, str(written[file]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            del tensors
        texts = {INDEX_FILE: json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                        indent=2) + "\n"} if len(shards) > 1 else {}
        texts[CONFIG_FILE] = json.dumps(config, indent=2) + "\n"
        for file, text in texts.items():
            written[file] = _temporary_file(directory, file)
            written[file].write_text(text)
    except BaseException:                # the earlier checkpoint is untouched: drop the partial new one
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise
    for file, tmp in written.items():    # config.json last: dict order
        os.replace(tmp, directory / file)
    for path in old:
        if path.name not in written:
            path.unlink()
    return directory


def _temporary_file(directory: Path, name: str) -> Path:
    """A unique hidden name in ``directory`` to write ``name`` under before renaming it.

    Hidden and ending in ``.tmp``, so a leftover (a killed process) is never read as a
    checkpoint file; unique per process and call, so two saves never write one file.
    """
    return directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
