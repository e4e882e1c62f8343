"""Sampling trajectories with classifier-free guidance into a typed container.

The sampler works with any noise-prediction function ``eps_fn(x, timesteps, cond) -> eps``; a
diffusers UNet with CFG is one such function (:func:`cfg_eps_fn`).  Noise is drawn exactly as
diffusers' ``StableDiffusionPipeline`` draws it (initial latents, then one draw per step from the same
generator), so a saved LoRA loaded into the pipeline reproduces a run's sample at a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .diffusion import StepSchedule, step_mean


@dataclass
class Conditioning:
    """What the UNet is conditioned on, per row: one container for every model family.

    SD 1.x needs only ``prompt_embeds``; SDXL adds its pooled text embedding and six time ids
    (diffusers' ``added_cond_kwargs``).  Rows are indexed, moved and concatenated like a tensor's
    first dimension, so trajectories, flat batches and chunks carry it as they carry a tensor.

    Attributes:
        prompt_embeds: (B, L, D) text-encoder states (SDXL: the penultimate states of both
            encoders concatenated, D = 768 + 1280).
        pooled_embeds: (B, P) SDXL's pooled, projected output of the second encoder, or None.
        time_ids: (B, 6) SDXL's ``original size + crop top-left + target size`` (pixels), or None.
    """

    prompt_embeds: Tensor
    pooled_embeds: Optional[Tensor] = None
    time_ids: Optional[Tensor] = None

    def tensors(self) -> List[Tensor]:
        return [t for t in (self.prompt_embeds, self.pooled_embeds, self.time_ids) if t is not None]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(*(None if v is None else fn(v)
                              for v in (self.prompt_embeds, self.pooled_embeds, self.time_ids)))

    # tensor-like surface (rows are the first dimension)
    @property
    def shape(self) -> torch.Size:
        return self.prompt_embeds.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_embeds.dtype

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, idx) -> "Conditioning":
        return self._map(lambda t: t[idx.to(t.device) if isinstance(idx, Tensor) else idx])

    def to(self, *args, **kwargs) -> "Conditioning":
        """``Tensor.to`` on every field (all are floating point)."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> "Conditioning":
        return self._map(lambda t: t.pin_memory())

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        return self._map(lambda t: t.repeat_interleave(repeats, dim))

    def expand_rows(self, n: int) -> "Conditioning":
        """One row broadcast to ``n`` rows (the unconditional embedding of a batch)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        return Conditioning(*(None if getattr(items[0], f) is None else torch.cat([getattr(c, f) for c in items])
                              for f in ("prompt_embeds", "pooled_embeds", "time_ids")))

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for these rows, cast to ``dtype``."""
        kw = {"encoder_hidden_states": self.prompt_embeds.to(dtype)}
        if self.pooled_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled_embeds.to(dtype),
                                       "time_ids": self.time_ids.to(dtype)}
        return kw


Cond = Union[Tensor, Conditioning]
EpsFn = Callable[[Tensor, Tensor, Cond], Tensor]


def as_conditioning(cond: Cond) -> Conditioning:
    """A bare (B, L, D) tensor of prompt embeddings (SD 1.x) is a :class:`Conditioning` without extras."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def cat_rows(items: Sequence[Cond]) -> Cond:
    """Concatenate tensors or :class:`Conditioning` along rows."""
    return Conditioning.cat(items) if isinstance(items[0], Conditioning) else torch.cat(list(items))


@dataclass
class Trajectories:
    """Stored transitions of ``B`` trajectories, ``S`` kept per trajectory.

    Attributes:
        latents: (B, S, C, H, W) ``x_t`` of each kept transition.
        next_latents: (B, S, C, H, W) ``x_{t-1}``.
        eps_sampled: (B, S, C, H, W) guided noise prediction at ``x_t`` during sampling (for reg).
        step_index: (B, S) long, index ``j`` of the transition in the schedule.
        prompt_embeds: (B, L, D) text-encoder states of each trajectory's prompt, or a
            :class:`Conditioning` of B rows (SDXL: with pooled embeddings and time ids).
        final_latents: (B, C, H, W) ``x_0``.
        prompts: the B prompts.
        rewards: (B,) float32 reward of the final image, once computed.
    """

    latents: Tensor
    next_latents: Tensor
    eps_sampled: Tensor
    step_index: Tensor
    prompt_embeds: Cond
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
            out[f.name] = fn(v) if isinstance(v, Tensor) else v._map(fn) if isinstance(v, Conditioning) else v
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
                out[f.name] = cat_rows(vals)
        return Trajectories(**out)

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: Sequence[str], device) -> Tensor:
    """Text-encoder states (B, L, D), as ``StableDiffusionPipeline.encode_prompt`` computes them."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def sdxl_time_ids(n: int, size: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """SDXL's six micro-conditioning ids per row, (n, 6): original size, crop top-left, target size
    (pixels) — ``(size, size, 0, 0, size, size)``, what ``StableDiffusionXLPipeline`` passes for an
    uncropped ``size``-px image."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device).repeat(n, 1)


@torch.no_grad()
def encode_prompts_sdxl(text_encoders: Sequence[nn.Module], tokenizers: Sequence, prompts: Sequence[str],
                        device, size: int) -> Conditioning:
    """SDXL conditioning of B prompts, as ``StableDiffusionXLPipeline.encode_prompt`` computes it
    (``clip_skip=None``): each encoder's penultimate hidden states (B, L, D_i), concatenated along
    features; the pooled projection of the last encoder (B, P); time ids for ``size``-px images."""
    states, pooled = [], None
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = text_encoder(ids.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P)
    embeds = torch.cat(states, dim=-1)
    return Conditioning(embeds, pooled, sdxl_time_ids(len(prompts), size, device, embeds.dtype))


def unet_forward(unet: nn.Module, x: Tensor, t: Tensor, cond: Cond, dtype: torch.dtype) -> Tensor:
    """One call of a diffusers UNet (SD 1.x / SDXL) in ``dtype`` on prompt states or a :class:`Conditioning`."""
    return unet(x.to(dtype), t, **as_conditioning(cond).unet_kwargs(dtype)).sample


def cfg_model_fn(forward: Callable[..., Tensor], denoiser: nn.Module, uncond: Cond, guidance_scale: float) -> EpsFn:
    """``out(x, t, cond) = o_u + w (o_c - o_u)`` — ε, v or the flow velocity, as the model predicts — by
    one ``forward(denoiser, x, t, cond, dtype)`` call on the doubled batch ``[uncond; cond]``
    (``uncond``: one row; SDXL's / SD 3's pooled embeddings travel with the rows of both halves), as the
    diffusers pipelines guide.  The denoiser runs in its own dtype; the guided output is in ``x``'s dtype.
    Every model family's guided call is this one (``forward``: :func:`unet_forward`, or the family's)."""
    dtype = next(denoiser.parameters()).dtype
    uncond_c = as_conditioning(uncond)

    def model_fn(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        c = as_conditioning(cond)
        both = Conditioning.cat([uncond_c.to(c.device, c.dtype).expand_rows(x.shape[0]), c])
        out_u, out_c = forward(denoiser, torch.cat([x, x]), torch.cat([t, t]), both, dtype).to(x.dtype).chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    return model_fn


def cfg_eps_fn(unet: nn.Module, uncond_embeds: Cond, guidance_scale: float) -> EpsFn:
    """``eps(x, t, cond) = ε_u + w (ε_c - ε_u)``, one UNet call on the doubled batch ``[uncond; cond]``
    (:func:`cfg_model_fn` with :func:`unet_forward`)."""
    return cfg_model_fn(unet_forward, unet, uncond_embeds, guidance_scale)


@torch.no_grad()
def sample(eps_fn: EpsFn, sched: StepSchedule, cond: Cond, latent_shape: Sequence[int],
           generator: torch.Generator, keep: Optional[Tensor] = None, prompts: Sequence[str] = (),
           device=None, storage_dtype: torch.dtype = torch.float32,
           progress: Optional[Callable[[int], None]] = None) -> Trajectories:
    """Run the sampler for ``B = cond.shape[0]`` trajectories.

    Args:
        eps_fn: guided noise prediction.
        sched: the sampler's per-step schedule.
        cond: (B, L, D) prompt embeddings or a :class:`Conditioning` of B rows.
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
