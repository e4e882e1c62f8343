"""Tracing: the configuration's models on fake tensors, each pass run under a live-bytes tracker.

:class:`Tracer` materialises the meta models (:mod:`.meta`) as ``FakeTensor``s (shapes and dtypes, no
data, no compute) and runs one probe at a time at the configuration's resolution, counting the bytes
of every storage the aten ops return (:class:`~lowmem_nablagfn.memtrack.LiveBytes`) and the FLOPs of the
matmuls, convolutions and attention (:class:`FlopCount`).  A probe returns named marks (peaks, bytes
left alive, FLOPs); :class:`~.profile.Probes` caches them and makes them linear in rows.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import Config
from ..images import decode_latents
from ..memtrack import LiveBytes
from .meta import Models, quiet

def _fakeify(module: Optional[nn.Module], mode) -> None:
    """Replace meta parameters/buffers by fake CPU tensors of the same shape, dtype and flag."""
    if module is None:
        return
    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                         requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


class FlopCount(TorchDispatchMode):
    """FLOPs of the aten ops that ``torch.utils.flop_counter`` knows (matmuls, convolutions,
    attention), without ``FlopCounterMode``'s module hooks (which reject ``autograd.grad`` on leaves)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


class _Meter:
    """Marks of one probe: bytes above the probe's baseline, FLOPs since the last mark."""

    def __init__(self, mem: LiveBytes, flops):
        self.mem, self.fc = mem, flops
        self.base = mem.current
        self.f0 = flops.get_total_flops()
        mem.reset_peak()
        self.out: Dict[str, float] = {}

    def peak(self, name: str) -> None:
        self.out[name] = max(0, self.mem.peak - self.base)
        self.mem.reset_peak()

    def now(self, name: str) -> None:
        self.out[name] = max(0, self.mem.current - self.base)

    def flops(self, name: str) -> None:
        f = self.fc.get_total_flops()
        self.out[name] = float(f - self.f0)
        self.f0 = f


class Tracer:
    """The configuration's models on fake tensors, and the probes of :mod:`planner`'s composition."""

    def __init__(self, cfg: Config, models: Models):
        from torch._subclasses.fake_tensor import FakeTensorMode

        from ..diffusion import make_schedule
        from ..dtypes import DTYPES
        from ..update import policy_eps_fn

        self.cfg, self.m = cfg, models
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        for module in (models.denoiser, models.vae, *models.text_encoders, models.flow_model, models.reward):
            _fakeify(module, self.mode)
        self.lora = [p for n, p in models.denoiser.named_parameters() if "lora_" in n]
        self.sched = make_schedule(cfg.sampling.scheduler, cfg.sampling.num_steps, cfg.sampling.eta)
        self.te_dtype = (next(models.text_encoder.parameters()).dtype if models.text_encoder is not None
                         else DTYPES[cfg.training.mixed_precision])  # SD 3.x: the prompt table's
        with self.mode:
            self.uncond = self._cond(1)
        # the trainer's guided call of the model's family (ε of a UNet, the transformer's velocity)
        self.eps_fn = policy_eps_fn(models.denoiser, self.uncond, cfg.sampling.guidance_scale, self.sched)
        # a timestep of the middle of the schedule, in the schedule's dtype (DDPM: long; flow: float 1000 t)
        self.t_mid = 500 if self.sched.timesteps.dtype == torch.long else 500.0

    # -- helpers (called inside the fake mode)
    def _latents(self, r: int, grad: bool = False) -> Tensor:
        return torch.randn(r, *self.m.latent_shape, requires_grad=grad)

    def _cond(self, r: int):
        """Prompt conditioning of ``r`` rows (SDXL: a ``Conditioning`` with pooled embeddings and time ids;
        SD 3.x: prompt embeddings and pooled ones)."""
        from ..sampling import Conditioning, sdxl_time_ids

        embeds = torch.randn(r, *self.m.text_shape, dtype=self.te_dtype)
        if self.m.is_sd3:
            return Conditioning(embeds, torch.randn(r, self.m.pooled_dim, dtype=self.te_dtype))
        te2 = self.m.text_encoder_2
        if te2 is None:
            return embeds
        pooled = torch.randn(r, te2.config.projection_dim, dtype=self.te_dtype)
        return Conditioning(embeds, pooled, sdxl_time_ids(r, self.cfg.sampling.resolution, dtype=self.te_dtype))

    def _rows(self, r: int):
        from ..memory import Rows

        return Rows(self._latents(r), self._latents(r), self._latents(r),
                    torch.zeros(r, dtype=torch.long), self._cond(r), [""] * r,
                    torch.zeros(r, dtype=torch.bool))

    def _ctx(self, residual: bool, plan=None):
        """The executor's context on the traced models: the trainer's own (:func:`~lowmem_nablagfn.update.update_context`)."""
        from ..update import update_context

        return update_context(self.cfg, self.m.denoiser, self.m.vae, self.m.reward,
                              self.m.flow_model if residual else None, self.uncond, self.sched, plan=plan)

    def _grad_chain(self, meter: _Meter, fn, x: Tensor) -> None:
        """Forward with a graph, retained backward, backward: Pf, F, Pbr, Pb and their FLOPs."""
        y = fn(x)
        meter.peak("Pf")
        meter.now("F")
        meter.flops("flops_f")
        g = torch.ones_like(y)
        torch.autograd.grad(y, x, g, retain_graph=True)
        meter.peak("Pbr")
        meter.f0 = meter.fc.get_total_flops()  # the retained backward is a measurement, not work
        torch.autograd.grad(y, x, g)
        meter.peak("Pb")
        meter.flops("flops_b")

    # -- probes: each returns {quantity: bytes or flops}
    def probe(self, name: str, flags: dict, r: int) -> Dict[str, float]:
        from ..memory.plan import switch_checkpointing
        from ..models import set_attention_backend
        from ..sampling import as_conditioning

        switch_checkpointing(flags, self.m.denoiser, self.m.vae, self.m.reward, self.m.flow_model)
        # the math SDPA kernel materialises the attention matrices (traced); flash / memory-efficient
        # kernels keep what the CPU's fused kernel keeps (output and log-sum-exp)
        set_attention_backend((self.m.denoiser, self.m.vae), "math" if flags.get("math") else "sdpa")
        set_attention_backend((self.m.flow_model,), "math" if flags.get("math_flow") else "sdpa")
        with self.mode, quiet(), LiveBytes() as mem, FlopCount() as fc:
            # known up front, so that views of weights (a linear layer's ``t()``) count as nothing new
            mem.register_modules(self.m.denoiser, self.m.vae, *self.m.text_encoders, self.m.flow_model, self.m.reward)
            mem.register(as_conditioning(self.uncond).tensors())
            return getattr(self, f"_probe_{name}")(mem, fc, r)

    def _probe_unet_chain(self, mem, fc, r):
        from ..diffusion import pred_x0

        t = torch.full((r,), self.t_mid)
        cond, alpha = self._cond(r), torch.full((r, 1, 1, 1), 0.5)
        x = self._latents(r, grad=True)
        meter = _Meter(mem, fc)
        self._grad_chain(meter, lambda v: pred_x0(v, self.eps_fn(v, t, cond), alpha), x)
        return meter.out

    def _probe_vae(self, mem, fc, r):
        z = self._latents(r, grad=True)
        meter = _Meter(mem, fc)
        self._grad_chain(meter, lambda v: decode_latents(self.m.vae, v), z)
        return meter.out

    def _probe_reward(self, mem, fc, r):
        side = self.cfg.sampling.resolution
        images = torch.rand(r, 3, side, side, requires_grad=True)
        meter = _Meter(mem, fc)
        self._grad_chain(meter, lambda v: self.m.reward(v, [""] * r), images)
        return meter.out

    def _nograd(self, mem, fc, fn, x) -> Dict[str, float]:
        meter = _Meter(mem, fc)
        with torch.no_grad():
            y = fn(x)
        meter.peak("Pi")
        meter.now("Out")
        meter.flops("flops_f")
        del y
        return meter.out

    def _probe_unet_sample(self, mem, fc, r):
        t, cond = torch.full((r,), self.t_mid), self._cond(r)
        return self._nograd(mem, fc, lambda v: self.eps_fn(v, t, cond), self._latents(r))

    def _probe_vae_nograd(self, mem, fc, r):
        return self._nograd(mem, fc, lambda v: decode_latents(self.m.vae, v), self._latents(r))

    def _probe_reward_nograd(self, mem, fc, r):
        side = self.cfg.sampling.resolution
        return self._nograd(mem, fc, lambda v: self.m.reward(v, [""] * r), torch.rand(r, 3, side, side))

    def _probe_encode(self, mem, fc, r):
        ids = torch.zeros(r, self.m.text_shape[0], dtype=torch.long)
        if self.m.is_sd3:  # rows of the prompt table (host memory) copied to the device
            return self._nograd(mem, fc, lambda v: self._cond(v.shape[0]), ids)
        if self.m.text_encoder_2 is None:
            return self._nograd(mem, fc, lambda v: self.m.text_encoder(v)[0], ids)
        return self._nograd(mem, fc, lambda v: torch.cat(  # SDXL: both encoders' penultimate states
            [t(v, output_hidden_states=True).hidden_states[-2] for t in self.m.text_encoders], -1), ids)

    def _probe_reference(self, mem, fc, r, need_reverse=True):
        from ..memory import reference_scores

        rows = self._rows(r)
        meter = _Meter(mem, fc)
        out = reference_scores(self._ctx(need_reverse), rows, need_reverse)
        meter.peak("P")
        meter.flops("flops")
        del out
        return meter.out

    def _probe_reference_nograd(self, mem, fc, r):
        return self._probe_reference(mem, fc, r, need_reverse=False)

    def _with_grads(self, residual: bool):
        params = list(self.lora) + (list(self.m.flow_model.parameters()) if residual else [])
        for p in params:
            p.grad = torch.zeros_like(p)
        return params

    def _probe_train(self, mem, fc, r, residual=True):
        from ..memory import Detached, train_pass

        params = self._with_grads(residual)
        rows = self._rows(r)
        ins = [self._latents(r) for _ in range(4)]
        det = Detached(ins[0], ins[1] if residual else None, ins[2], ins[3] if residual else None)
        meter = _Meter(mem, fc)
        train_pass(self._ctx(residual), rows, det, row_norm=float(r), end_norm=1.0, scale=1.0)
        meter.peak("P")
        meter.flops("flops")
        for p in params:
            p.grad = None
        return meter.out

    def _probe_train_nof(self, mem, fc, r):
        return self._probe_train(mem, fc, r, residual=False)

    def _naive(self, mem, fc, r, residual):
        """The whole naive plan through the executor, phase by phase (its ``memtrack`` marks)."""
        from dataclasses import replace

        from .. import memtrack
        from ..memory import Mode, Rows, accumulate_gradients, build_plan

        params = self._with_grads(residual)
        rows = self._rows(r)
        rows = Rows(rows.x, rows.x_next, rows.eps_sampled, rows.step_index, rows.cond, rows.prompts,
                    torch.arange(r) == 0)  # one last transition, as in every batch
        ctx = self._ctx(residual, build_plan(replace(self.cfg.memory, mode=Mode.NAIVE.value), residual))
        base = mem.current
        with memtrack.recording_with(mem) as rec:
            f0 = fc.get_total_flops()
            accumulate_gradients(ctx, rows, row_norm=float(r), end_norm=1.0, scale=1.0)
            flops = fc.get_total_flops() - f0
        for p in params:
            p.grad = None
        out = {name: max(0, s.peak_bytes - base) for name, s in rec.phases.items()}
        out["flops"] = float(flops)
        return out

    def _probe_naive(self, mem, fc, r):
        return self._naive(mem, fc, r, residual=True)

    def _probe_naive_nof(self, mem, fc, r):
        return self._naive(mem, fc, r, residual=False)


