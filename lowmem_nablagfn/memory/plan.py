"""The memory plan as data: which passes an update runs, in which order, over which rows and in what
chunks, what keeps a graph — and where every part lives between them.  Built from ``cfg.memory`` by
:func:`build_plan`; the executor (:mod:`~lowmem_nablagfn.memory.executor`) runs it, the planner
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
from dataclasses import dataclass, fields
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..sampling import Trajectories
from ..subsample import gather

PHASES = ("reference", "policy", "reward_grad_next", "reward_grad_cur", "train")
"""What a phase can compute (each name is also its ``memtrack`` mark and the planner's cost entry):
``reference`` — the reference policy's forward score at ``x_{t-1}`` (and reverse score at ``x_t``);
``policy`` — the LoRA policy's ε at ``x_t`` with its graph (kept for the group's ``train`` phase);
``reward_grad_next`` / ``reward_grad_cur`` — ``∇ R(decode(x̂0))`` at ``x_{t-1}`` / ``x_t``;
``train`` — the loss of the rows and its backward (the graph that trains)."""


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
        from ..models import set_attention_backend, set_checkpointing

        set_attention_backend((unet, vae, flow_model), self.attention)
        for module, on in ((unet, self.checkpoint_unet), (vae, self.checkpoint_vae),
                           (reward, self.checkpoint_reward), (flow_model, self.checkpoint_flow)):
            set_checkpointing(module, on)


@dataclass(frozen=True)
class MemoryPlan:
    """The update's phases in order, whether they run per transition slot, and the placement."""

    phases: Tuple[Phase, ...]
    per_slot: bool = False
    """Run the phases once per transition slot, one backward each (the official loop)."""
    placement: Placement = Placement()

    def phase(self, name: str) -> Optional[Phase]:
        return next((p for p in self.phases if p.name == name), None)


def build_plan(mem=None, residual: bool = True) -> MemoryPlan:
    """The plan of ``mem`` (a :class:`~lowmem_nablagfn.config.MemoryConfig`; None: the defaults) for
    residual ∇-DB (``residual``) or the no-flow objective."""
    from ..config import MemoryConfig

    mem = mem if mem is not None else MemoryConfig()
    placement = Placement(**{f.name: getattr(mem, f.name) for f in fields(Placement)})  # same names as MemoryConfig
    if mem.mode in ("naive", "official"):
        names = ["reference", "policy", "reward_grad_next"] + (["reward_grad_cur"] if residual else []) + ["train"]
        return MemoryPlan(tuple(Phase(n, keep_graph=True) for n in names), mem.mode == "official", placement)
    ci, ct = mem.input_grad_chunk, mem.train_chunk
    phases = [Phase("reward_grad_next", ci)]
    if residual:
        phases.append(Phase("reward_grad_cur", ci, live_only=True))
    phases += [Phase("reference", ci), Phase("train", ct)]
    return MemoryPlan(tuple(phases), False, placement)
