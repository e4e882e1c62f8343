"""What each phase of the memory plan costs on one training batch.

The planner costs the plan the executor runs: :func:`update_costs` walks
``memory.build_plan(cfg.memory, residual).phases`` and costs each phase from the profile's probes — the
peak bytes it adds above the training base, the rows of one of its calls (the GPU allowances scale with
them) and its work (traced FLOPs plus a per-call overhead).  A phase with ``keep_graph`` (the official
code's pass, whose graphs overlap) is read off the trace of the executor running the whole keep-graph
plan (the ``naive`` probe, per group: the batch, or one transition slot with ``per_slot``); any other
phase by its name through :data:`COSTS`, so a new phase of the plan needs one entry there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

from ..memory import MemoryPlan, Phase
from .profile import Profile

#: Relative cost of a pass call beyond its FLOPs: a one-row call runs far from a GPU's peak throughput.
CALL_OVERHEAD = 0.3


@dataclass
class PhaseCost:
    """One phase of the update on one training batch."""

    peak: float
    """Bytes the phase adds above what stays resident through training (its traced peak)."""
    call_rows: int
    """Rows of one call of the phase (the fused-attention scratch of :mod:`.gpu` scales with them)."""
    flops: float
    """Work of the phase over the batch (FLOPs, per-call overhead included)."""


class _Batch:
    """The probes of one training batch: ``rows`` = B·(K+1) rows of which ``live`` are not a
    trajectory's last transition (those rows call the UNet at ``x_{t-1}`` and need a reward gradient
    at ``x_t``), with the checkpointing flags and attention kernels of the plan."""

    def __init__(self, profile: Profile, plan: MemoryPlan, batch_size: int, kept: int, residual: bool,
                 math_u: dict, math_f: dict):
        pl = plan.placement
        self.profile, self.plan, self.residual = profile, plan, residual
        self.batch_size, self.kept = batch_size, kept
        self.rows = batch_size * kept
        self.live = self.rows - batch_size
        blocks = profile.static["reward_has_blocks"]
        self.flags_u = {"unet": pl.checkpoint_unet, **math_u}
        self.flags_v = {"vae": pl.checkpoint_vae, **math_u}
        self.flags_r = {"reward": pl.checkpoint_reward and blocks}
        self.flags_ref = self.flags_u if residual else math_u
        self.flags_train = dict(self.flags_u, flow=pl.checkpoint_flow, **math_f) if residual else self.flags_u
        self.flags_graph = {"unet": pl.checkpoint_unet, "vae": pl.checkpoint_vae, "reward": pl.checkpoint_reward and blocks,
                            "flow": residual and pl.checkpoint_flow, **math_u, **(math_f if residual else {})}

    def call_rows(self, ph: Phase) -> int:
        return min(ph.chunk or self.rows, self.rows)

    def work(self, probe: str, flags: dict, n: float, chunk: float, keys) -> float:
        """FLOPs of ``n`` rows in calls of at most ``chunk`` rows, each with the per-call overhead."""
        if n <= 0:
            return 0.0
        calls = math.ceil(n / chunk)
        one = self.profile.get(probe, flags, rows=1)
        full = self.profile.get(probe, flags, rows=n / calls)
        return calls * sum(full[k] + CALL_OVERHEAD * one[k] for k in keys)

    def chain(self, unet_rows: float, rows: float) -> float:
        """Peak of one reward-gradient call: the UNet graph alive while the VAE and the reward run."""
        get = self.profile.get
        u = get("unet_chain", self.flags_u, rows=unet_rows) if unet_rows > 0 else None
        v, rw = get("vae", self.flags_v, rows=rows), get("reward", self.flags_r, rows=rows)
        fu = u["F"] if u else 0.0
        return max(u["Pf"] if u else 0.0, fu + v["Pf"], fu + v["F"] + max(rw["Pf"], rw["Pb"]),
                   fu + v["Pb"], u["Pb"] if u else 0.0)


def _reward_grad(b: _Batch, ph: Phase, n: int, nxt: bool) -> PhaseCost:
    """``∇R`` at ``x_{t-1}`` (``nxt``) or ``x_t``: UNet (x̂0), VAE decode and reward, with graphs.
    At ``x_{t-1}`` a trajectory's last transition skips the UNet (``x̂0 = x_{t-1}``)."""
    c = min(ph.chunk or n, n)
    skip_last = nxt and not ph.live_only
    unet_n, unet_c = (b.live, min(c, b.live)) if skip_last else (n, c)
    keys = ("flops_f", "flops_b")
    flops = (b.work("unet_chain", b.flags_u, unet_n, c, keys) + b.work("vae", b.flags_v, n, c, keys)
             + b.work("reward", b.flags_r, n, c, keys))
    return PhaseCost(b.chain(unet_c, c), b.call_rows(ph), flops)


def _reference(b: _Batch, ph: Phase, n: int) -> PhaseCost:
    """The reference UNet's scores (with a graph for the reverse score in residual mode)."""
    c = min(ph.chunk or n, n)
    probe = "reference" if b.residual else "reference_nograd"
    peak = b.profile.get(probe, b.flags_ref, rows=c)["P"]
    return PhaseCost(peak, b.call_rows(ph), b.work(probe, b.flags_ref, n, c, ("flops",)))


def _train(b: _Batch, ph: Phase, n: int) -> PhaseCost:
    """The graph that trains: policy (and flow) forward, loss, backward."""
    c = min(ph.chunk or n, n)
    probe = "train" if b.residual else "train_nof"
    peak = b.profile.get(probe, b.flags_train, rows=c)["P"]
    return PhaseCost(peak, b.call_rows(ph), b.work(probe, b.flags_train, n, c, ("flops",)))


#: Phase name of :data:`lowmem_nablagfn.memory.PHASES` -> its cost on ``n`` rows (a phase without
#: ``keep_graph``).
COSTS: Dict[str, Callable[[_Batch, Phase, int], PhaseCost]] = {
    "reward_grad_next": lambda b, ph, n: _reward_grad(b, ph, n, nxt=True),
    "reward_grad_cur": lambda b, ph, n: _reward_grad(b, ph, n, nxt=False),
    "reference": _reference,
    "train": _train,
}


def _graph_trace(b: _Batch) -> tuple:
    """The executor's keep-graph plan traced whole on one group (the batch, or one slot of B rows):
    each phase's peak, the group's rows and the work of every group of the batch."""
    group_rows, groups = (b.batch_size, b.kept) if b.plan.per_slot else (b.rows, 1)
    probe = "naive" if b.residual else "naive_nof"
    marks = b.profile.get(probe, b.flags_graph, rows=group_rows)
    one = b.profile.get(probe, b.flags_graph, rows=1)
    return marks, group_rows, groups * (marks["flops"] + CALL_OVERHEAD * one["flops"])


def update_costs(profile: Profile, plan: MemoryPlan, batch_size: int, kept: int, residual: bool,
                 math_u: dict, math_f: dict) -> Dict[str, PhaseCost]:
    """The cost of each phase of ``plan`` on a batch of ``batch_size`` trajectories of ``kept``
    transitions, in the plan's order (``math_u`` / ``math_f``: the math-attention flags of the
    UNet and VAE / the flow model).  A ``live_only`` phase over no live rows costs nothing."""
    b = _Batch(profile, plan, batch_size, kept, residual, math_u, math_f)
    graph, flops = None, 0.0
    out: Dict[str, PhaseCost] = {}
    for ph in plan.phases:
        if ph.keep_graph:
            if graph is None:
                graph = _graph_trace(b)
                flops = graph[2]  # the whole keep-graph plan's work, booked on its first phase
            marks, group_rows, _ = graph
            if ph.name in marks:
                out[ph.name] = PhaseCost(marks[ph.name], group_rows, flops)
                flops = 0.0
            continue
        n = b.live if ph.live_only else b.rows
        if n <= 0:
            continue
        if ph.name not in COSTS:
            raise NotImplementedError(f"the planner has no cost for the phase {ph.name!r} (planner/costs.py COSTS)")
        out[ph.name] = COSTS[ph.name](b, ph, n)
    return out
