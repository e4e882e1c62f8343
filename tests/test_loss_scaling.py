"""fp16 done right: every backward (training loss, reward score, reverse score) runs under a dynamic
loss scale and is unscaled in fp32; unscaled fp16 gradients underflow where the scaled ones match the
fp32 reference; an overflowing update is skipped (optimiser untouched) and the scale lowered; an
update that steps takes exactly one optimiser step on the unscaled gradients."""
from types import SimpleNamespace

import pytest
import torch

from lowmem_nablagfn import loop as L
from lowmem_nablagfn.diffusion import reverse_score
from lowmem_nablagfn.distributed import DataParallel
from lowmem_nablagfn.memory import LossScaler, accumulate_gradients, reward_grad_at

from helpers import small_config

#: the gradient entering the fp16 UNet (eps) / VAE (reward) is multiplied by these (identity forward):
#: typical gradients inside then fall below fp16's smallest subnormal (6e-8) — what a small loss or a
#: long accumulation does to an fp16 backward — while 2^16 times them are normal fp16 numbers
SHRINK_EPS, SHRINK_REWARD = 2.0**-22, 2.0**-12


class _ShrinkGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.k, None


def shrink(fn, k):
    return lambda *args: _ShrinkGrad.apply(fn(*args), k)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def models():
    """The tiny model with the same LoRA twice: frozen parts in fp32 (the reference) and in fp16.

    Returns {"no" | "fp16": UpdateContext (eps and reward gradients shrunk by SHRINK)} and rows.
    """
    from lowmem_nablagfn.diffusion import make_schedule
    import functools

    from lowmem_nablagfn.memory import ObjectiveSettings, Rows, UpdateContext, UpdateFns
    from lowmem_nablagfn.models import add_lora, freeze, load_sd, reference_policy
    from lowmem_nablagfn.rewards import build_reward
    from lowmem_nablagfn.config import RewardConfig
    from lowmem_nablagfn.sampling import cfg_eps_fn

    sched = make_schedule("ddim", 10)
    reward = build_reward(RewardConfig())
    out = {}
    for precision, dtype in (("no", torch.float32), ("fp16", torch.float16)):
        parts = load_sd("tiny")
        for module in (parts.unet, parts.vae):
            freeze(module, "cpu", dtype)
        lora = add_lora(parts.unet, 4, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
        gen = torch.Generator().manual_seed(0)
        for name, p in parts.unet.named_parameters():  # B = 0 at init would leave lora_A's gradient zero
            if "lora_B" in name:
                p.data.copy_(0.05 * torch.randn(p.shape, generator=gen))
        uncond = torch.zeros(1, 77, 32)
        eps = shrink(cfg_eps_fn(parts.unet, uncond, 5.0), SHRINK_EPS)
        fns = UpdateFns(eps, eps, None, shrink(L.make_latent_reward(parts.vae, reward), SHRINK_REWARD),
                        functools.partial(reference_policy, parts.unet))
        ctx = UpdateContext(fns, sched, ObjectiveSettings(1e3, 0.0, 1.0))
        out[precision] = (ctx, lora)
    gen = torch.Generator().manual_seed(1)
    n = 2
    rows = Rows(x=torch.randn(n, 4, 8, 8, generator=gen), x_next=torch.randn(n, 4, 8, 8, generator=gen),
                eps_sampled=torch.randn(n, 4, 8, 8, generator=gen), step_index=torch.tensor([3, 6]),
                cond=torch.randn(n, 77, 32, generator=gen), prompts=["a", "b"], end=torch.zeros(n, dtype=torch.bool))
    return out, rows


def with_scaler(ctx, scaler):
    from dataclasses import replace

    return replace(ctx, scaler=scaler)


def lora_grads(ctx, lora, rows, scaler):
    """Training backward of a policy loss through the fp16 UNet, unscaled as DataParallel.step does."""
    for p in lora:
        p.grad = None
    eps = ctx.fns.eps(rows.x, ctx.sched.timesteps[rows.step_index], rows.cond)
    scaler.backward(((eps - rows.eps_sampled) ** 2).mean())
    scaler.unscale_grads_(lora)
    return torch.cat([p.grad.reshape(-1) for p in lora])


def test_training_backward_underflows_unscaled_and_matches_fp32_scaled(models):
    out, rows = models
    ref = lora_grads(*out["no"], rows, LossScaler())
    unscaled = lora_grads(*out["fp16"], rows, LossScaler(enabled=False))
    scaled = lora_grads(*out["fp16"], rows, LossScaler(enabled=True))
    assert ref.abs().max() > 0
    assert rel_err(unscaled, ref) > 0.5, "the fp16 backward should underflow without a loss scale"
    assert rel_err(scaled, ref) < 0.05
    assert torch.nn.functional.cosine_similarity(scaled, ref, dim=0) > 0.999


def test_reward_score_pass_underflows_unscaled_and_matches_fp32_scaled(models):
    out, rows = models
    ref = reward_grad_at(out["no"][0], rows, nxt=False)
    unscaled = reward_grad_at(with_scaler(out["fp16"][0], LossScaler(enabled=False)), rows, nxt=False)
    scaler = LossScaler(enabled=True)
    scaled = reward_grad_at(with_scaler(out["fp16"][0], scaler), rows, nxt=False)
    assert ref.abs().max() > 0
    assert rel_err(unscaled, ref) > 0.5 and rel_err(scaled, ref) < 0.05
    assert scaled.dtype == torch.float32 and not scaler.found_inf


def test_reverse_score_pass_underflows_unscaled_and_matches_fp32_scaled(models):
    """The vector-Jacobian part of the reverse score (through the fp16 UNet)."""
    out, rows = models

    def vjp_part(ctx, grad_scale):
        from dataclasses import replace

        sched = replace(ctx.sched, c_x=torch.zeros_like(ctx.sched.c_x))  # no c_x u term: the VJP alone
        x = rows.x.detach().requires_grad_(True)
        eps = ctx.fns.eps(x, sched.timesteps[rows.step_index], rows.cond)
        return reverse_score(sched, rows.step_index, x, eps, rows.x_next, grad_scale=grad_scale)

    ref = vjp_part(out["no"][0], 1.0)
    assert ref.abs().max() > 0
    assert rel_err(vjp_part(out["fp16"][0], 1.0), ref) > 0.5
    assert rel_err(vjp_part(out["fp16"][0], 2.0**16), ref) < 0.05


def test_every_backward_of_an_update_runs_scaled(models, monkeypatch):
    """accumulate_gradients (optimized and official schedules): the reward-score passes, the reverse
    scores and the training backward all go through the context's scaler."""
    import lowmem_nablagfn.memory as M
    from lowmem_nablagfn.config import MemoryConfig
    from lowmem_nablagfn.memory import passes as P

    out, rows = models
    ctx, lora = out["no"]  # the wiring, not the precision, is under test here (fp32 is faster on a CPU)
    rows = rows.take(slice(0, 1))
    seen = {"input_grad": 0, "backward": 0, "grad_scale": []}
    scaler = LossScaler(enabled=True)
    for name in ("input_grad", "backward"):
        def spy(*a, _name=name, _fn=getattr(scaler, name), **k):
            seen[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(scaler, name, spy)
    real = P.reverse_score
    monkeypatch.setattr(P, "reverse_score", lambda *a, **k: (seen["grad_scale"].append(k.get("grad_scale")),
                                                             real(*a, **k))[1])
    flow_model = __import__("lowmem_nablagfn.models", fromlist=["x"]).build_flow_model(4, 8, 32, [16, 32])
    flow = lambda x, t, embeds: flow_model(x, t, encoder_hidden_states=embeds).sample  # noqa: E731
    for mode in ("optimized", "official"):
        from dataclasses import replace

        c = replace(ctx, fns=replace(ctx.fns, flow=flow), scaler=scaler,
                    plan=M.build_plan(MemoryConfig(mode=mode), residual=True),
                    settings=replace(ctx.settings, reverse_loss_scale=1.0))
        accumulate_gradients(c, rows, row_norm=float(len(rows)), end_norm=1e-6, scale=1.0)
    assert seen["input_grad"] >= 4 and seen["backward"] >= 2  # r_next, r_cur per schedule; training loss
    assert seen["grad_scale"] and all(g == scaler.scale == 2.0**16 for g in seen["grad_scale"])


def test_input_gradient_overflow_is_recorded():
    scaler = LossScaler(enabled=True, init_scale=2.0**16)
    x = torch.ones(3, requires_grad=True)
    y = (x.half() * 60000).float().sum()  # the scaled backward overflows fp16 (max 65504)
    assert not torch.isfinite(scaler.input_grad(y, x)).all() and scaler.found_inf


# ----------------------------------------------------------------------------- skip and lower, one step
def _components(scaler, limit=3):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = torch.optim.AdamW([{"params": [p], "name": "lora"}], lr=0.1)
    sync = DataParallel(opt, max_grad_norm=1.0, scaler=scaler)
    c = SimpleNamespace(sync=sync, nonfinite_streak=0, optimizer_steps=0,
                        cfg=SimpleNamespace(training=SimpleNamespace(max_nonfinite_updates=limit)))
    return c, p, opt


def test_overflow_skips_the_update_and_lowers_the_scale():
    scaler = LossScaler(enabled=True, init_scale=2.0**16)
    c, p, opt = _components(scaler)
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert L.guarded_step(c, 0, 0, []) == {"skipped_overflow": 1.0}
    assert torch.equal(p.detach(), before) and not opt.state and p.grad is None
    assert scaler.scale == 2.0**15 and c.nonfinite_streak == 0
    scaler.found_inf = True  # an input-gradient pass overflowed: skipped too, though grads are finite
    p.grad = torch.ones(3)
    assert L.guarded_step(c, 0, 1, []) == {"skipped_overflow": 1.0} and scaler.scale == 2.0**14 and not opt.state


def test_step_takes_exactly_one_optimiser_step_on_unscaled_gradients():
    scaler = LossScaler(enabled=True, init_scale=2.0**10, growth_interval=2)
    c, p, opt = _components(scaler)
    ref_p = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([ref_p], lr=0.1)
    g = torch.tensor([0.3, -0.1, 0.2])  # norm < 1: no clipping
    calls = []
    opt.step = (lambda step: lambda *a, **k: (calls.append(1), step(*a, **k))[1])(opt.step)
    p.grad = g * scaler.scale  # what a scaled backward accumulates
    stats = L.guarded_step(c, 0, 0, [])
    ref_p.grad = g.clone()
    ref.step()
    assert calls == [1] and opt.state[p]["step"] == 1
    assert torch.equal(p.detach(), ref_p.detach())  # unscaling by a power of two is exact
    assert stats["loss_scale"] == 2.0**10 and stats["grad_norm/lora"] == pytest.approx(float(g.norm()))
    p.grad = g * scaler.scale
    assert L.guarded_step(c, 0, 1, [])["loss_scale"] == 2.0**11  # growth_interval good updates: doubled


def test_a_true_non_finite_value_still_stops_the_run():
    """Once the scale cannot go lower, an overflow is not the scale's: the non-finite guard counts it."""
    from lowmem_nablagfn.checkpoint import NonFiniteError

    scaler = LossScaler(enabled=True, init_scale=4.0, min_scale=1.0)
    c, p, _ = _components(scaler, limit=2)
    with pytest.raises(NonFiniteError):
        for i in range(10):
            p.grad = torch.full((3,), float("nan"))
            L.guarded_step(c, 0, i, [])
    assert i == 3 and scaler.scale == 1.0  # 4 -> 2 -> 1 (two skips), then two counted failures


def test_loss_scale_is_saved_and_restored():
    scaler = LossScaler(enabled=True, init_scale=2.0**9)
    scaler.good_updates = 5
    c, _, _ = _components(scaler)
    state = c.sync.state_dict()
    c2, _, _ = _components(LossScaler(enabled=True))
    c2.sync.load(state, None)
    assert c2.sync.scaler.scale == 2.0**9 and c2.sync.scaler.good_updates == 5


def test_bf16_and_fp32_runs_have_no_scaler_and_fp16_deepspeed_is_refused(tmp_path):
    from lowmem_nablagfn.config import ConfigError, validate

    assert LossScaler().scale == 1.0
    with pytest.raises(ConfigError, match="fp16 with distributed.backend=deepspeed"):
        validate(small_config(tmp_path, "training.mixed_precision=fp16", "distributed.backend=deepspeed"))


def test_trainer_wires_the_scaler_for_fp16_only(tmp_path):
    """setup: fp16 gets an enabled scaler, shared by the update context (every backward) and the
    gradient synchroniser (unscale before clipping); bf16 / fp32 get a disabled one."""
    for precision, enabled in (("fp16", True), ("no", False)):
        c = L.setup(small_config(tmp_path, f"training.mixed_precision={precision}", name=precision))
        assert c.sync.scaler.enabled is enabled and L.update_context(c).scaler is c.sync.scaler
        c.sync.close()
