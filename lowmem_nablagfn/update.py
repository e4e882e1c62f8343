"""The update's context, built in one place for whatever runs the executor on a run's models: the
trainer's loop (:func:`~lowmem_nablagfn.loop.update_context`) and the planner's traces
(:class:`~lowmem_nablagfn.planner.trace.Tracer`, on fake tensors) — so what is traced is what trains.

One update, read top to bottom: :func:`~lowmem_nablagfn.loop.train_epoch` turns a training batch of
stored trajectories into rows (:class:`~lowmem_nablagfn.memory.Rows`), the executor
(:func:`~lowmem_nablagfn.memory.accumulate_gradients`) runs the plan's phases on them with the context
built here (each phase's pass: :mod:`~lowmem_nablagfn.memory.passes`; the loss:
:func:`~lowmem_nablagfn.objective.nabla_db_loss`), and every ``training.gradient_accumulation_steps``
batches :func:`~lowmem_nablagfn.loop.guarded_step` takes the optimiser step.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .diffusion import StepSchedule, as_epsilon
from .images import decode_latents
from .memory import LossScaler, MemoryPlan, ObjectiveSettings, UpdateContext, UpdateFns
from .models import family_of, reference_policy
from .models.family import cfg_model_fn


def make_latent_reward(vae: nn.Module, reward_model: nn.Module):
    """``R(decode(x0))``: VAE decode in its storage dtype, reward in float32."""
    def latent_reward(x0: Tensor, prompts) -> Tensor:
        return reward_model(decode_latents(vae, x0), prompts)

    return latent_reward


def policy_eps_fn(denoiser: nn.Module, uncond, guidance_scale: float, sched: StepSchedule):
    """Guided output of the denoiser as it is now (LoRA on unless inside ``reference_policy``) in the
    form the sampler's steps are written in: ε (v-prediction converted,
    :func:`~lowmem_nablagfn.diffusion.as_epsilon`) or, for SD 3.x, the flow velocity as it is.  The
    denoiser's call is its family's (:func:`~lowmem_nablagfn.models.family.cfg_model_fn`)."""
    return as_epsilon(cfg_model_fn(family_of(denoiser), denoiser, uncond, guidance_scale), sched)


def update_context(cfg, unet: nn.Module, vae: nn.Module, reward: nn.Module, flow_model: Optional[nn.Module],
                   uncond, sched: StepSchedule, plan: Optional[MemoryPlan] = None,
                   scaler: Optional[LossScaler] = None) -> UpdateContext:
    """The executor's view of the models: plain callables (the LoRA denoiser's guided ε — ``unet``: the
    UNet or an SD 3 transformer —, the same denoiser with its LoRA off as the reference, the flow model
    ``g_φ`` — None: no-flow — and the latent reward), the objective's scalars of ``cfg.model``, the memory
    plan and the fp16 loss scale."""
    m = cfg.model
    eps = policy_eps_fn(unet, uncond, cfg.sampling.guidance_scale, sched)
    flow = None
    if flow_model is not None:
        flow = lambda x, t, embeds: flow_model(x, t, encoder_hidden_states=embeds).sample  # noqa: E731
    return UpdateContext(
        UpdateFns(eps, eps, flow, make_latent_reward(vae, reward), lambda: reference_policy(unet)),
        sched,
        ObjectiveSettings(m.reward_scale, m.reverse_loss_scale, m.unet_reg_scale, m.pretrained_strength,
                          m.reward_adaptive_mode, m.flow_zero_prompt),
        plan=plan, scaler=scaler or LossScaler())
