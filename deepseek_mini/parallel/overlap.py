"""Computation-communication overlap inside one DualPipe chunk pair (DeepSeek-V3 §3.2.1, Figure 4).

With cross-node expert parallelism, an MoE layer spends about as long in all-to-all communication as
in computation (§3.2: a ratio of roughly 1:1). DualPipe hides it by pairing a forward chunk with a
backward chunk of another micro-batch and running the two on two streams: while one chunk's tokens
travel, the other chunk computes. Each chunk is cut into four components per layer, attention, MLP
(the experts) and the two all-to-alls, *dispatch* (tokens to their experts) and *combine* (expert
outputs back); a backward splits attention and MLP into "backward for input" (on the critical path)
and "backward for weights" (free to move, as in ZeroBubble); a pipeline (PP) send ends each chunk.

``overlap_pair`` lays out one pair on a compute stream and a communication stream in the order we
read from Figure 4, per layer pair (forward layer i, backward layer L-1-i, since the two chunks walk
their layers in opposite directions and their block boundaries do not line up):

    compute:  ATTN(F) | MLP(B) | MLP(W) | MLP(F)     | ATTN(B)     | ATTN(W)
    comm:     COMBINE(B)       | DISPATCH(F) | DISPATCH(B) | COMBINE(F) | PP

Every all-to-all runs while the other chunk computes, and the last layer's PP sends hide behind
ATTN(W). Each stream runs its list in order; an operation starts when its stream is free and its
inputs exist. Without overlap the same operations run one after another (forward chunk, then
backward chunk): that is the pipeline simulator's F + B, and the overlapped length is its F&B.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from deepseek_mini.parallel.schedules import Costs

__all__ = ["ChunkCosts", "PairTimeline", "overlap_pair", "plot_overlap"]


@dataclass(frozen=True)
class ChunkCosts:
    """Per-layer costs of a chunk's components (any time unit). ``*_b`` is the backward for input,
    ``*_w`` the backward for weights, ``dispatch_b`` / ``combine_b`` the backward all-to-alls (the
    gradients travel the reverse way), ``pp`` one pipeline send. The defaults put communication and
    computation at the paper's roughly 1:1 (§3.2) and a backward at twice a forward."""

    attn: float = 1.0
    mlp: float = 1.0
    attn_b: float = 1.0
    mlp_b: float = 1.0
    attn_w: float = 1.0
    mlp_w: float = 1.0
    dispatch: float = 1.0
    combine: float = 1.0
    dispatch_b: float = 1.0
    combine_b: float = 1.0
    pp: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) >= 0:
                raise ValueError(f"ChunkCosts: {f.name} ({getattr(self, f.name)}) must be >= 0")


@dataclass(frozen=True)
class Op:
    """One scheduled component: ``chunk`` is "F" (forward chunk) or "B" (backward chunk)."""

    name: str
    chunk: str
    stream: str
    start: float
    end: float


@dataclass
class PairTimeline:
    """A forward/backward chunk pair laid out with and without overlap."""

    ops: list[Op]            # the overlapped layout (two streams)
    serial_ops: list[Op]     # the same operations one after another
    forward: float           # the forward chunk alone, serially (the simulator's F)
    backward: float          # the backward chunk alone, serially (the simulator's B)
    weight: float            # its weight-gradient parts (the simulator's W)

    @property
    def overlapped(self) -> float:
        """The pair's length on two streams: the simulator's F&B."""
        return max(op.end for op in self.ops)

    @property
    def serial(self) -> float:
        return self.forward + self.backward

    @property
    def exposed_comm(self) -> float:
        """Time the compute stream waits for communication in the overlapped layout."""
        return self.overlapped - sum(op.end - op.start for op in self.ops if op.stream == "compute")

    def pipeline_costs(self, comm: float = 0.0) -> Costs:
        """Chunk costs for ``simulate``: F, B, W serial, F&B overlapped."""
        return Costs(F=self.forward, B=self.backward, W=self.weight, FB=self.overlapped, comm=comm)


def _pair_ops(c: ChunkCosts, layers: int, slow: float) -> tuple[list[tuple], list[tuple]]:
    """(name, chunk, duration, needs) per stream, in Figure 4's order."""
    compute, comm = [], []
    for i in range(layers):
        j = layers - 1 - i  # the backward chunk walks its layers in reverse
        prev_f = [f"combine(F){i - 1}"] if i else []
        prev_b = [f"attn(B){j + 1}"] if i else []
        compute += [(f"attn(F){i}", "F", c.attn * slow, prev_f),
                    (f"mlp(B){j}", "B", c.mlp_b * slow, [f"combine(B){j}"]),
                    (f"mlp(W){j}", "B", c.mlp_w * slow, [f"mlp(B){j}"]),
                    (f"mlp(F){i}", "F", c.mlp * slow, [f"dispatch(F){i}"]),
                    (f"attn(B){j}", "B", c.attn_b * slow, [f"dispatch(B){j}"]),
                    (f"attn(W){j}", "B", c.attn_w * slow, [f"attn(B){j}"])]
        comm += [(f"combine(B){j}", "B", c.combine_b, prev_b),
                 (f"dispatch(F){i}", "F", c.dispatch, [f"attn(F){i}"]),
                 (f"dispatch(B){j}", "B", c.dispatch_b, [f"mlp(B){j}"]),
                 (f"combine(F){i}", "F", c.combine, [f"mlp(F){i}"])]
    comm += [("pp(B)", "B", c.pp, ["attn(B)0"]), ("pp(F)", "F", c.pp, [f"combine(F){layers - 1}"])]
    return compute, comm


def _run(streams: dict[str, list[tuple]]) -> list[Op]:
    """List-schedule streams that each run in order; an op waits for its stream and its inputs."""
    done: dict[str, float] = {}
    nxt = {s: 0 for s in streams}
    free = {s: 0.0 for s in streams}
    ops: list[Op] = []
    while any(nxt[s] < len(q) for s, q in streams.items()):
        progressed = False
        for s, q in streams.items():
            while nxt[s] < len(q) and all(n in done for n in q[nxt[s]][3]):
                name, chunk, dur, needs = q[nxt[s]]
                t0 = max([free[s]] + [done[n] for n in needs])
                done[name] = free[s] = t0 + dur
                ops.append(Op(name, chunk, s, t0, t0 + dur))
                nxt[s] += 1
                progressed = True
        assert progressed, "the stream orders deadlock"
    return ops


def overlap_pair(costs: ChunkCosts | None = None, layers: int = 1, comm_sm_share: float = 0.0) -> PairTimeline:
    """Lay out a forward chunk and a backward chunk of ``layers`` layers each, serially and overlapped.

    ``comm_sm_share`` is the fraction of the GPU's SMs given to communication while overlapping (the
    paper uses 20 SMs for all-to-all, §3.2.2; 20 of an H800's 132 is about 0.15): compute then runs at
    ``1 - comm_sm_share`` of its speed in the overlapped layout only.
    """
    costs = ChunkCosts() if costs is None else costs
    if not isinstance(costs, ChunkCosts):
        raise ValueError(f"overlap_pair: costs must be a ChunkCosts, got {type(costs).__name__}")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"overlap_pair: layers ({layers}) must be an int >= 1")
    if not 0 <= comm_sm_share < 1:
        raise ValueError(f"overlap_pair: comm_sm_share ({comm_sm_share}) must be in [0, 1)")
    compute, comm = _pair_ops(costs, layers, 1 / (1 - comm_sm_share))
    ops = _run({"compute": compute, "comm": comm})
    compute1, comm1 = _pair_ops(costs, layers, 1.0)
    everything = {op[0]: op for op in compute1 + comm1}
    serial_ops, t = [], 0.0
    for name in ([f"{k}{i}" for i in range(layers) for k in ("attn(F)", "dispatch(F)", "mlp(F)", "combine(F)")]
                 + ["pp(F)"]
                 + [f"{k}{j}" for j in reversed(range(layers))
                    for k in ("combine(B)", "mlp(B)", "mlp(W)", "dispatch(B)", "attn(B)", "attn(W)")]
                 + ["pp(B)"]):
        _, chunk, dur, _ = everything[name]
        stream = "comm" if name.startswith(("dispatch", "combine", "pp")) else "compute"
        serial_ops.append(Op(name, chunk, stream, t, t + dur))
        t += dur
    forward = sum(op.end - op.start for op in serial_ops if op.chunk == "F")
    weight = sum(op.end - op.start for op in serial_ops if "(W)" in op.name)
    return PairTimeline(ops, serial_ops, forward, t - forward, weight)


# Figure 4's colours: forward orange, backward for input green, backward for weights blue, PP purple.
def _colour(op: Op) -> str:
    if op.name.startswith("pp"):
        return "#b4a7d6"
    if "(W)" in op.name:
        return "#9dc3e6"
    return "#f8cbad" if op.chunk == "F" else "#a9d18e"


def plot_overlap(pair: PairTimeline, ax=None):
    """Draw the pair: serial on one row, overlapped on a compute row and a communication row.
    Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not isinstance(pair, PairTimeline):
        raise ValueError(f"plot_overlap: expected the PairTimeline from overlap_pair(), got {type(pair).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(min(18, 2 + pair.serial / 1.2), 2.2))
    rows = [("serial", pair.serial_ops, None), ("overlapped: compute", pair.ops, "compute"),
            ("overlapped: comm", pair.ops, "comm")]
    for y, (_, ops, stream) in enumerate(rows):
        for op in ops:
            if stream is not None and op.stream != stream:
                continue
            ax.add_patch(Rectangle((op.start, y - 0.4), op.end - op.start, 0.8, facecolor=_colour(op),
                                   edgecolor="black", linewidth=0.5))
            ax.text((op.start + op.end) / 2, y, op.name.split(")")[0] + ")", ha="center", va="center", fontsize=6)
    ax.set_xlim(0, pair.serial)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("time (component cost units)")
    ax.set_title(f"F + B = {pair.serial:g} serial, F&B = {pair.overlapped:g} overlapped "
                 f"(exposed communication {pair.exposed_comm:g})", fontsize=10)
    return ax
