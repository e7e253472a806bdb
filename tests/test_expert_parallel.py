"""Expert parallelism (issue #13; DeepSeek-V3 §3.2.2, §2.1.2): the all-to-all exchange over 2 and 4 gloo
processes equals the single-process MoE (outputs, input and parameter gradients, the bias update),
with uneven loads, idle experts, a rank whose experts receive nothing and a rank without tokens;
node-limited routing caps the nodes per token and the copies that cross nodes; the launcher
never hangs.

One spawn of 4 processes runs every check (spawning costs seconds on a busy CPU): EP over the
4 ranks, and EP over 2 ranks as two 2-rank groups side by side (as two pipeline stages would hold
two layers), each group against its own single process. The workers are module-level functions:
spawned processes import them by name.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from deepseek_mini import build_model
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.moe import MoE, group_limited_topk, moe_layers, update_bias
from deepseek_mini.parallel import AllToAllDispatcher, expert_traffic, run_workers, shard_experts
from deepseek_mini.parallel.demo import demo_batch, demo_moe, expert_parallel_step

WORLD_SIZE = 4
DIM, INTER, N_EXPERTS, TOPK = 16, 8, 8, 2
GAMMA = 0.25
# Routing rigged through the bias b_i (it only chooses experts): expert 5 wins most tokens (uneven
# load), experts 3, 6 and 7 never win (idle; on 4 ranks rank 3 holds 6 and 7 and receives nothing).
BIAS = torch.tensor([0.0, 0.0, 0.0, -10.0, 0.0, 0.5, -10.0, -10.0])
TOKENS = {2: [6, 3], 4: [5, 3, 7, 1]}          # tokens on each rank of an EP group: uneven
SEEDS = {2: (3, 4), 4: (1,)}                   # the batch of each EP group
EMPTY_RANK = [6, 0]                            # 2 ranks, the second without a token
SEQUENCES = {2: [3, 1], 4: [2, 1, 1, 1]}       # toy-model sequences on each rank
SEQ_LEN = 8
DEMO_TOKENS = [5, 3, 7, 1]                     # notebook 06 §7.3


def make_moe(n_experts: int = N_EXPERTS) -> MoE:
    moe = MoE(DIM, moe_inter_dim=INTER, n_routed_experts=n_experts, n_shared_experts=1, topk=TOPK)
    moe.init_weights(0.2, torch.Generator().manual_seed(0))
    if n_experts == N_EXPERTS:
        moe.gate.bias.copy_(BIAS)
    return moe.train()


def moe_batch(tokens: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of every rank's tokens, and the weights of a linear loss on the output."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(tokens)
    return torch.randn(n, DIM, generator=generator), torch.randn(n, DIM, generator=generator)


def model_batch(sequences: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    shape = (sum(sequences), SEQ_LEN)
    return torch.randint(0, 256, shape, generator=generator), torch.randint(0, 256, shape, generator=generator)


def rank_slice(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def layer_step(rank: int, tokens: list[int], group: dist.ProcessGroup, seed: int) -> dict:
    """One training step of an expert-parallel MoE layer on this rank's tokens: forward, backward, bias update."""
    mine = rank_slice(tokens, rank)
    x, target = moe_batch(tokens, seed)
    moe = shard_experts(make_moe(), group)
    x = x[mine].clone().requires_grad_()
    y = moe(x)
    (y * target[mine]).sum().backward()
    own_load_bias = update_bias(moe.gate.bias.clone(), moe.tokens_per_expert, GAMMA)   # process_group=None
    MoEBalancing(bias_update_speed=GAMMA, balance_loss="none", process_group=group).after_optimizer_step(moe, 1)
    return {"y": y.detach(), "x_grad": x.grad, "bias": moe.gate.bias.clone(), "own_load_bias": own_load_bias,
            "gate_grad": moe.gate.weight.grad, "n_local": len(moe.experts),
            **{f"expert_{n}": p.grad for n, p in moe.experts.named_parameters()},
            **{f"shared_{n}": p.grad for n, p in moe.shared_experts.named_parameters()}}


def model_step(rank: int, sequences: list[int], group: dist.ProcessGroup) -> dict:
    """The toy model, built with one seed on every rank and sharded: logits and gradients of a summed loss."""
    tokens, targets = model_batch(sequences)
    mine = rank_slice(sequences, rank)
    model = shard_experts(build_model("toy", seed=0), group)
    logits = model(tokens[mine])
    F.cross_entropy(logits.flatten(0, 1), targets[mine].flatten(), reduction="sum").backward()
    replicated = {n: p.grad for n, p in model.named_parameters() if ".experts." not in n}
    for grad in replicated.values():                # what the DP x EP gradient sync will do
        dist.all_reduce(grad, group=group)
    return {"logits": logits.detach(), "replicated": replicated if rank == 0 else {},
            "experts": {n: p.grad for n, p in model.named_parameters() if ".experts." in n}}


def ep_worker(rank: int, world_size: int) -> dict:
    """Every EP check on one rank of 4: over the 4 ranks, and over its 2-rank group."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]     # every rank creates both, in order
    pair, half = pairs[rank // 2], rank % 2
    out = {4: {"layer": layer_step(rank, TOKENS[4], dist.group.WORLD, SEEDS[4][0]),
               "model": model_step(rank, SEQUENCES[4], dist.group.WORLD)},
           2: {"layer": layer_step(half, TOKENS[2], pair, SEEDS[2][rank // 2]),
               "model": model_step(half, SEQUENCES[2], pair),
               "empty": layer_step(half, EMPTY_RANK, pair, seed=5)}}
    for size, group in ((4, dist.group.WORLD), (2, pair)):
        errors = out[size]["errors"] = {}
        try:
            shard_experts(make_moe(N_EXPERTS + 1), group)
        except ValueError as error:
            errors["indivisible"] = str(error)
    out["demo"] = expert_parallel_step(rank, world_size, DEMO_TOKENS)      # notebook 06's worker, EP4 over WORLD
    try:
        AllToAllDispatcher().combine(torch.zeros(0, DIM), [])
    except RuntimeError as error:
        out[4]["errors"]["combine_first"] = str(error)
    return out


@pytest.fixture(scope="module")
def workers() -> list[dict]:
    return run_workers(ep_worker, WORLD_SIZE, timeout=120)


@pytest.fixture(params=[2, 4], ids=["ep2", "ep4"])
def ep(request, workers) -> tuple[int, list[list[dict]]]:
    """(EP size, the results of each EP group: one group of 4 ranks, or two groups of 2)."""
    size = request.param
    by_rank = [w[size] for w in workers]
    return size, [by_rank[start:start + size] for start in range(0, WORLD_SIZE, size)]


def one_process(tokens: list[int], seed: int) -> dict:
    """The single-process layer on the concatenated batch of the ranks: output, gradients, bias."""
    x, target = moe_batch(tokens, seed)
    moe = make_moe()
    x.requires_grad_()
    y = moe(x)
    (y * target).sum().backward()
    load = moe.tokens_per_expert.clone()
    MoEBalancing(bias_update_speed=GAMMA, balance_loss="none").after_optimizer_step(moe, step=1)
    return {"moe": moe, "y": y.detach(), "x_grad": x.grad, "load": load}


def check_layer(results: list[dict], ref: dict) -> None:
    """EP ranks' results of ``layer_step`` against the single-process layer: everything a step produces."""
    moe, size = ref["moe"], len(results)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref["y"])
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"])
    per_rank = N_EXPERTS // size
    for rank, r in enumerate(results):                 # each rank: its experts' whole gradient
        assert r["n_local"] == per_rank
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for name in ("w1", "w2", "w3"):
            torch.testing.assert_close(r[f"expert_{name}"], getattr(moe.experts, name).grad[mine])
    torch.testing.assert_close(sum(r["gate_grad"] for r in results), moe.gate.weight.grad)
    for name, param in moe.shared_experts.named_parameters():
        torch.testing.assert_close(sum(r[f"shared_{name}"] for r in results), param.grad)
    for r in results:                                  # every replica of b_i moved as one process moves it
        assert torch.equal(r["bias"], moe.gate.bias)


def test_the_rigged_routing_is_uneven_and_leaves_experts_idle():
    for size, seeds in SEEDS.items():
        for seed in seeds:
            load = one_process(TOKENS[size], seed)["load"]
            assert load[[3, 6, 7]].eq(0).all() and load.argmax() == 5 and load.max() > 2 * load.mean()


def test_layer_step_equals_one_process(ep):
    """Outputs, input gradients, each rank's expert gradients, the replicated gradients summed, the bias."""
    size, groups = ep
    for results, seed in zip(groups, SEEDS[size]):
        check_layer([r["layer"] for r in results], one_process(TOKENS[size], seed))
    if size == 4:                                      # rank 3's experts received no row: zero gradient
        assert all(groups[0][3]["layer"][f"expert_{n}"].eq(0).all() for n in ("w1", "w2", "w3"))


def test_layer_step_with_a_rank_without_tokens_equals_one_process(workers):
    """A rank with no token still joins every all-to-all (it sends nothing and serves its experts)."""
    for pair in (workers[:2], workers[2:]):
        assert pair[1][2]["empty"]["y"].shape == (0, DIM)
        check_layer([r[2]["empty"] for r in pair], one_process(EMPTY_RANK, seed=5))


def test_bias_update_needs_the_load_summed_over_the_ranks(ep):
    size, groups = ep
    for results, seed in zip(groups, SEEDS[size]):
        expected = one_process(TOKENS[size], seed)["moe"].gate.bias
        assert expected.ne(0).any()
        # Without the group each rank would move its replica of b_i by its own load: they would drift apart.
        assert any(not torch.equal(r["layer"]["own_load_bias"], expected) for r in results)


def test_sharded_toy_model_equals_the_whole_model(ep):
    size, groups = ep
    tokens, targets = model_batch(SEQUENCES[size])
    model = build_model("toy", seed=0)
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    per_rank = moe_layers(model)[0].n_routed_experts // size
    for results in groups:
        torch.testing.assert_close(torch.cat([r["model"]["logits"] for r in results]), logits.detach())
        replicated = results[0]["model"]["replicated"]
        assert replicated and all(".experts." not in name for name in replicated)
        for name, grad in replicated.items():
            torch.testing.assert_close(grad, grads[name], msg=name)
        for rank, r in enumerate(results):
            assert r["model"]["experts"]
            for name, grad in r["model"]["experts"].items():
                torch.testing.assert_close(grad, grads[name][rank * per_rank:(rank + 1) * per_rank], msg=name)


def test_bad_inputs_give_one_line_errors(ep):
    size, groups = ep
    for results in groups:
        assert results[0]["errors"]["indivisible"] == (f"n_routed_experts ({N_EXPERTS + 1}) must be divisible "
                                                       f"by the expert-parallel size ({size})")
    if size == 4:
        assert groups[0][0]["errors"]["combine_first"] == "combine called without a dispatch before it"


def test_dispatcher_and_shard_need_a_process_group_and_an_moe():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        AllToAllDispatcher()
    with pytest.raises(ValueError, match="no MoE layer"):
        shard_experts(build_model("toy-dense", seed=0))


# ----------------------------------------------------------------------------- traffic, node-limited routing

def test_traffic_matrix_of_a_hand_computed_routing():
    # 8 experts on 4 ranks (2 each), 2 ranks per node: node 0 = ranks 0, 1; node 1 = ranks 2, 3.
    indices = torch.tensor([[0, 5], [2, 3], [1, 7], [6, 4]])
    token_rank = torch.tensor([0, 1, 3, 2])
    traffic = expert_traffic(indices, token_rank, n_experts=8, ep_size=4, ranks_per_node=2)
    assert torch.equal(traffic.rows, torch.tensor([[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]]))
    assert traffic.nodes_per_token.tolist() == [2, 1, 2, 1]
    assert traffic.remote_nodes.tolist() == [1, 0, 1, 0]
    assert traffic.cross_node_rows() == 2                     # rank 0 -> 2 and rank 3 -> 0
    assert torch.equal(traffic.node_copies, torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]]))
    assert traffic.cross_node_copies() == 2                   # token 0 to node 1, token 2 to node 0
    with_a_second_row_to_rank_2 = expert_traffic(torch.tensor([[4, 5]]), torch.tensor([0]), 8, 4, 2)
    assert with_a_second_row_to_rank_2.rows[0, 2] == 2 and with_a_second_row_to_rank_2.node_copies[0, 1] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_experts=6), "divisible by ep_size"), (dict(ranks_per_node=3), "divisible by ep_size"),
    (dict(n_experts=4), r"in \[0, 4\)"), (dict(ep_size=2, n_experts=8), r"token ranks must be in \[0, 2\)"),
])
def test_traffic_rejects_bad_inputs(kwargs, message):
    args = dict(indices=torch.tensor([[0, 5], [6, 7]]), token_rank=torch.tensor([0, 3]), n_experts=8, ep_size=4,
                ranks_per_node=2) | kwargs
    with pytest.raises(ValueError, match=message):
        expert_traffic(**args)


def test_node_limited_routing_caps_nodes_and_cuts_cross_node_copies():
    # 32 experts on 8 ranks, 2 ranks per node: 4 nodes = 4 groups; top-6, at most M = 2 nodes per token.
    # (The rows crossing nodes, one per (token, expert), stay about the same: the cap pays off when a
    # token is sent once per node, §3.2.2; this is measured in the status note, not asserted.)
    n_experts, ep_size, ranks_per_node, topk, max_nodes = 32, 8, 2, 6, 2
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(512, n_experts, generator=generator)
    token_rank = torch.arange(512) % ep_size
    unlimited = expert_traffic(group_limited_topk(scores, topk), token_rank, n_experts, ep_size, ranks_per_node)
    limited = expert_traffic(group_limited_topk(scores, topk, n_group=ep_size // ranks_per_node,
                                                topk_group=max_nodes), token_rank, n_experts, ep_size, ranks_per_node)
    assert limited.nodes_per_token.max() == max_nodes < unlimited.nodes_per_token.max()
    assert limited.rows.sum() == unlimited.rows.sum() == 512 * topk          # no row dropped
    assert limited.cross_node_copies() < 0.8 * unlimited.cross_node_copies()
    assert limited.node_copies.sum() == limited.nodes_per_token.sum() <= 512 * max_nodes


# ----------------------------------------------------------------------------- the launcher

def raising_worker(rank: int, world_size: int) -> None:
    if rank == 0:
        raise ValueError("planted failure")
    dist.barrier()                                      # waits for rank 0, which never comes


def sleeping_worker(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_launcher_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match=r"(?s)raising_worker failed on rank 0 of 2.*planted failure"):
        run_workers(raising_worker, 2, timeout=60)


def test_launcher_kills_workers_past_the_timeout():
    with pytest.raises(TimeoutError, match="sleeping_worker did not finish within 3 s and were killed"):
        run_workers(sleeping_worker, 1, timeout=3)


def test_launcher_refuses_what_spawn_cannot_send():
    with pytest.raises(ValueError, match="module-level function"):
        run_workers(lambda rank, world_size: None, 2)
    with pytest.raises(ValueError, match="world_size"):
        run_workers(sleeping_worker, 0)


def test_notebook_worker_equals_one_process_and_reports_the_counts_exchange(workers):
    """deepseek_mini.parallel.demo.expert_parallel_step (notebook 06 §7.3): outputs, input and expert gradients
    equal the single-process layer; what each rank received is the column of what the ranks sent."""
    demo = [w["demo"] for w in workers]
    moe, (x, target) = demo_moe(), demo_batch(DEMO_TOKENS)
    x.requires_grad_()
    y = moe(x)
    (y * target).sum().backward()
    torch.testing.assert_close(torch.cat([d["y"] for d in demo]), y.detach())
    torch.testing.assert_close(torch.cat([d["x_grad"] for d in demo]), x.grad)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(torch.cat([d[name] for d in demo]), getattr(moe.experts, name).grad)
    assert [d["experts"] for d in demo] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for rank, d in enumerate(demo):
        assert len(d["sent"]) == N_EXPERTS and sum(d["sent"]) == TOPK * DEMO_TOKENS[rank]
        assert d["received"] == [demo[s]["sent"][2 * rank:2 * rank + 2] for s in range(WORLD_SIZE)]
        assert d["local_counts"] == [sum(demo[s]["sent"][e] for s in range(WORLD_SIZE)) for e in d["experts"]]


def test_notebook_worker_inputs_are_checked():
    with pytest.raises(ValueError, match=r"tokens \(\[1, 2\]\) must give one count per rank \(4\)"):
        expert_parallel_step(0, 4, [1, 2])
    with pytest.raises(ValueError, match="topk"):
        demo_moe(n_experts=2, topk=3)
    with pytest.raises(ValueError, match=">= 0"):
        demo_batch([2, -1])
