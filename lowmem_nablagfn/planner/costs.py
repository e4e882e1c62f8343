"""What each phase of the memory plan costs on one training batch.

The planner costs the plan the executor runs: :func:`update_costs` walks
the run's ``MemoryPlan.phases`` and costs each phase from the profile's probes — the
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
from .probes import Probes

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
    """The probes of one training batch of the plan (its row arithmetic: :class:`~lowmem_nablagfn.memory.Batches`),
    with the checkpointing flags and attention kernels of the plan."""

    def __init__(self, profile: Probes, plan: MemoryPlan, math_u: dict, math_f: dict):
        ck = dict(plan.placement.checkpointing)  # part -> flag: the probes' flags use the same names
        ck["reward"] = ck["reward"] and profile.static["reward_has_blocks"]
        residual = plan.residual
        self.profile, self.plan = profile, plan
        self.flags_u = {"unet": ck["unet"], **math_u}
        self.flags_v = {"vae": ck["vae"], **math_u}
        self.flags_r = {"reward": ck["reward"]}
        self.math_u = math_u
        self.flags_train = dict(self.flags_u, flow=ck["flow"], **math_f) if residual else self.flags_u
        self.flags_graph = dict(ck, flow=residual and ck["flow"], **math_u, **(math_f if residual else {}))

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


def _reward_grad(b: _Batch, ph: Phase) -> PhaseCost:
    """``∇R`` at ``x_{t-1}`` or ``x_t``: UNet (x̂0), VAE decode and reward, with graphs (the plan says
    which rows call the UNet)."""
    n, unet_n = b.plan.phase_rows(ph), b.plan.unet_rows(ph)
    c = ph.call_rows(n)
    keys = ("flops_f", "flops_b")
    flops = (b.work("unet_chain", b.flags_u, unet_n, c, keys) + b.work("vae", b.flags_v, n, c, keys)
             + b.work("reward", b.flags_r, n, c, keys))
    return PhaseCost(b.chain(min(c, unet_n), c), c, flops)


def _reference(b: _Batch, ph: Phase) -> PhaseCost:
    """The reference UNet's scores (with a graph where the plan builds the reverse score)."""
    n = b.plan.phase_rows(ph)
    c = ph.call_rows(n)
    reverse = b.plan.reference_needs_reverse(ph)
    probe, flags = ("reference", b.flags_u) if reverse else ("reference_nograd", b.math_u)
    return PhaseCost(b.profile.get(probe, flags, rows=c)["P"], c, b.work(probe, flags, n, c, ("flops",)))


def _train(b: _Batch, ph: Phase) -> PhaseCost:
    """The graph that trains: policy (and flow) forward, loss, backward."""
    n = b.plan.phase_rows(ph)
    c = ph.call_rows(n)
    probe = "train" if b.plan.residual else "train_nof"
    peak = b.profile.get(probe, b.flags_train, rows=c)["P"]
    return PhaseCost(peak, c, b.work(probe, b.flags_train, n, c, ("flops",)))


#: Phase name of :data:`lowmem_nablagfn.memory.PHASES` -> its cost on one training batch (a phase
#: without ``keep_graph``).
COSTS: Dict[str, Callable[[_Batch, Phase], PhaseCost]] = {
    "reward_grad_next": _reward_grad,
    "reward_grad_cur": _reward_grad,
    "reference": _reference,
    "train": _train,
}


def _graph_trace(b: _Batch) -> tuple:
    """The executor's keep-graph plan traced whole on one group (the batch, or one slot of B rows):
    each phase's peak, the group's rows and the work of every group of the batch."""
    group_rows, groups = b.plan.groups()
    probe = "naive" if b.plan.residual else "naive_nof"
    marks = b.profile.get(probe, b.flags_graph, rows=group_rows)
    one = b.profile.get(probe, b.flags_graph, rows=1)
    return marks, group_rows, groups * (marks["flops"] + CALL_OVERHEAD * one["flops"])


def update_costs(profile: Probes, plan: MemoryPlan, math_u: dict, math_f: dict) -> Dict[str, PhaseCost]:
    """The cost of each phase of ``plan`` (a run's plan: its row arithmetic) on one training batch, in
    the plan's order (``math_u`` / ``math_f``: the math-attention flags of the UNet and VAE / the
    flow model).  A phase over no rows (``live_only`` with one transition per trajectory) costs nothing."""
    b = _Batch(profile, plan, math_u, math_f)
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
        if plan.phase_rows(ph) <= 0:
            continue
        if ph.name not in COSTS:
            raise NotImplementedError(f"the planner has no cost for the phase {ph.name!r} (planner/costs.py COSTS)")
        out[ph.name] = COSTS[ph.name](b, ph)
    return out
