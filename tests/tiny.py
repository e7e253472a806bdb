"""Tiny model configs and training settings shared by the training tests (seconds per run on a CPU)."""

from __future__ import annotations

from deepseek_mini.train import TrainConfig

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
# The toy preset (MLA + MoE) at tiny size: layer 0 dense, layer 1 MoE with 8 routed experts in 4 groups.
TINY_MOE = dict(TINY, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16)
RUN = dict(steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=100, eval_batches=2,
           seed=0, device="cpu", progress=False)


def run(**overrides) -> TrainConfig:
    """A 4-step CPU run of 2 x 16-token batches, with ``overrides``."""
    return TrainConfig(**{**RUN, **overrides})
