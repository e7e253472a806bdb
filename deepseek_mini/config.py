"""Model configuration: one dataclass, named presets, validation in one place.

Every architectural choice of DeepSeek-V3 is a *field* here, never inferred from a
size (the official inference code decides some features by ``dim == 7168``; we do not).
Field names follow Hugging Face ``DeepseekV3Config`` so an HF ``config.json`` loads
as-is; the official repository's ``inference/configs/config_671B.json`` (``dim``,
``n_layers``, ``route_scale`` ...) loads through an explicit name map.

Switches:

* ``kv_lora_rank is None``  -> baseline multi-head attention (chapter 01, GQA when
  ``num_key_value_heads < num_attention_heads``); set -> Multi-head Latent Attention
  (chapter 02, DeepSeek-V3 §2.1.1).
* ``n_routed_experts is None`` -> dense SwiGLU FFN in every layer; set -> DeepSeekMoE
  from layer ``first_k_dense_replace`` on (chapter 03, §2.1.2).
* ``num_nextn_predict_layers`` -> Multi-Token Prediction depth D (chapter 04, §2.2).
* ``rope_scaling`` -> context extension (chapter 07): YaRN (``"yarn"``, DeepSeek-V3 §4.3), Position
  Interpolation (``"linear"``) or static NTK-aware scaling (``"ntk"``).

No field is silently ignored: ``build_model`` raises ``NotImplementedError`` for what it
does not build (``attention_bias`` with MLA); the fields that build nothing are listed, with reasons, in
``METADATA_FIELDS``. A config *file* must give every size (``hidden_size`` ...) with the
right JSON type; a missing one is an error, never the toy's default.

Presets: ``"toy"`` is a small DeepSeek (MLA + DeepSeekMoE) that trains on a laptop CPU in
minutes; ``"toy-dense"`` is chapter 01's baseline (MHA, dense FFN) and ``"toy-mla"`` chapter
02's (MLA, dense FFN) on the same trunk; ``"mini"`` is a dense baseline for one GPU in bf16;
``"deepseek-v3"`` is the 671B model with every value from the official config (arXiv
2412.19437 §4.2; ``config_671B.json``; HF ``config.json``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

__all__ = ["ModelConfig", "PRESETS", "METADATA_FIELDS", "load_config", "preset_names"]

AttnImpl = Literal["naive", "absorb"]
# HF DeepseekV3/V2 router variants: "noaux_tc" (V3, bias-corrected group-limited top-k),
# "group_limited_greedy" (V2), "greedy" (plain top-k).
_TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")

# The ModelConfig fields that build nothing, each with the reason it is kept. Every other
# field changes the model build_model() returns, or makes it refuse a feature a later chapter
# builds; tests/test_model.py fails for a field that is neither.
METADATA_FIELDS: dict[str, str] = {
    "hidden_act": "validate() admits only 'silu', the SwiGLU that layers.MLP always builds; kept so "
                  "HF config.json files load and say so",
    "bos_token_id": "tokenizer metadata: the model reads token ids, never these; data.py's byte "
                    "tokenizer defines the ids the course uses",
    "eos_token_id": "tokenizer metadata: generate() takes the stop token as an argument",
    "pad_token_id": "tokenizer metadata: batching and the loss decide what padding means",
}

# Sizes without a neutral default: a config *file* must give them (the constructor and the
# presets keep the toy's defaults). A switch that is off by default (None, 0, 1, 1.0: no MLA,
# no MoE, no query compression, no shared experts, no groups) may be left out; a feature a
# file switches on brings its own sizes.
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_REQUIRED_DENSE = ("intermediate_size",)                            # some layer has a dense FFN
_REQUIRED_TRUNK_TAIL = ("max_position_embeddings",)
_REQUIRED_MLA = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")   # kv_lora_rank set
_REQUIRED_MOE = ("moe_intermediate_size", "num_experts_per_tok")         # n_routed_experts set


@dataclass
class ModelConfig:
    """Hyperparameters of a DeepSeek-style decoder, with HF ``DeepseekV3Config`` names.

    Paper symbols: ``hidden_size`` = d, ``num_attention_heads`` = n_h,
    ``kv_lora_rank`` = d_c, ``q_lora_rank`` = d'_c, ``qk_rope_head_dim`` = d_h^R,
    ``qk_nope_head_dim`` = ``v_head_dim`` = d_h, ``n_routed_experts`` = N_r,
    ``n_shared_experts`` = N_s, ``num_experts_per_tok`` = K_r,
    ``num_nextn_predict_layers`` = D (DeepSeek-V3 §2).
    """

    # --- trunk ---
    vocab_size: int = 260
    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 384  # dense SwiGLU FFN width
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512

    # --- attention (baseline MHA/GQA uses heads + kv heads; MLA uses the lora ranks) ---
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None = num_attention_heads (plain MHA)
    attention_bias: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attn_impl: AttnImpl = "absorb"

    # --- RoPE / YaRN ---
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True

    # --- DeepSeekMoE ---
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"

    # --- Multi-Token Prediction ---
    num_nextn_predict_layers: int = 0

    # --- special tokens ---
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def uses_mla(self) -> bool:
        """Multi-head Latent Attention instead of MHA (set by ``kv_lora_rank``)."""
        return self.kv_lora_rank is not None

    @property
    def uses_moe(self) -> bool:
        """DeepSeekMoE layers from ``first_k_dense_replace`` on (set by ``n_routed_experts``)."""
        return self.n_routed_experts is not None

    @property
    def head_dim(self) -> int:
        """Per-head width of the baseline attention: d / n_h."""
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """MLA query/key width per head: d_h + d_h^R (192 in DeepSeek-V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layer ``layer_id`` (0-based) uses MoE: the first ``first_k_dense_replace`` stay dense."""
        return self.uses_moe and layer_id >= self.first_k_dense_replace

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and what would be valid."""
        _check_field_types(vars(self))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _require_positive_int(self, name)
        for name in ("rms_norm_eps", "initializer_range", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} ({value!r}) must be a positive number")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act ({self.hidden_act!r}) must be 'silu': DeepSeek-V3 uses SwiGLU")
        if self.attn_impl not in ("naive", "absorb"):
            raise ValueError(f"attn_impl ({self.attn_impl!r}) must be 'naive' or 'absorb'")
        for name in ("tie_word_embeddings", "attention_bias", "rope_interleave", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be true or false")
        self._validate_attention()
        self._validate_moe()
        self._validate_rope_scaling()
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            raise ValueError(f"num_nextn_predict_layers ({self.num_nextn_predict_layers!r}) "
                             "must be an integer >= 0 (DeepSeek-V3 uses 1)")
        if self.topk_method not in _TOPK_METHODS:
            raise ValueError(f"topk_method ({self.topk_method!r}) must be one of {_TOPK_METHODS} "
                             "(DeepSeek-V3 uses 'noaux_tc': top-k of s_i + b_i within the kept groups)")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func ({self.scoring_func!r}) must be 'sigmoid' "
                             "(DeepSeek-V3, eq. 15) or 'softmax' (DeepSeek-V2)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise ValueError(f"{name} ({value!r}) must be None or an id in [0, vocab_size={self.vocab_size})")

    def _validate_attention(self) -> None:
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if kv > h or h % kv != 0:
            divisors = [d for d in range(1, h + 1) if h % d == 0]
            raise ValueError(f"num_key_value_heads ({kv}) must divide num_attention_heads ({h}); "
                             f"valid values: {divisors}")
        if not self.uses_mla:
            if self.hidden_size % h != 0:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({h}) for baseline attention")
            if self.head_dim % 2 != 0:
                raise ValueError(f"head_dim = hidden_size / num_attention_heads ({self.head_dim}) "
                                 "must be even: RoPE rotates pairs of channels")
            return
        _require_positive_int(self, "kv_lora_rank")
        if self.kv_lora_rank >= self.hidden_size:
            raise ValueError(f"kv_lora_rank ({self.kv_lora_rank}) must be < hidden_size "
                             f"({self.hidden_size}): the latent c_kv compresses the hidden state")
        if self.q_lora_rank is not None:
            _require_positive_int(self, "q_lora_rank")
            if self.q_lora_rank >= self.hidden_size:
                raise ValueError(f"q_lora_rank ({self.q_lora_rank}) must be < hidden_size "
                                 f"({self.hidden_size}), or None for a direct query projection")
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require_positive_int(self, name)
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: "
                             "RoPE rotates pairs of channels")
        if kv != h:
            raise ValueError(f"num_key_value_heads ({kv}) must equal num_attention_heads ({h}) "
                             "with MLA: every head gets its own key and value from c_kv")

    def _validate_moe(self) -> None:
        if not self.uses_moe:
            return
        for name in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                     "moe_intermediate_size"):
            _require_positive_int(self, name)
        n, k = self.n_routed_experts, self.num_experts_per_tok
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts ({self.n_shared_experts!r}) must be an integer >= 0")
        if n % self.n_group != 0:
            valid = [g for g in range(1, n + 1) if n % g == 0]
            raise ValueError(f"n_routed_experts ({n}) must be divisible by n_group "
                             f"({self.n_group}); valid n_group values: {valid}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        kept = self.topk_group * (n // self.n_group)
        if k > kept:
            raise ValueError(f"num_experts_per_tok ({k}) must be <= the experts in the kept groups: "
                             f"topk_group * n_routed_experts / n_group = {kept}")
        if not (isinstance(self.first_k_dense_replace, int)
                and 0 <= self.first_k_dense_replace <= self.num_hidden_layers):
            raise ValueError(f"first_k_dense_replace ({self.first_k_dense_replace!r}) must be in "
                             f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor ({self.routed_scaling_factor}) must be > 0")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ValueError(f"rope_scaling ({rs!r}) must be None or a dict like "
                             "{'type': 'yarn', 'factor': 40, 'original_max_position_embeddings': 4096}")
        kind = rs.get("type", rs.get("rope_type"))
        if kind not in ("yarn", "linear", "ntk"):
            raise ValueError(f"rope_scaling type ({kind!r}) must be 'yarn' (DeepSeek-V3 §4.3), 'linear' "
                             "(Position Interpolation) or 'ntk' (static NTK-aware scaling)")
        factor = rs.get("factor")
        if not _is_number(factor) or not factor >= 1:
            raise ValueError(f"rope_scaling['factor'] ({factor!r}) must be a number >= 1 (DeepSeek-V3: 40)")
        if kind != "yarn":
            return
        orig = rs.get("original_max_position_embeddings")
        if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
            raise ValueError(f"rope_scaling['original_max_position_embeddings'] ({orig!r}) "
                             "must be a positive integer (DeepSeek-V3: 4096)")
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = rs.get(key, 1)
            if not _is_number(value):
                raise ValueError(f"rope_scaling[{key!r}] ({value!r}) must be a number")
        beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
        if not beta_fast > beta_slow > 0:
            raise ValueError(f"rope_scaling needs beta_fast ({beta_fast}) > beta_slow ({beta_slow}) > 0")

    # ------------------------------------------------------------------ JSON I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON (HF field names); write to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from HF names; an official ``config_671B.json`` (``dim``, ``n_layers``...) is mapped.

        Unknown keys raise ``ValueError`` with a suggestion, so a typo never passes silently.
        Keys HF configs carry that do not change the architecture are ignored. A missing size
        (``hidden_size`` ...) is an error, not the toy's default; a value of the wrong JSON type
        (``"512"``, ``512.0`` or ``true`` for an int) is an error; an int where a float is
        expected (``"rope_theta": 10000``) is converted.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "dim" in data and "n_layers" in data:
            _check_required_official(data, source)
            data = _from_official(data, source)
        data = _from_hf(data, source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known and k not in _IGNORED_HF_KEYS)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown config field(s) {', '.join(hints)}")
        _check_required(data, source)
        kwargs = _check_json_types({k: v for k, v in data.items() if k in known}, source)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist (or is not a file); "
                             f"presets: {', '.join(preset_names())}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=f"config file {str(path)!r}")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in fields(self)}
        for key in changes:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown config field {key!r}{hint}")
        return dataclasses.replace(self, **changes)


def _is_number(value: Any) -> bool:
    """An int or a float; ``true``/``false`` are not numbers (JSON has no other number type)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_positive_int(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} ({value!r}) must be a positive integer")


_TYPE_WORDS = {int: "an int", float: "a number", bool: "a bool (true or false)", str: "a string",
               dict: "a dict"}


@functools.cache
def _field_types() -> dict[str, tuple[tuple[type, ...], str]]:
    """Per field, from its annotation: the accepted Python types and how to name them."""
    out = {}
    for name, hint in typing.get_type_hints(ModelConfig).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        accepted = []
        for arg in typing.get_args(hint) if union else (hint,):
            base = typing.get_origin(arg) or arg                 # dict[str, Any] -> dict
            if base is Literal:                                  # AttnImpl -> str
                base = type(typing.get_args(arg)[0])
            accepted.append(base)
        words = [_TYPE_WORDS[t] for t in accepted if t is not type(None)]
        out[name] = (tuple(accepted), " or ".join(words + ["null"] * (type(None) in accepted)))
    return out


def _type_error(name: str, value: Any, shown: str | None = None) -> str | None:
    """Why ``value`` has the wrong type for field ``name`` (None if it is fine).

    JSON has one number type, so an int is accepted where a float is expected; the reverse is
    refused, integral or not (``"num_hidden_layers": 2.0`` is a bug in whatever wrote it, and
    a count must not be silently rounded). ``true``/``false`` are never numbers. ``shown`` is
    the name the message uses (an official-format key such as ``n_layers``).
    """
    accepted, words = _field_types()[name]
    if isinstance(value, bool):
        ok = bool in accepted
    elif isinstance(value, int) and float in accepted:
        ok = True
    else:
        ok = isinstance(value, accepted)
    if ok:
        return None
    got = "null" if value is None else f"{type(value).__name__} {value!r}"
    return f"{shown or name} must be {words}, got {got}"


def _check_field_types(values: dict[str, Any], source: str | None = None) -> None:
    """Raise ``ValueError`` for the first field whose value has the wrong type."""
    for name, value in values.items():
        if name in _field_types() and (error := _type_error(name, value)):
            raise ValueError(f"{source}: {error}" if source else error)


def _check_json_types(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check the types of a JSON config's values; return them with ints in float fields as floats."""
    _check_field_types(values, source)
    floats = {name for name, (accepted, _) in _field_types().items() if float in accepted}
    return {k: float(v) if k in floats and isinstance(v, int) else v for k, v in values.items()}


def _missing(source: str, names: list[str]) -> ValueError:
    plural = "s" if len(names) > 1 else ""
    return ValueError(f"{source} lacks required field{plural} {', '.join(names)}; a config file must "
                      "give every size (the defaults are the toy's, not the file's model)")


def _check_required(data: dict[str, Any], source: str) -> None:
    """A config file names every size of its model (see ``_REQUIRED_FIELDS``)."""
    moe = data.get("n_routed_experts") is not None
    required = list(_REQUIRED_FIELDS)
    if not moe or data.get("first_k_dense_replace", 0) != 0:    # some layer keeps the dense FFN
        required += _REQUIRED_DENSE
    required += _REQUIRED_TRUNK_TAIL
    if data.get("kv_lora_rank") is not None:
        required += _REQUIRED_MLA
    if moe:
        required += _REQUIRED_MOE
    missing = [repr(name) for name in required if name not in data]
    if missing:
        raise _missing(source, missing)


# Sizes an official ModelArgs JSON must give: its code always builds MLA and MoE, and the
# ModelArgs defaults for them describe a different (16B-like) model.
_OFFICIAL_REQUIRED = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers",
                      "n_heads", "n_routed_experts", "n_shared_experts", "n_activated_experts",
                      "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _check_required_official(data: dict[str, Any], source: str) -> None:
    missing = [f"{name!r} ({_OFFICIAL_TO_HF[name]})" for name in _OFFICIAL_REQUIRED if name not in data]
    if missing:
        raise _missing(source, missing)


# Keys found in HF DeepSeek-V3 config.json files that do not change the architecture
# we build (bookkeeping, or settings of later chapters kept in the checkpoint loader).
_IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "quantization_config", "aux_loss_alpha", "seq_aux",
    "ep_size", "moe_layer_freq", "attention_dropout", "head_dim", "_name_or_path",
})

# transformers 5.x writes these DeepseekV3Config keys: runtime switches (what a forward pass
# returns), label bookkeeping, and values derived from other fields; none builds anything.
_HF_RUNTIME_KEYS = frozenset({
    "output_router_logits", "router_aux_loss_coef", "output_hidden_states", "output_attentions",
    "return_dict", "id2label", "label2id", "problem_type", "tokenizer_class",
    "chunk_size_feed_forward", "is_encoder_decoder",
})


def _from_hf(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map a transformers 5.x ``DeepseekV3Config`` JSON onto our fields (HF names otherwise).

    * ``rope_parameters`` (``{"rope_type": "default" | "yarn", "rope_theta": ..., ...}``)
      becomes ``rope_theta`` plus ``rope_scaling`` (None for ``"default"``); the older
      layout, top-level ``rope_theta`` and ``rope_scaling``, passes through unchanged.
    * ``qk_head_dim`` is derived (d_h + d_h^R): checked, then dropped.
    * ``num_mtp_layers`` is transformers' alias of ``num_nextn_predict_layers``.
    * runtime keys (``output_router_logits`` ...) are dropped.
    """
    data = {k: v for k, v in data.items() if k not in _HF_RUNTIME_KEYS}
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    if "num_mtp_layers" in data:
        depth = data.pop("num_mtp_layers")
        if data.setdefault("num_nextn_predict_layers", depth) != depth:
            raise ValueError(f"{source}: num_mtp_layers ({depth!r}) and num_nextn_predict_layers "
                             f"({data['num_nextn_predict_layers']!r}) disagree; they name the same field")
    if "rope_parameters" in data:
        params = data.pop("rope_parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ValueError(f"{source}: rope_parameters ({params!r}) must be a dict like "
                                 "{'rope_type': 'default', 'rope_theta': 10000.0}")
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
            theta = params.get("rope_theta", data.get("rope_theta", defaults["rope_theta"]))
            if ("rope_theta" in data and data["rope_theta"] != theta) or (
                    "rope_scaling" in data and not _same_rope_scaling(scaling, data["rope_scaling"])):
                raise ValueError(f"{source}: rope_theta/rope_scaling disagree with rope_parameters "
                                 f"({params!r}); keep rope_parameters only")
            data["rope_theta"], data["rope_scaling"] = theta, scaling
    if "qk_head_dim" in data:
        qk = data.pop("qk_head_dim")
        nope = data.get("qk_nope_head_dim", defaults["qk_nope_head_dim"])
        rope = data.get("qk_rope_head_dim", defaults["qk_rope_head_dim"])
        if not (isinstance(nope, int) and isinstance(rope, int) and qk == nope + rope):
            raise ValueError(f"{source}: qk_head_dim ({qk!r}) must equal qk_nope_head_dim + qk_rope_head_dim "
                             f"({nope!r} + {rope!r}); it is derived, so it may also be left out")
    return data


def _same_rope_scaling(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Two rope_scaling dicts describe the same scaling ('type' and 'rope_type' are synonyms)."""
    if a is None or b is None:
        return a is b
    if not isinstance(b, dict):
        return False
    synonyms = ("type", "rope_type")
    return (a.get("rope_type", a.get("type")) == b.get("rope_type", b.get("type"))
            and {k: v for k, v in a.items() if k not in synonyms} == {k: v for k, v in b.items() if k not in synonyms})


# Official inference/configs/*.json (ModelArgs) -> HF DeepseekV3Config names.
_OFFICIAL_TO_HF = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok", "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group", "route_scale": "routed_scaling_factor",
    "score_func": "scoring_func", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "rope_theta": "rope_theta",
}
# ModelArgs defaults of the official inference code, used when a file omits them.
_OFFICIAL_ROPE_DEFAULTS = {"original_seq_len": 4096, "rope_factor": 40, "beta_fast": 32,
                           "beta_slow": 1, "mscale": 1.0}
_OFFICIAL_IGNORED = {"dtype", "max_batch_size", "max_seq_len", "scale_fmt"} | set(_OFFICIAL_ROPE_DEFAULTS)
# The types of the official numbers that have no HF field of their own (ModelArgs annotations;
# int where ModelArgs says float is fine, as everywhere in JSON).
_OFFICIAL_NUMBER_TYPES = {"original_seq_len": int, "max_seq_len": int, "rope_factor": float,
                          "beta_fast": float, "beta_slow": float, "mscale": float}


def _check_official_types(data: dict[str, Any], source: str) -> None:
    """``ValueError`` naming the official key for a value of the wrong type, before any use of it."""
    for key, value in data.items():
        if key in _OFFICIAL_TO_HF:
            error = _type_error(_OFFICIAL_TO_HF[key], value, shown=key)
        elif key in _OFFICIAL_NUMBER_TYPES:
            wanted = _OFFICIAL_NUMBER_TYPES[key]
            ok = _is_number(value) and (wanted is float or isinstance(value, int))
            got = "null" if value is None else f"{type(value).__name__} {value!r}"
            error = None if ok else f"{key} must be {_TYPE_WORDS[wanted]}, got {got}"
        else:
            continue
        if error:
            raise ValueError(f"{source}: {error}")


def _from_official(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map the official ``ModelArgs`` JSON to HF field names (DeepSeek-V3 inference/model.py)."""
    unknown = sorted(k for k in data if k not in _OFFICIAL_TO_HF and k not in _OFFICIAL_IGNORED)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) in official-format config: {unknown}")
    _check_official_types(data, source)
    out = {_OFFICIAL_TO_HF[k]: v for k, v in data.items() if k in _OFFICIAL_TO_HF}
    rope = {k: data.get(k, v) for k, v in _OFFICIAL_ROPE_DEFAULTS.items()}
    # q_lora_rank 0 means "no query compression" in the official code.
    if out.get("q_lora_rank") == 0:
        out["q_lora_rank"] = None
    # ModelArgs.score_func defaults to softmax (DeepSeek-V2's files leave it out); ours is sigmoid.
    out.setdefault("scoring_func", "softmax")
    if rope["rope_factor"] > 1:
        out["rope_scaling"] = {
            "type": "yarn", "factor": rope["rope_factor"],
            "original_max_position_embeddings": rope["original_seq_len"],
            "beta_fast": rope["beta_fast"], "beta_slow": rope["beta_slow"],
            "mscale": rope["mscale"], "mscale_all_dim": rope["mscale"],
        }
        out["max_position_embeddings"] = int(rope["rope_factor"] * rope["original_seq_len"])
    else:   # no YaRN: the official code's RoPE table covers max_seq_len (ModelArgs default 4 x 4096)
        out["max_position_embeddings"] = data.get("max_seq_len", 4 * 4096)
    # ModelArgs has no MTP field: the official inference code never builds the MTP module, so
    # num_nextn_predict_layers stays at its default (0). Pass num_nextn_predict_layers=1 to
    # load_config for DeepSeek-V3's released checkpoint, which carries one MTP layer.
    return out


def _toy_dense() -> ModelConfig:
    """Chapter 01's baseline: 4 layers, d=128, MHA, dense SwiGLU, byte vocabulary; ~0.9M parameters."""
    return ModelConfig(
        vocab_size=260, hidden_size=128, num_hidden_layers=4, intermediate_size=384,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        initializer_range=0.02, bos_token_id=257, eos_token_id=258, pad_token_id=256,
    )


def _toy_mla() -> ModelConfig:
    """Chapter 02's baseline with Multi-head Latent Attention: same trunk, d_c = 32, d_h^R = 16.

    The latent cache holds 32 + 16 = 48 values per token per layer, against 2 * 4 * 32 = 256
    for the toy's multi-head attention.
    """
    return _toy_dense().replace(kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=32,
                                qk_rope_head_dim=16, v_head_dim=32)


def _toy() -> ModelConfig:
    """A small DeepSeek: MLA in every layer, DeepSeekMoE from layer 1 on (chapter 03).

    V3's shape in miniature: one shared and 16 routed experts of width 64 per MoE layer,
    top-4 routing limited to 2 of 4 groups (V3: 1 + 256, top-8, 4 of 8 groups), sigmoid
    affinities, gates scaled by 2.5, one dense layer first (V3: three).
    """
    return _toy_mla().replace(
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        moe_intermediate_size=64, first_k_dense_replace=1, routed_scaling_factor=2.5,
        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)


def _mini() -> ModelConfig:
    """A ~0.2B baseline for one GPU in bf16: 16 layers, d=1024, GQA 16/4 heads."""
    return ModelConfig(
        vocab_size=260, hidden_size=1024, num_hidden_layers=16, intermediate_size=2816,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
        initializer_range=0.02, bos_token_id=257, eos_token_id=258, pad_token_id=256,
    )


def _deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 671B, every value from config_671B.json / HF config.json (book/facts.md).

    The preset documents the real model, so it keeps YaRN (``rope_scaling``, chapter 07) and
    one MTP module (``num_nextn_predict_layers=1``, chapter 04); ``build_model`` builds both
    (on the meta device at this size). ``count_parameters("deepseek-v3")`` counts the main model:
    YaRN adds no parameter, and the MTP module's are counted apart.
    """
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, intermediate_size=18432,
        rms_norm_eps=1e-6, initializer_range=0.006,  # §4.2: "standard deviation 0.006"
        max_position_embeddings=163840,  # 40 x 4096 after YaRN (§4.3)
        num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        n_group=8, topk_group=4, routed_scaling_factor=2.5,
        moe_intermediate_size=2048, first_k_dense_replace=3,
        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
    )


PRESETS = {"toy": _toy, "toy-dense": _toy_dense, "toy-mla": _toy_mla, "mini": _mini,
           "deepseek-v3": _deepseek_v3}


def preset_names() -> list[str]:
    return list(PRESETS)


def load_config(name_or_path: str | Path | ModelConfig, **overrides: Any) -> ModelConfig:
    """A preset by name, or a ``config.json`` (HF or official format) by path.

    ``overrides`` replace fields afterwards, e.g. ``load_config("toy", num_hidden_layers=2)``.
    """
    if isinstance(name_or_path, ModelConfig):
        config = name_or_path
    elif isinstance(name_or_path, str) and name_or_path in PRESETS:
        config = PRESETS[name_or_path]()
    elif isinstance(name_or_path, Path) or str(name_or_path).endswith(".json") or "/" in str(name_or_path):
        config = ModelConfig.from_json(name_or_path)
    else:
        close = difflib.get_close_matches(str(name_or_path), preset_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown preset {name_or_path!r}{hint}; known presets: "
                         f"{', '.join(preset_names())}; or pass a path to a config.json")
    return config.replace(**overrides) if overrides else config

