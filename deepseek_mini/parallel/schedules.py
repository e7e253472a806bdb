"""Pipeline schedules and a timeline simulator (chapter 06; DeepSeek-V3 §3.2.1, arXiv 2412.19437).

A pipeline schedule is, for each rank, the order in which it runs its pieces of work:

* ``F``: the forward of one micro-batch through one stage (a "chunk");
* ``B``: the full backward of that chunk (input gradient and weight gradient together);
* ``I``: the backward for the input only (ZeroBubble's split, Qi et al. 2023; the paper's
  "backward for input");
* ``W``: the backward for the weights, deferred to fill a bubble; ``I`` + ``W`` = ``B``;
* ``FB``: a forward chunk and a full backward chunk of *another* micro-batch run together, so that
  the communication of each hides behind the computation of the other (the paper's "F&B").

The four generators below give those orders for 1F1B, ZB1P, DualPipe and DualPipeV. ``simulate``
replays an order with chunk costs and the data dependencies of the pipeline (a rank runs one action at
a time, in its list order, and waits for its inputs) and measures the bubble, the activation memory and
the parameter memory that the paper's Table 2 compares:

| schedule | bubble               | parameters | activations |
|----------|----------------------|------------|-------------|
| 1F1B     | (PP-1)(F+B)          | 1x         | PP          |
| ZB1P     | (PP-1)(F+B-2W)       | 1x         | PP          |
| DualPipe | (PP/2-1)(F&B+B-3W)   | 2x         | PP+1        |

DualPipeV (the DualPipe repository's "V" variant) folds DualPipe's two directions onto PP/2 ranks:
same bubble and memory, half the devices.

How the bubble is measured: ``bubble[r] = makespan - busy[r]``, the time rank r idles between the
step's start and the end of the last rank's last action, with no send latency (``comm = 0``). Table 2
is the largest of these; it equals the simulator exactly

* 1F1B: on every rank, for any F and B (n_micro >= pp);
* ZB1P: on every rank when W <= F and W <= B - W (each deferred W fits in the gap it fills);
* DualPipe, DualPipeV: on the middle ranks when F = B - W (a forward as long as a backward for
  input, e.g. the usual B = 2F, W = F), W <= F and B <= F&B <= F + B. With F&B = F + B every rank
  idles exactly that long; with a real overlap the ranks near the ends run more chunks without a
  partner (more busy time) and idle less.

Outside these conditions the simulated bubble differs from the formula (``tests/test_schedules.py``
shows both sides).

Conventions: ``pp`` is always the number of *ranks* (devices). 1F1B, ZB1P and DualPipe cut the model
into ``pp`` stages; DualPipeV cuts it into ``2 * pp`` stages (rank r holds stages r and 2pp-1-r).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["KINDS", "SCHEDULES", "Action", "Costs", "Timeline", "stage_rank", "n_stages",
           "schedule_1f1b", "schedule_zb1p", "schedule_dualpipe", "schedule_dualpipev", "make_schedule",
           "simulate", "bubble_formula", "table2", "plot_timeline"]

KINDS = ("F", "B", "I", "W", "FB")
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Action:
    """One step of one rank's schedule.

    ``micro`` counts micro-batches within a direction; ``stage`` is the stage index along the
    micro-batch's path (0 holds the embedding); ``direction`` is 0 except for DualPipe's reverse
    stream (micro-batches that enter at the last rank). An ``FB`` action carries its two halves
    in ``parts`` = (the forward, the full backward) and copies the forward's fields.
    """

    rank: int
    kind: str
    micro: int
    stage: int
    direction: int = 0
    parts: tuple[Action, ...] = ()

    def units(self) -> tuple[Action, ...]:
        """The elementary F / B / I / W pieces of this action (two for ``FB``, else itself)."""
        return self.parts or (self,)

    def __str__(self) -> str:
        if self.kind == "FB":
            return "|".join(str(p) for p in self.parts)
        tick = "'" * self.direction
        return f"{self.kind}{self.micro}{tick}@s{self.stage}"


def n_stages(schedule: str, pp: int) -> int:
    """Stages along one micro-batch's path: ``pp``, or ``2 * pp`` for DualPipeV (two per rank)."""
    return 2 * pp if _name(schedule) == "dualpipev" else pp


def stage_rank(schedule: str, pp: int, stage: int, direction: int = 0) -> int:
    """The rank that holds ``stage`` of ``direction``.

    1F1B, ZB1P: stage s on rank s. DualPipe: direction 0 runs ranks 0 → pp-1 and direction 1 runs
    pp-1 → 0, so rank r holds stage r of one and stage pp-1-r of the other (two parameter copies).
    DualPipeV: the path goes down the ranks and back up (a "V"), rank r holds stages r and 2pp-1-r.
    """
    name = _name(schedule)
    if name == "dualpipe":
        return stage if direction == 0 else pp - 1 - stage
    if name == "dualpipev":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage


def _name(schedule: str) -> str:
    name = schedule.lower().replace("-", "").replace("_", "")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return name


def _check_counts(name: str, pp: int, n_micro: int, min_pp: int = 1) -> None:
    for what, value in (("pp", pp), ("n_micro", n_micro)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name}: {what} must be an int, got {type(value).__name__}")
    if pp < min_pp:
        raise ValueError(f"{name}: pp ({pp}) must be >= {min_pp}")


class _Rank:
    """Builds one rank's action list: micro-batch counters per local chunk and a FIFO of pending W."""

    def __init__(self, rank: int, chunks: list[tuple[int, int]]):
        self.rank = rank
        self.chunks = chunks  # local chunk -> (stage, direction)
        self.next_f = [0] * len(chunks)
        self.next_b = [0] * len(chunks)
        self.pending_w: deque[Action] = deque()
        self.actions: list[Action] = []

    def _unit(self, kind: str, chunk: int, micro: int) -> Action:
        stage, direction = self.chunks[chunk]
        return Action(self.rank, kind, micro, stage, direction)

    def _forward(self, chunk: int) -> Action:
        self.next_f[chunk] += 1
        return self._unit("F", chunk, self.next_f[chunk] - 1)

    def _backward(self, chunk: int, split: bool) -> Action:
        self.next_b[chunk] += 1
        unit = self._unit("I" if split else "B", chunk, self.next_b[chunk] - 1)
        if split:
            self.pending_w.append(self._unit("W", chunk, unit.micro))
        return unit

    def f(self, chunk: int = 0) -> None:
        self.actions.append(self._forward(chunk))

    def b(self, chunk: int = 0, split: bool = False) -> None:
        """A full backward, or (``split``) its input half with the weight half queued for ``w``."""
        self.actions.append(self._backward(chunk, split))

    def w(self) -> None:
        """The oldest pending weight-gradient chunk (ZeroBubble keeps them in FIFO order)."""
        self.actions.append(self.pending_w.popleft())

    def fb(self, f_chunk: int, b_chunk: int) -> None:
        """A forward of ``f_chunk`` overlapped with a full backward of ``b_chunk`` (the paper's F&B)."""
        fwd, bwd = self._forward(f_chunk), self._backward(b_chunk, split=False)
        self.actions.append(Action(self.rank, "FB", fwd.micro, fwd.stage, fwd.direction, (fwd, bwd)))


def schedule_1f1b(pp: int, n_micro: int) -> list[list[Action]]:
    """1F1B (PipeDream-Flush): rank r runs pp-1-r warm-up forwards, then alternates one forward and one
    full backward, then drains its backwards. At most pp micro-batches are in flight on rank 0."""
    _check_counts("1F1B", pp, n_micro)
    if n_micro < pp:
        raise ValueError(f"1F1B: n_micro ({n_micro}) must be >= pp ({pp}) so the pipeline fills; "
                         f"use n_micro >= {pp}")
    out = []
    for r in range(pp):
        rank = _Rank(r, [(r, 0)])
        warmup = pp - 1 - r
        for _ in range(warmup):
            rank.f()
        for _ in range(n_micro - warmup):
            rank.f()
            rank.b()
        for _ in range(warmup):
            rank.b()
        out.append(rank.actions)
    return out


def schedule_zb1p(pp: int, n_micro: int) -> list[list[Action]]:
    """ZB1P (ZeroBubble's ZB-H1, Qi et al. 2023): 1F1B with each backward split into I (input
    gradient, on the critical path) and W (weight gradient, off it). Rank r defers its first r W
    steps, which lets the I steps travel up the pipeline sooner, and runs the deferred W where 1F1B
    would idle; the activation memory stays at 1F1B's pp micro-batches."""
    _check_counts("ZB1P", pp, n_micro)
    if n_micro < pp:
        raise ValueError(f"ZB1P: n_micro ({n_micro}) must be >= pp ({pp}) so the pipeline fills; "
                         f"use n_micro >= {pp}")
    out = []
    for r in range(pp):
        rank = _Rank(r, [(r, 0)])
        warmup = pp - 1 - r
        for _ in range(warmup):
            rank.f()
        for step in range(n_micro - warmup):
            rank.f()
            rank.b(split=True)
            if step >= r:
                rank.w()
        for _ in range(warmup):
            rank.b(split=True)
            rank.w()
        while rank.pending_w:
            rank.w()
        out.append(rank.actions)
    return out


def _dual_steps(rank: _Rank, n: int, k: int, per_chunk: int) -> None:
    """The eight steps of DualPipe's ``step`` (deepseek-ai/DualPipe), for local chunks 0 and 1.

    Chunk 0 is the one whose stream reaches this rank first. ``n`` is the pipeline depth of one
    half (DualPipe: pp/2 ranks; DualPipeV: pp ranks), ``k`` this rank's distance from the end that
    feeds chunk 0, ``per_chunk`` the micro-batches that pass through each chunk.
    """
    for _ in range(2 * (n - k - 1)):        # 1: forwards of chunk 0 only (the pipeline fills)
        rank.f(0)
    for _ in range(k + 1):                  # 2: both chunks forward
        rank.f(0)
        rank.f(1)
    for _ in range(n - k - 1):              # 3: zero-bubble steps: I, W, F
        rank.b(1, split=True)
        rank.w()
        rank.f(1)
    for i in range(per_chunk - 2 * n + k + 1):  # 4: steady state, all overlapped F&B
        if i == 0 and k == n - 1:
            rank.f(0)                       # the middle rank keeps its first pair apart: smaller bubble
            rank.b(1)
        else:
            rank.fb(0, 1)
        rank.fb(1, 0)
    for _ in range(n - k - 1):              # 5: chunk 1 runs out of forwards
        rank.b(1)
        rank.fb(1, 0)
    split = False
    for i in range(k + 1):                  # 6: backwards; the later half defer their W
        if i == (k + 1) // 2 and k % 2 == 1:
            split = True
        rank.b(1, split=split)
        if i == (k + 1) // 2 and k % 2 == 0:
            split = True
        rank.b(0, split=split)
    for _ in range(n - k - 1):              # 7: W fills the wait for the next chunk-0 gradient
        rank.w()
        rank.b(0, split=True)
    for _ in range(k + 1):                  # 8: the deferred W
        rank.w()
    assert not rank.pending_w, "every split backward gets its W"


def schedule_dualpipe(pp: int, n_micro: int) -> list[list[Action]]:
    """DualPipe (DeepSeek-V3 §3.2.1, Figure 5): micro-batches enter from both ends, half at rank 0
    (direction 0) and half at rank pp-1 (direction 1). Rank r holds stage r of direction 0 and stage
    pp-1-r of direction 1, so a forward of one direction can overlap a backward of the other.

    ``n_micro`` counts both directions (n_micro / 2 each), as in the official ``step(num_chunks=...)``.
    """
    _check_counts("DualPipe", pp, n_micro, min_pp=2)
    if pp % 2:
        raise ValueError(f"DualPipe: pp ({pp}) must be even (two halves feed each other); "
                         f"use pp={pp + 1}, or DualPipeV for any number of ranks")
    if n_micro % 2 or n_micro < 2 * pp:
        raise ValueError(f"DualPipe: n_micro ({n_micro}) must be even and >= 2 * pp ({2 * pp}); "
                         f"use n_micro={max(2 * pp, n_micro + n_micro % 2)}")
    out = []
    for r in range(pp):
        own, other = (r, 0), (pp - 1 - r, 1)   # (stage, direction) of each local chunk
        first_half = r < pp // 2
        rank = _Rank(r, [own, other] if first_half else [other, own])
        _dual_steps(rank, pp // 2, min(r, pp - 1 - r), n_micro // 2)
        out.append(rank.actions)
    return out


def schedule_dualpipev(pp: int, n_micro: int) -> list[list[Action]]:
    """DualPipeV (deepseek-ai/DualPipe ``dualpipev.py``; ``torch...ScheduleDualPipeV``): DualPipe's
    two directions folded into one V-shaped path over 2 * pp stages, so every rank holds two stages
    (r and 2pp-1-r) of one model copy; all micro-batches enter at rank 0 and their loss is on rank 0."""
    _check_counts("DualPipeV", pp, n_micro)
    if n_micro < 2 * pp:
        raise ValueError(f"DualPipeV: n_micro ({n_micro}) must be >= 2 * pp ({2 * pp}); use n_micro={2 * pp}")
    out = []
    for r in range(pp):
        rank = _Rank(r, [(r, 0), (2 * pp - 1 - r, 0)])
        _dual_steps(rank, pp, r, n_micro)
        out.append(rank.actions)
    return out


def make_schedule(schedule: str, pp: int, n_micro: int) -> list[list[Action]]:
    """The per-rank action lists of ``schedule`` (one of ``SCHEDULES``)."""
    return {"1f1b": schedule_1f1b, "zb1p": schedule_zb1p, "dualpipe": schedule_dualpipe,
            "dualpipev": schedule_dualpipev}[_name(schedule)](pp, n_micro)


@dataclass(frozen=True)
class Costs:
    """Chunk costs in any time unit, named as in the paper's Table 2.

    ``F``: forward chunk; ``B``: full backward chunk; ``W``: its weight-gradient part (so an ``I``
    step costs ``B - W``); ``FB``: a forward and a full backward chunk overlapped (the paper's F&B;
    ``None`` = ``F + B``, no gain; it may be below ``max(F, B)`` when F and B include communication
    that the pair hides, see ``overlap_pair``); ``comm``: latency of a pipeline send between two ranks.
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "comm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Costs: {name} ({getattr(self, name)}) must be >= 0")
        if self.W > self.B:
            raise ValueError(f"Costs: W ({self.W}) must be <= B ({self.B}): W is part of the full backward")
        if self.FB is not None and not 0 <= self.FB <= self.F + self.B:
            raise ValueError(f"Costs: FB ({self.FB}) must lie in [0, F + B = {self.F + self.B}]: "
                             f"overlapping a pair never makes it slower than running both in a row")

    @property
    def fb(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def duration(self, kind: str) -> float:
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W, "FB": self.fb}[kind]


@dataclass
class Timeline:
    """What ``simulate`` measured. Lists are indexed by rank; ``start[r][i]``, ``end[r][i]`` belong to
    ``actions[r][i]``.

    * ``busy[r]``: the time rank r computes (the sum of its actions' costs);
    * ``bubble[r]``: ``makespan - busy[r]``, the time rank r is idle between the step's start (0)
      and its end (the makespan: every rank waits for the slowest before the optimizer step);
    * ``peak_activations[r]``: the most (micro-batch, stage) chunks rank r has run forward and not yet
      backward for input (an ``FB`` counts its forward first); Table 2's unit is one such chunk;
    * ``param_stages[r]``: the stages rank r holds, in units of one stage's parameters.
    """

    actions: list[list[Action]]
    costs: Costs
    start: list[list[float]]
    end: list[list[float]]
    peak_activations: list[int]
    param_stages: list[int]

    @property
    def pp(self) -> int:
        return len(self.actions)

    @property
    def makespan(self) -> float:
        return max((e[-1] for e in self.end if e), default=0.0)

    @property
    def busy(self) -> list[float]:
        return [sum(self.costs.duration(a.kind) for a in acts) for acts in self.actions]

    @property
    def bubble(self) -> list[float]:
        return [self.makespan - b for b in self.busy]


def _needs(unit: Action, last_stage: dict[int, int]) -> list[tuple]:
    """The results a unit waits for, as (what, direction, micro, stage) keys."""
    d, m, s = unit.direction, unit.micro, unit.stage
    if unit.kind == "F":
        return [("F", d, m, s - 1)] if s > 0 else []
    if unit.kind in ("B", "I"):   # the output gradient from the next stage, and our own forward
        return [("F", d, m, s)] + ([("G", d, m, s + 1)] if s < last_stage[d] else [])
    return [("I", d, m, s)]       # W after its I


def _produces(unit: Action) -> list[tuple]:
    key = (unit.direction, unit.micro, unit.stage)
    return {"F": [("F", *key)], "B": [("G", *key)], "I": [("G", *key), ("I", *key)], "W": [("W", *key)]}[unit.kind]


def _check_actions(actions: list[list[Action]]) -> dict[int, int]:
    """One-line errors for malformed schedules; returns the last stage of each direction."""
    if not actions or not all(isinstance(acts, (list, tuple)) for acts in actions):
        raise ValueError("simulate: actions must be a non-empty list of per-rank action lists")
    seen: dict[tuple, Action] = {}
    holders: dict[tuple[int, int], int] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if not isinstance(a, Action) or a.kind not in KINDS:
                raise ValueError(f"simulate: rank {r} has {a!r}; expected Action with kind in {KINDS}")
            if a.rank != r:
                raise ValueError(f"simulate: {a} is in rank {r}'s list but says rank {a.rank}")
            if (a.kind == "FB") != (len(a.parts) == 2):
                raise ValueError(f"simulate: {a}: an FB action has exactly two parts (F, B), others none")
            for u in a.units():
                if holders.setdefault((u.stage, u.direction), r) != r:
                    raise ValueError(f"simulate: stage {u.stage} (direction {u.direction}) runs on ranks "
                                     f"{holders[(u.stage, u.direction)]} and {r}; a stage lives on one rank")
                for key in _produces(u):
                    if key in seen:
                        raise ValueError(f"simulate: {u} on rank {r} repeats {seen[key]}; each runs once")
                    seen[key] = u
    last = {}
    for (stage, d) in holders:
        last[d] = max(last.get(d, 0), stage)
    for (what, d, m, s), u in seen.items():
        missing = None
        if what == "F" and ("G", d, m, s) not in seen:
            missing = f"no backward for F{m} at stage {s}"
        elif what == "F" and s < last[d] and ("F", d, m, s + 1) not in seen:
            missing = f"micro-batch {m} stops at stage {s}"
        elif what == "I" and ("W", d, m, s) not in seen:
            missing = f"{u} has no W"
        elif what == "G" and u.kind == "B" and ("W", d, m, s) in seen:
            missing = f"{u} is a full backward and also has a W"
        if missing:
            raise ValueError(f"simulate: incomplete schedule: {missing} (direction {d})")
    return last


def simulate(actions: list[list[Action]], costs: Costs | None = None) -> Timeline:
    """Replay per-rank action lists with chunk ``costs`` and return the timeline.

    Every action starts as soon as its rank is free (ranks run their lists in order, one action at a
    time) and its inputs exist: a forward needs the previous stage's forward of that micro-batch, a
    backward (B or I) its own forward and the next stage's backward, a W its I. An input made on
    another rank arrives ``costs.comm`` later. An ``FB`` starts when both halves may and takes
    ``costs.FB``. Raises a one-line ValueError for a malformed list or one that deadlocks.
    """
    costs = Costs() if costs is None else costs
    if not isinstance(costs, Costs):
        raise ValueError(f"simulate: costs must be a Costs, got {type(costs).__name__}")
    last = _check_actions(actions)
    done: dict[tuple, tuple[float, int]] = {}   # key -> (time it is ready, rank that made it)
    start = [[0.0] * len(acts) for acts in actions]
    end = [[0.0] * len(acts) for acts in actions]
    nxt, free = [0] * len(actions), [0.0] * len(actions)
    left = sum(len(acts) for acts in actions)
    while left:
        progressed = False
        for r, acts in enumerate(actions):
            while nxt[r] < len(acts):
                a = acts[nxt[r]]
                needs = [k for u in a.units() for k in _needs(u, last)]
                if any(k not in done for k in needs):
                    break
                t0 = max([free[r]] + [done[k][0] + (costs.comm if done[k][1] != r else 0.0) for k in needs])
                t1 = t0 + costs.duration(a.kind)
                start[r][nxt[r]], end[r][nxt[r]], free[r] = t0, t1, t1
                for u in a.units():
                    for key in _produces(u):
                        done[key] = (t1, r)
                nxt[r] += 1
                left -= 1
                progressed = True
        if not progressed:
            stuck = [f"rank {r} at {acts[nxt[r]]}" for r, acts in enumerate(actions) if nxt[r] < len(acts)]
            raise ValueError(f"simulate: the schedule deadlocks ({'; '.join(stuck)}): "
                             f"an action waits for one that comes later in some rank's list")
    return Timeline(actions, costs, start, end, _peak_activations(actions), _param_stages(actions))


def _peak_activations(actions: list[list[Action]]) -> list[int]:
    peaks = []
    for acts in actions:
        live = peak = 0
        for a in acts:
            for u in a.units():
                live += {"F": 1, "B": -1, "I": -1}.get(u.kind, 0)
                peak = max(peak, live)
        peaks.append(peak)
    return peaks


def _param_stages(actions: list[list[Action]]) -> list[int]:
    return [len({(u.stage, u.direction) for a in acts for u in a.units()}) for acts in actions]


def bubble_formula(schedule: str, pp: int, F: float, B: float, W: float = 0.0, FB: float | None = None) -> float:
    """The bubble of the paper's Table 2 (DeepSeek-V3 §3.2.1) for ``pp`` ranks.

    1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe (PP/2-1)(F&B+B-3W) with PP = pp. DualPipeV has
    DualPipe's bubble for PP = 2 * pp stages on pp ranks: (pp-1)(F&B+B-3W). ``FB=None`` means F + B.
    """
    name = _name(schedule)
    if not isinstance(pp, int) or pp < 1 or (name == "dualpipe" and pp % 2):
        raise ValueError(f"bubble_formula: pp ({pp}) must be a positive int, even for DualPipe")
    fb = F + B if FB is None else FB
    if name == "1f1b":
        return (pp - 1) * (F + B)
    if name == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    half = pp // 2 if name == "dualpipe" else pp
    return (half - 1) * (fb + B - 3 * W)


def table2(schedule: str, pp: int) -> dict[str, int]:
    """Table 2's memory columns for ``pp`` ranks, in the units ``Timeline`` measures: ``parameters`` =
    stages held per rank (each 1/PP of the model: 1x or 2x), ``activations`` = peak in-flight
    (micro-batch, stage) chunks per rank (PP, or PP+1 for DualPipe(V), with PP = ``n_stages``)."""
    name = _name(schedule)
    stages = n_stages(name, pp)
    dual = name in ("dualpipe", "dualpipev")
    return {"parameters": 2 if dual else 1, "activations": stages + 1 if dual else stages}


# Figure 5's palette: forward orange, backward green, weight-gradient blue; the reverse direction darker.
_COLOURS = {("F", 0): "#f8cbad", ("F", 1): "#f4a26b", ("B", 0): "#a9d18e", ("B", 1): "#70ad47",
            ("I", 0): "#c5e0b4", ("I", 1): "#8fc46a", ("W", 0): "#9dc3e6", ("W", 1): "#5b9bd5"}
_LEGEND = {"F": "forward", "B": "backward (full)", "I": "backward for input", "W": "backward for weights",
           "FB": "overlapped forward & backward"}


def plot_timeline(timeline: Timeline, ax=None, title: str | None = None, labels: bool = True):
    """Draw ``timeline`` like the paper's Figure 5: one row per rank (rank 0 on top), one box per
    action coloured by kind and labelled with its micro-batch; an overlapped F&B is a box with a black
    border, forward half above and backward half below. Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if not isinstance(timeline, Timeline):
        raise ValueError(f"plot_timeline: expected the Timeline from simulate(), got {type(timeline).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(min(18, 2 + timeline.makespan / 3), 0.5 + 0.45 * timeline.pp))
    size = 7 if max(map(len, timeline.actions)) <= 40 else 5   # keep labels inside narrow boxes
    for r, acts in enumerate(timeline.actions):
        for a, t0, t1 in zip(acts, timeline.start[r], timeline.end[r]):
            halves = a.units()
            height = 0.8 / len(halves)
            for i, u in enumerate(halves):
                y = r - 0.4 + i * height
                ax.add_patch(Rectangle((t0, y), t1 - t0, height, facecolor=_COLOURS[(u.kind, u.direction)],
                                       edgecolor="white" if a.kind != "FB" else "none", linewidth=0.5))
                if labels and t1 > t0:
                    ax.text((t0 + t1) / 2, y + height / 2, str(u.micro), ha="center", va="center", fontsize=size)
            if a.kind == "FB":
                ax.add_patch(Rectangle((t0, r - 0.4), t1 - t0, 0.8, fill=False, edgecolor="black", linewidth=1.2))
    kinds = sorted({a.kind for acts in timeline.actions for a in acts}, key=KINDS.index)
    handles = [Patch(facecolor=_COLOURS[(k, 0)] if k != "FB" else "white", edgecolor="black" if k == "FB" else "none",
                     label=_LEGEND[k]) for k in kinds]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(handles), fontsize=8,
              frameon=False)
    ax.set_xlim(0, timeline.makespan)
    ax.set_ylim(timeline.pp - 0.5, -0.5)
    ax.set_yticks(range(timeline.pp), [f"rank {r}" for r in range(timeline.pp)])
    ax.set_xlabel("time (chunk cost units)")
    ax.set_ylabel("pipeline rank")
    bubble = max(timeline.bubble)
    ax.set_title(title or f"makespan {timeline.makespan:g}, largest bubble {bubble:g}", fontsize=10)
    return ax
