"""Sampling trajectories with classifier-free guidance into a typed container.

The sampler works with any noise-prediction function ``eps_fn(x, timesteps, cond) -> eps``; a
diffusers UNet with CFG is one such function (:func:`cfg_eps_fn`).  Noise is drawn exactly as
diffusers' ``StableDiffusionPipeline`` draws it (initial latents, then one draw per step from the same
generator), so a saved LoRA loaded into the pipeline reproduces a run's sample at a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .diffusion import StepSchedule, step_mean

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Trajectories:
    """Stored transitions of ``B`` trajectories, ``S`` kept per trajectory.

    Attributes:
        latents: (B, S, C, H, W) ``x_t`` of each kept transition.
        next_latents: (B, S, C, H, W) ``x_{t-1}``.
        eps_sampled: (B, S, C, H, W) guided noise prediction at ``x_t`` during sampling (for reg).
        step_index: (B, S) long, index ``j`` of the transition in the schedule.
        prompt_embeds: (B, L, D) text-encoder states of each trajectory's prompt.
        final_latents: (B, C, H, W) ``x_0``.
        prompts: the B prompts.
        rewards: (B,) float32 reward of the final image, once computed.
    """

    latents: Tensor
    next_latents: Tensor
    eps_sampled: Tensor
    step_index: Tensor
    prompt_embeds: Tensor
    final_latents: Tensor
    prompts: List[str]
    rewards: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def _map(self, fn) -> "Trajectories":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = fn(v) if isinstance(v, Tensor) else v
        return Trajectories(**out)

    def to(self, device, non_blocking: bool = False) -> "Trajectories":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Trajectories":
        return self._map(lambda t: t.pin_memory())

    def select(self, rows: Tensor) -> "Trajectories":
        """Trajectories at ``rows`` (a (n,) long index)."""
        sub = self._map(lambda t: t[rows.to(t.device)])
        return replace(sub, prompts=[self.prompts[i] for i in rows.tolist()])

    @staticmethod
    def cat(items: Sequence["Trajectories"]) -> "Trajectories":
        out = {}
        for f in fields(Trajectories):
            vals = [getattr(t, f.name) for t in items]
            if f.name == "prompts":
                out[f.name] = [p for v in vals for p in v]
            elif vals[0] is None:
                out[f.name] = None
            else:
                out[f.name] = torch.cat(vals)
        return Trajectories(**out)

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: Sequence[str], device) -> Tensor:
    """Text-encoder states (B, L, D), as ``StableDiffusionPipeline.encode_prompt`` computes them."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def cfg_eps_fn(unet: nn.Module, uncond_embeds: Tensor, guidance_scale: float) -> EpsFn:
    """``eps(x, t, cond) = ε_u + w (ε_c - ε_u)``, one UNet call on the doubled batch ``[uncond; cond]``.

    The UNet runs in its own dtype; the guided output is returned in ``x``'s dtype.
    """
    dtype = next(unet.parameters()).dtype

    def eps_fn(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        n = x.shape[0]
        uncond = uncond_embeds.to(cond.dtype).expand(n, *uncond_embeds.shape[1:])
        out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]),
                   encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)).sample.to(x.dtype)
        eps_u, eps_c = out.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return eps_fn


@torch.no_grad()
def sample(eps_fn: EpsFn, sched: StepSchedule, cond: Tensor, latent_shape: Sequence[int],
           generator: torch.Generator, keep: Optional[Tensor] = None, prompts: Sequence[str] = (),
           device=None, storage_dtype: torch.dtype = torch.float32,
           progress: Optional[Callable[[int], None]] = None) -> Trajectories:
    """Run the sampler for ``B = cond.shape[0]`` trajectories.

    Args:
        eps_fn: guided noise prediction.
        sched: the sampler's per-step schedule.
        cond: (B, L, D) prompt embeddings.
        latent_shape: (C, H, W).
        generator: CPU generator; noise is drawn from it like the diffusers pipeline does.
        keep: (B, S) long step indices to store (select-before-sample); ``None`` keeps all T.
        storage_dtype: dtype of the stored transitions.
    """
    device = device or cond.device
    b, steps = cond.shape[0], sched.num_steps
    if keep is None:
        keep = torch.arange(steps).expand(b, steps)
    keep = keep.to(device)
    shape = (b, *latent_shape)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device) * sched.init_noise_sigma
    store = {name: torch.zeros((b, keep.shape[1], *latent_shape), dtype=storage_dtype, device=device)
             for name in ("latents", "next_latents", "eps_sampled")}
    std = sched.std.to(torch.float32)
    for j in range(steps):
        t = sched.timesteps[j].to(device).expand(b)
        eps = eps_fn(x, t, cond).float()
        j_rows = torch.full((b,), j, dtype=torch.long, device=device)
        mean = step_mean(sched, j_rows, x, eps)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        x_next = mean + float(std[j]) * noise
        rows, slots = (keep == j).nonzero(as_tuple=True)
        if rows.numel():
            store["latents"][rows, slots] = x[rows].to(storage_dtype)
            store["next_latents"][rows, slots] = x_next[rows].to(storage_dtype)
            store["eps_sampled"][rows, slots] = eps[rows].to(storage_dtype)
        x = x_next
        if progress is not None:
            progress(1)
    return Trajectories(step_index=keep.long(), prompt_embeds=cond, final_latents=x,
                        prompts=list(prompts), **store)
