"""Pipeline stages are the model with layers removed (issue #10, torchtitan's way): the toy cut
into 2 and 4 stages and chained equals the whole model bit for bit, forward and backward, in
train and eval mode; stages keep the whole model's state-dict keys and their own caches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini import build_model, load_config
from deepseek_mini.model import Transformer, cut
from deepseek_mini.moe import moe_layers

SPLITS = {2: [[0, 1], [2, 3]], 4: [[0], [1], [2], [3]]}


@pytest.fixture(scope="module")
def whole() -> Transformer:
    return build_model("toy", seed=0)


def stages_of(model: Transformer, n: int) -> list[Transformer]:
    split = SPLITS[n]
    return [cut(model, ids, embed=i == 0, head=i == len(split) - 1) for i, ids in enumerate(split)]


def run_chained(stages: list[Transformer], tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward stage by stage with detached boundaries, then backward last to first, passing the
    boundary gradients along: what a pipeline schedule does (one micro-batch)."""
    inputs, outputs, x = [], [], tokens
    for stage in stages:
        x = x.detach().requires_grad_() if x.is_floating_point() else x
        inputs.append(x)
        x = stage(x)
        outputs.append(x)
    loss = F.cross_entropy(x.flatten(0, 1), targets.flatten())
    loss.backward()
    for stage_out, next_in in zip(reversed(outputs[:-1]), reversed(inputs[1:])):
        stage_out.backward(next_in.grad)
    return x


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n", [2, 4])
def test_chained_stages_equal_the_whole_model_exactly(n, train):
    torch.manual_seed(0)
    model = build_model("toy", seed=0).train(train)
    stages = [s.train(train) for s in stages_of(build_model("toy", seed=0), n)]
    tokens = torch.randint(0, 260, (2, 16))
    targets = torch.randint(0, 260, (2, 16))

    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    chained = run_chained(stages, tokens, targets)

    assert torch.equal(chained, logits)                         # float32, same ops in the same order
    whole_grads = {name: p.grad for name, p in model.named_parameters()}
    stage_grads = {name: p.grad for stage in stages for name, p in stage.named_parameters()}
    assert stage_grads.keys() == whole_grads.keys()             # every parameter lives in exactly one stage
    for name, grad in whole_grads.items():                      # (an expert no token chose has none)
        assert (grad is None) == (stage_grads[name] is None), name
        assert grad is None or torch.equal(stage_grads[name], grad), name
    assert sum(grad is not None for grad in whole_grads.values()) > 0.8 * len(whole_grads)
    whole_counts = [layer.tokens_per_expert for layer in moe_layers(model)]
    stage_counts = [layer.tokens_per_expert for stage in stages for layer in moe_layers(stage)]
    assert len(stage_counts) == len(whole_counts) == 3
    for a, b in zip(whole_counts, stage_counts):
        assert torch.equal(a, b)
        assert a.sum() == (2 * 16 * 4 if train else 0)         # train mode counts T * K_r, eval nothing


def test_stages_keep_the_whole_models_keys_and_hold_only_their_part(whole):
    first, last = stages_of(whole, 2)
    assert list(first.layers) == ["0", "1"] and list(last.layers) == ["2", "3"]
    assert first.norm is None and first.head is None and last.embed is None
    keys = set(whole.state_dict())
    assert set(first.state_dict()) | set(last.state_dict()) == keys
    assert not set(first.state_dict()) & set(last.state_dict())
    assert "layers.3.ffn.gate.bias" in last.state_dict() and "embed.weight" in first.state_dict()
    for name, tensor in last.state_dict().items():             # copies of the same values, not views
        assert torch.equal(tensor, whole.state_dict()[name]) and tensor.data_ptr() != whole.state_dict()[name].data_ptr()


def test_deleting_layers_by_hand_makes_a_stage_too():
    model = build_model("toy", seed=0).eval()
    tokens = torch.randint(0, 260, (1, 6))
    with torch.no_grad():
        full = model(tokens)
        h = model.embed(tokens)
        for layer_id in ("0", "1"):
            h = model.layers[layer_id](h, (model.rope_cos[:6], model.rope_sin[:6]))
        del model.layers["0"], model.layers["1"]
        model.embed = None
        assert torch.equal(model(h), full)


def test_a_stage_holding_layers_30_to_45_runs_with_its_own_cache():
    # The middle of a deep model: RoPE tables are the model's, caches are keyed by layer id.
    config = load_config("toy-dense", num_hidden_layers=48, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32)
    model = build_model(config, seed=0).eval()
    stages = [cut(model, range(30), embed=True), cut(model, range(30, 46)), cut(model, [46, 47], head=True)]
    cache = model.new_cache(2, 12)
    caches = [stage.new_cache(2, 12) for stage in stages]
    assert list(caches[1]) == [str(i) for i in range(30, 46)]
    tokens = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        full = [model(tokens[:, :5], 0, cache)] + [model(tokens[:, t:t + 1], t, cache) for t in range(5, 12)]
        chained = []
        for start, end in [(0, 5)] + [(t, t + 1) for t in range(5, 12)]:
            x = tokens[:, start:end]
            for stage, stage_cache in zip(stages, caches):
                x = stage(x, start, stage_cache)
            chained.append(x)
    assert torch.equal(torch.cat(chained, 1), torch.cat(full, 1))


def test_stage_input_and_cache_errors_are_one_line():
    model = build_model("toy", device="meta")
    middle = cut(model, [1, 2]).eval()            # (train mode would count load: no bincount on meta)
    with pytest.raises(ValueError, match=r"no embedding: pass hidden states \(batch, seq_len, hidden_size=128\)"):
        middle(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"cache holds layers \['0', '1', '2', '3'\], the model \['1', '2'\]"):
        middle(torch.zeros(1, 4, 128, device="meta"), 0, model.new_cache(1, 8))
    with pytest.raises(ValueError, match=r"layer 7 is not in the model, which holds layers \['0', '1', '2', '3'\]"):
        cut(model, [3, 7])
    with pytest.raises(ValueError, match=r"cut needs a deepseek_mini Transformer"):
        cut(torch.nn.Linear(2, 2), [0])
    out = middle(torch.zeros(1, 4, 128, device="meta"))       # hidden states in, hidden states out
    assert out.shape == (1, 4, 128)


def test_cutting_on_meta_copies_nothing_it_removes():
    # deepcopy with the removed modules memoised as None: the stage is built from its own part.
    model = build_model("toy", device="meta")
    stage = cut(model, [3], head=True)
    assert stage.embed is None and list(stage.layers) == ["3"]
    assert sum(p.numel() for p in stage.parameters()) < sum(p.numel() for p in model.parameters()) / 2
    assert all(p.is_meta for p in stage.parameters())
    assert list(model.layers) == ["0", "1", "2", "3"] and model.embed is not None    # the model is intact


def test_cutting_a_model_that_keeps_forward_state_names_the_fix():
    # A module that keeps a tensor of its last forward (autograd history: deepcopy refuses it),
    # as MoE layers keep their last routing today.
    model = build_model("toy", seed=0)
    model.layers["1"].last_output = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(ValueError, match="cut the model before running it"):
        cut(model, [1], embed=True)
    assert cut(model, [2]).layers["2"] is not model.layers["2"]          # other layers cut as usual
