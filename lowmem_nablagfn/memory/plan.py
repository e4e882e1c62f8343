"""The memory plan as data: which passes an update runs, in which order, over which rows and in what
chunks, what keeps a graph — and where every part lives between them.  Built once per run from the
configuration by :func:`build_plan` and held by the run's components: the trainer's set-up, sampling
and update, the profiler, the planner and the benchmarks all read this one object.  Besides the
update's phases it carries every phase of the run in order (:attr:`MemoryPlan.phase_order`: encode,
sampling, final reward, the update's phases, the optimiser step), the row arithmetic of the run
(:class:`Batches`: transitions kept per trajectory, rows and live rows of a training batch, slots,
chunks, the one-epoch lag, updates per epoch) and the official code's schedule
(:func:`official_memory`).  The executor (:mod:`~lowmem_nablagfn.memory.executor`) runs it, the planner
(:mod:`~lowmem_nablagfn.planner`) costs the same list, and :class:`Placement` applies every other
memory knob (text encoders, VAE encoder, stored trajectories, checkpointing, attention) in one place.

Three schedules compute the same gradients (tests prove it):

``official`` — the official code's order *and granularity* (``train_nablagfn.py``: a loop over the
transition slots ``j`` of the batch, ``B`` rows each, ``loss.backward()`` inside the loop): per slot,
the reference UNet at ``x_t`` with a graph (reverse score), the LoRA UNet at ``x_t`` keeping its graph
to the end, the LoRA UNet at ``x_{t-1}`` + VAE decode + reward with graphs for the reward gradient,
and (residual mode) a second VAE + reward graph hanging off the ``x_t`` graph; then that slot's
backward.  The baseline of every "vs" figure (benchmarks, planner).  Only the order and the graphs
follow the official code: the loss normalisation is ours (one divisor for the batch, docs/algorithm.md).

``naive`` — the same passes with all ``B·(K+1)`` rows of the batch in one graph and one backward:
the plainest computation of the batch loss, kept as the gradient reference of the tests.

``optimized`` — every detached quantity first, each in its own scope and in chunks of
``input_grad_chunk`` rows (rows are independent, so this is exact): reward scores at ``x_{t-1}``
(UNet skipped for last transitions, where ``x̂0 = x_{t-1}``) and at ``x_t`` (live rows only: ``y_B = 0``
on last transitions; the LoRA output recomputed instead of retained), then the reference scores.
Only then the graph that trains, in chunks of ``train_chunk`` rows whose gradients accumulate, so at
most one UNet graph is alive at a time.
"""
from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, fields, replace
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..sampling import Trajectories
from ..subsample import gather

class Mode(str, enum.Enum):
    """``memory.mode``: the schedule of the update's passes (module docstring).  A ``str`` so that a
    configuration's spelling compares equal."""

    OFFICIAL = "official"
    NAIVE = "naive"
    OPTIMIZED = "optimized"


PHASES = ("reference", "policy", "reward_grad_next", "reward_grad_cur", "train")
"""What a phase can compute (each name is also its ``memtrack`` mark and the planner's cost entry):
``reference`` — the reference policy's forward score at ``x_{t-1}`` (and reverse score at ``x_t``);
``policy`` — the LoRA policy's ε at ``x_t`` with its graph (kept for the group's ``train`` phase);
``reward_grad_next`` / ``reward_grad_cur`` — ``∇ R(decode(x̂0))`` at ``x_{t-1}`` / ``x_t``;
``train`` — the loss of the rows and its backward (the graph that trains)."""

SAMPLING_PHASES = ("encode", "sampling", "final_reward")
"""The phases of sampling an epoch, before any update: prompt embeddings, the sampler's loop
(no graph), the final samples' reward."""
STEP_PHASE = "optimizer"
"""The phase of the optimiser step that ends an update."""
MONITOR_PHASE = "monitor"
"""The reward-hacking monitor's scoring of held-out samples (``monitor.*``), every few epochs."""

#: The official code's memory schedule (the baseline of every "vs" figure: planner, benchmarks): its
#: passes and graphs (``mode``), every checkpoint off, no chunks, every sampled step stored, nothing
#: offloaded.  :func:`official_memory` applies it to a ``MemoryConfig``.
OFFICIAL = {"mode": "official", "checkpoint_unet": False, "checkpoint_vae": False, "checkpoint_reward": False,
            "checkpoint_flow": False, "input_grad_chunk": 0, "train_chunk": 0, "store_only_trained": False,
            "offload_trajectories": False, "offload_text_encoder": False}


def official_memory(mem):
    """``mem`` (a :class:`~lowmem_nablagfn.config.MemoryConfig`) with the official schedule
    (:data:`OFFICIAL`); the attention backend and the transitions' storage dtype are kept."""
    return replace(mem, **OFFICIAL)


@dataclass(frozen=True)
class Phase:
    """One pass of an update over a group of rows.

    Attributes:
        name: one of :data:`PHASES`.
        chunk: rows per call (0: the whole group in one call).
        live_only: only the rows that are not a trajectory's last transition (the others need nothing).
        keep_graph: the official code's pass: the whole group in one call, the LoRA graph at ``x_t``
            kept from the ``policy`` phase to the ``train`` phase (and the reference graph built for
            the reverse score in no-flow mode too).
    """

    name: str
    chunk: int = 0
    live_only: bool = False
    keep_graph: bool = False

    def call_rows(self, n: int) -> int:
        """Rows of one call of this phase over ``n`` rows (the chunk rule: a chunk of 0 is one call)."""
        return min(self.chunk or n, n)

    def calls(self, n: int) -> int:
        """Calls of this phase over ``n`` rows."""
        return math.ceil(n / self.call_rows(n)) if n > 0 else 0

    @property
    def skips_unet_on_last(self) -> bool:
        """At a trajectory's last transition ``x̂0 = x_{t-1}`` (timestep 0): this phase's reward
        gradient there needs no UNet call (the optimized pass at ``x_{t-1}``; the official pass calls
        the UNet on every row, as the official code does)."""
        return self.name == "reward_grad_next" and not self.keep_graph


@dataclass(frozen=True)
class Placement:
    """Where the parts live and what recomputes (every ``cfg.memory`` knob outside the update's
    passes).  The trainer's set-up and sampling, and the planner's static sizes, read it."""

    offload_text_encoder: bool = False
    offload_trajectories: bool = False
    store_only_trained: bool = True
    checkpoint_unet: bool = False
    checkpoint_vae: bool = False
    checkpoint_reward: bool = False
    checkpoint_flow: bool = False
    attention: str = "sdpa"
    transition_dtype: str = "fp32"

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the sampler stores the kept transitions in (``memory.transition_dtype``)."""
        from ..dtypes import DTYPES

        return DTYPES[self.transition_dtype]

    @property
    def checkpointing(self) -> Dict[str, bool]:
        """Part -> whether its gradient checkpointing is on: the one place that says which module each
        ``memory.checkpoint_*`` flag switches (the planner's probe flags use the same part names)."""
        return {"unet": self.checkpoint_unet, "vae": self.checkpoint_vae, "reward": self.checkpoint_reward,
                "flow": self.checkpoint_flow}

    def host_modules(self, parts) -> List[nn.Module]:
        """Modules kept in host memory: the VAE encoder always (training only decodes), the text
        encoders with ``offload_text_encoder`` (they visit the device inside :meth:`encoders_on`)."""
        from ..models import vae_encoder_modules

        out = list(vae_encoder_modules(parts.vae))
        if self.offload_text_encoder:
            out += list(parts.text_encoders)
        return out

    def place(self, parts) -> None:
        """After the frozen parts are on the device: move :meth:`host_modules` to the host."""
        for module in self.host_modules(parts):
            module.to("cpu")

    @contextlib.contextmanager
    def encoders_on(self, parts, device: torch.device) -> Iterator[None]:
        """The text encoders on ``device`` for the body (a no-op unless they are offloaded)."""
        if not self.offload_text_encoder:
            yield
            return
        for te in parts.text_encoders:
            te.to(device)
        try:
            yield
        finally:
            for te in parts.text_encoders:
                te.to("cpu")

    def sampler_keep(self, keep: Tensor) -> Optional[Tensor]:
        """The ``keep`` the sampler stores (select-before-sample), or None: every step is stored."""
        return keep if self.store_only_trained else None

    def kept(self, traj: Trajectories, keep: Tensor) -> Trajectories:
        """Only the transitions that will train (a gather when the sampler stored every step)."""
        if self.store_only_trained:
            return traj
        picked = gather({"latents": traj.latents, "next_latents": traj.next_latents,
                         "eps_sampled": traj.eps_sampled}, keep.to(traj.latents.device))
        return Trajectories(step_index=keep.to(traj.latents.device), prompt_embeds=traj.prompt_embeds,
                            final_latents=traj.final_latents, prompts=traj.prompts, **picked)

    def park(self, traj: Trajectories, device: Optional[torch.device] = None) -> Trajectories:
        """Stored samples between sampling and training: on the device, or (``offload_trajectories``)
        in host memory, page-locked when CUDA is there so that the copies back can overlap.
        ``device``: the training device, for samples that are not there yet (a resumed buffer,
        loaded into host memory); None: they are (fresh samples)."""
        if not self.offload_trajectories:
            return traj if device is None else traj.to(device)
        host = traj.to("cpu")
        return host.pin_memory() if torch.cuda.is_available() else host

    def apply_checkpointing(self, unet: nn.Module, vae: Optional[nn.Module], reward: Optional[nn.Module],
                            flow_model: Optional[nn.Module]) -> None:
        """Gradient checkpointing of each part switched to the plan's flag for it, and the attention
        processor of ``memory.attention`` on the UNet, VAE and flow model."""
        from ..models import set_attention_backend

        set_attention_backend((unet, vae, flow_model), self.attention)
        switch_checkpointing(self.checkpointing, unet, vae, reward, flow_model)


def switch_checkpointing(parts: Dict[str, bool], unet: nn.Module, vae: Optional[nn.Module],
                         reward: Optional[nn.Module], flow_model: Optional[nn.Module]) -> None:
    """Gradient checkpointing of each model switched to ``parts[name]`` (absent: off), by the part names
    of :attr:`Placement.checkpointing` (the planner's traces switch their probes' flags through this too)."""
    from ..models import set_checkpointing

    for part, module in {"unet": unet, "vae": vae, "reward": reward, "flow": flow_model}.items():
        set_checkpointing(module, bool(parts.get(part, False)))


@dataclass(frozen=True)
class Batches:
    """The row arithmetic of a run: how many trajectories are sampled and trained together, how many
    transitions of each are kept, and what follows from it.  The trainer, the profiler and the
    planner read these numbers here (the executor counts the rows it is given)."""

    sampling_batch: int
    """Trajectories per sampling batch (``sampling.batch_size``)."""
    sampling_batches: int
    """Sampling batches per epoch (``sampling.num_batches_per_epoch``)."""
    num_steps: int
    """Sampler steps per trajectory ``T``."""
    kept: int
    """Transitions trained per trajectory (:func:`~lowmem_nablagfn.subsample.num_kept`: ``K + 1``, or ``T``)."""
    train_batch: int
    """Trajectories per training batch (``training.batch_size``)."""
    accumulation: int
    """Training batches per optimiser update (``training.gradient_accumulation_steps``)."""
    on_policy: bool = False
    """Train on this epoch's samples (``training.on_policy``) instead of the previous epoch's."""

    @classmethod
    def of(cls, cfg) -> "Batches":
        from ..subsample import num_blocks, num_kept

        s, t = cfg.sampling, cfg.training
        kept = num_kept(s.num_steps, num_blocks(s.num_steps, cfg.model.timestep_fraction))
        return cls(s.batch_size, s.num_batches_per_epoch, s.num_steps, kept, t.batch_size,
                   t.gradient_accumulation_steps, t.on_policy)

    @property
    def rows(self) -> int:
        """Rows of one training batch: ``B · kept`` transitions."""
        return self.train_batch * self.kept

    @property
    def live(self) -> int:
        """Rows of a training batch that are not a trajectory's last transition (each trajectory
        keeps its last one): those call the UNet at ``x_{t-1}`` and need a reward gradient at ``x_t``."""
        return self.rows - self.train_batch

    @property
    def trajectories_per_epoch(self) -> int:
        return self.sampling_batch * self.sampling_batches

    @property
    def trajectories_per_update(self) -> int:
        return self.train_batch * self.accumulation

    @property
    def held_epochs(self) -> int:
        """Epochs of samples alive at once: the official loop trains on the previous epoch's samples
        while it holds the new ones (2); on-policy training holds one."""
        return 1 if self.on_policy else 2

    @property
    def updates_per_epoch(self) -> int:
        """Optimiser updates of one epoch (validation makes the division exact)."""
        return max(1, self.trajectories_per_epoch // self.trajectories_per_update)


@dataclass(frozen=True)
class MemoryPlan:
    """The update's phases in order, the placement, and (a run's plan) its row arithmetic.

    ``batches`` is None for a plan built from a ``MemoryConfig`` alone (tests of the executor, the
    analytic validation): those give the executor its phases and leave the row counts to the rows."""

    phases: Tuple[Phase, ...]
    mode: Mode = Mode.OPTIMIZED
    placement: Placement = Placement()
    residual: bool = True
    batches: Optional[Batches] = None
    monitor: bool = False
    """The run scores held-out samples with watched rewards (``monitor.rewards``): a phase of its own."""

    def __post_init__(self):
        unknown = [p.name for p in self.phases if p.name not in PHASES]
        if unknown:
            raise ValueError(f"unknown phase(s) {unknown} in a memory plan; the phases are {PHASES}")

    @property
    def per_slot(self) -> bool:
        """Run the phases once per transition slot, one backward each (the official loop)."""
        return self.mode is Mode.OFFICIAL

    @property
    def phase_order(self) -> Tuple[str, ...]:
        """Every phase of a run in order: sampling's, the update's (this plan's), the optimiser step's,
        and the monitor's when the run has one."""
        return (SAMPLING_PHASES + tuple(p.name for p in self.phases) + (STEP_PHASE,)
                + ((MONITOR_PHASE,) if self.monitor else ()))

    def phase(self, name: str) -> Optional[Phase]:
        return next((p for p in self.phases if p.name == name), None)

    def reference_needs_reverse(self, ph: Phase) -> bool:
        """Whether the reference pass builds a graph for the reverse score: in residual mode, and in
        the official pass always (the official code builds it in no-flow mode too)."""
        return self.residual or ph.keep_graph

    # ---- row arithmetic of one training batch (needs ``batches``)
    def _b(self) -> Batches:
        if self.batches is None:
            raise ValueError("this memory plan was built from memory options alone; build it from the whole "
                             "configuration (build_plan(cfg)) for its row arithmetic")
        return self.batches

    def phase_rows(self, ph: Phase) -> int:
        """Rows a phase runs on over one training batch (a ``live_only`` phase: the live rows)."""
        b = self._b()
        return b.live if ph.live_only else b.rows

    def unet_rows(self, ph: Phase) -> int:
        """Rows of the phase that call the UNet (the last transitions skip it where
        :attr:`Phase.skips_unet_on_last`)."""
        return self._b().live if ph.skips_unet_on_last else self.phase_rows(ph)

    def groups(self) -> Tuple[int, int]:
        """``(rows per group, groups per training batch)``: the batch in one group, or (official) one
        group of ``B`` rows per transition slot."""
        b = self._b()
        return (b.train_batch, b.kept) if self.per_slot else (b.rows, 1)


def _update_phases(mem, residual: bool) -> Tuple[Phase, ...]:
    if mem.mode in (Mode.NAIVE, Mode.OFFICIAL):
        names = ["reference", "policy", "reward_grad_next"] + (["reward_grad_cur"] if residual else []) + ["train"]
        return tuple(Phase(n, keep_graph=True) for n in names)
    ci, ct = mem.input_grad_chunk, mem.train_chunk
    phases = [Phase("reward_grad_next", ci)]
    if residual:
        phases.append(Phase("reward_grad_cur", ci, live_only=True))
    return tuple(phases + [Phase("reference", ci), Phase("train", ct)])


def build_plan(cfg=None, residual: Optional[bool] = None) -> MemoryPlan:
    """The plan of a run: ``cfg`` a :class:`~lowmem_nablagfn.config.Config` (residual ∇-DB unless
    ``model.no_flow``; with the row arithmetic).  Built once per run and handed to whatever needs it.

    ``cfg`` may also be a ``MemoryConfig`` alone (or None: the defaults) with ``residual`` given:
    the update's phases and placement without row arithmetic (the executor's tests, the analytic
    validation)."""
    from ..config import Config, MemoryConfig

    batches, monitor = None, False
    if isinstance(cfg, Config):
        residual = not cfg.model.no_flow if residual is None else residual
        batches, monitor = Batches.of(cfg), bool(cfg.monitor.rewards)
        mem = cfg.memory
    else:
        mem = cfg if cfg is not None else MemoryConfig()
        residual = True if residual is None else residual
    placement = Placement(**{f.name: getattr(mem, f.name) for f in fields(Placement)})  # same names as MemoryConfig
    mode = Mode(mem.mode)
    return MemoryPlan(_update_phases(mem, residual), mode, placement, residual, batches, monitor)
