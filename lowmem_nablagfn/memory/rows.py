"""The rows an update trains on: a flat batch of sampled transitions ``x_t -> x_{t-1}``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..sampling import Cond, Trajectories


@dataclass
class Rows:
    """A flat batch of ``N`` transitions (float32 on the compute device).

    x, x_next, eps_sampled: (N, C, H, W) latents (any trailing shape: (N, D) in the analytic
    validation); step_index: (N,) long; cond: (N, L, D) or a
    :class:`~lowmem_nablagfn.sampling.Conditioning` of N rows (SDXL); end: (N,) bool, the last
    transition of a trajectory; slot: (N,) long, the transition slot ``0 … K`` of each row within its
    trajectory (the official schedule trains slot by slot), or None: all rows one slot.
    """

    x: Tensor
    x_next: Tensor
    eps_sampled: Tensor
    step_index: Tensor
    cond: Cond
    prompts: List[str]
    end: Tensor
    slot: Optional[Tensor] = None

    @staticmethod
    def from_trajectories(traj: Trajectories, num_steps: int, device) -> "Rows":
        """(B, S) stored transitions -> B·S rows in float32 on ``device`` (trajectory-major)."""
        b, s = traj.step_index.shape
        step = traj.step_index.reshape(-1).to(device)
        return Rows(
            x=traj.latents.flatten(0, 1).to(device, torch.float32),
            x_next=traj.next_latents.flatten(0, 1).to(device, torch.float32),
            eps_sampled=traj.eps_sampled.flatten(0, 1).to(device, torch.float32),
            step_index=step,
            cond=traj.prompt_embeds.to(device).repeat_interleave(s, 0),
            prompts=[p for p in traj.prompts for _ in range(s)] if traj.prompts else [""] * (b * s),
            end=step == num_steps - 1,
            slot=torch.arange(s, device=device).repeat(b),
        )

    def __len__(self) -> int:
        return self.x.shape[0]

    def norms(self, transitions_per_trajectory: int) -> Tuple[float, float]:
        """The batch's loss divisors ``(row_norm, end_norm)`` (docs/algorithm.md, "Loss"): the mean over
        rows, and the terminal term's mean over last transitions inside the mean over a trajectory's
        transitions.  Chunks of the batch pass these on, so that they sum to the batch loss."""
        return float(len(self)), (float(self.end.sum()) + 1e-6) * transitions_per_trajectory

    def chunk(self, size: int) -> List["Rows"]:
        """Consecutive pieces of ``size`` rows (the last may be shorter): ``Phase.call_rows`` decides it."""
        n = len(self)
        return [self.take(slice(i, min(i + size, n))) for i in range(0, n, size)]

    def take(self, idx) -> "Rows":
        prompts = self.prompts[idx] if isinstance(idx, slice) else [self.prompts[i] for i in idx.tolist()]
        return Rows(self.x[idx], self.x_next[idx], self.eps_sampled[idx], self.step_index[idx],
                    self.cond[idx], prompts, self.end[idx], None if self.slot is None else self.slot[idx])

    def live(self) -> Tensor:
        """Indices of the rows that are not a trajectory's last transition."""
        return (~self.end).nonzero().squeeze(1)

    def slots(self) -> List["Rows"]:
        """The rows of each transition slot, in slot order (one group when ``slot`` is None)."""
        if self.slot is None:
            return [self]
        return [self.take((self.slot == s).nonzero().squeeze(1)) for s in self.slot.unique(sorted=True).tolist()]
