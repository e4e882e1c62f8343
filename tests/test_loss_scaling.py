"""fp16 done right: every backward (training loss, reward score, reverse score) runs under a dynamic
loss scale and is unscaled in fp32; unscaled fp16 gradients underflow where the scaled ones match the
fp32 reference; a pass that overflows runs again at once at a lower scale (no update lost to the
search); a non-finite value that is not an overflow skips the update with a warning that says so; an
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


def lora_grads(ctx, lora, rows, enabled):
    """Training backward of a policy loss through the fp16 UNet, unscaled by the scaler."""
    scaler = LossScaler(enabled=enabled, params=lora)
    for p in lora:
        p.grad = None

    def run(_):
        eps = ctx.fns.eps(rows.x, ctx.sched.timesteps[rows.step_index], rows.cond)
        scaler.backward(((eps - rows.eps_sampled) ** 2).mean())

    scaler.accumulate(run)
    assert scaler.retries == 0
    return torch.cat([p.grad.reshape(-1) for p in lora])


def test_training_backward_underflows_unscaled_and_matches_fp32_scaled(models):
    out, rows = models
    ref = lora_grads(*out["no"], rows, False)
    unscaled = lora_grads(*out["fp16"], rows, False)
    scaled = lora_grads(*out["fp16"], rows, True)
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
    flow_model = __import__("lowmem_nablagfn.models", fromlist=["x"]).build_flow_model(4, 8, 32, [16, 32])
    scaler = LossScaler(enabled=True, params=list(lora) + list(flow_model.parameters()))
    for name in ("input_grad", "backward"):
        def spy(*a, _name=name, _fn=getattr(scaler, name), **k):
            seen[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(scaler, name, spy)
    real = P.reverse_score
    monkeypatch.setattr(P, "reverse_score", lambda *a, **k: (seen["grad_scale"].append(k.get("grad_scale")),
                                                             real(*a, **k))[1])
    flow = lambda x, t, embeds: flow_model(x, t, encoder_hidden_states=embeds).sample  # noqa: E731
    for mode in ("optimized", "official"):
        from dataclasses import replace

        c = replace(ctx, fns=replace(ctx.fns, flow=flow), scaler=scaler,
                    plan=M.build_plan(MemoryConfig(mode=mode), residual=True),
                    settings=replace(ctx.settings, reverse_loss_scale=1.0))
        accumulate_gradients(c, rows, row_norm=float(len(rows)), end_norm=1e-6, scale=1.0)
    assert seen["input_grad"] >= 4 and seen["backward"] >= 2  # r_next, r_cur per schedule; training loss
    assert seen["grad_scale"] and all(g == scaler.scale_of("reverse") == 2.0**16 for g in seen["grad_scale"])
    assert scaler.retries == 0


def test_input_gradient_overflow_is_run_again_at_once_at_a_lower_scale():
    scaler = LossScaler(enabled=True, init_scale=2.0**16)
    x = torch.ones(3, requires_grad=True)
    builds = []

    def forward():  # the scaled backward overflows fp16 (max 65504) at every scale above 1
        builds.append(1)
        return (x.half() * 60000).float().sum()

    grad = scaler.input_grad(forward, x)
    assert torch.equal(grad, torch.full((3,), 60000.0)) and not scaler.found_inf
    assert scaler.scale_of("reward") == 1.0 and scaler.retries == 16 and len(builds) == 17  # graph rebuilt
    assert scaler.scale == scaler.scale_of("reverse") == 2.0**16  # the other kinds keep their scales


def test_input_gradient_non_finite_at_every_scale_is_not_an_overflow():
    """sqrt'(0) = inf whatever the scale: recorded for the guard, the scale back where it started."""
    scaler = LossScaler(enabled=True, init_scale=2.0**4)
    x = torch.ones(3, requires_grad=True)
    grad = scaler.input_grad(lambda: torch.sqrt(x - x.detach()).half().float().sum(), x)
    assert not torch.isfinite(grad).all() and scaler.found_inf and scaler.scale_of("reward") == 2.0**4


def test_parameter_gradient_overflow_reruns_the_pass_and_keeps_earlier_gradients_exact():
    """accumulate: an overflowing training pass runs again (rebuild=True) at half the scale until it
    fits; .grad gets this pass's gradient unscaled, added to the earlier (unscaled) ones, bit for bit."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    scaler = LossScaler(enabled=True, params=[p], init_scale=2.0**16)
    p.grad = torch.tensor([0.5, 0.25, 1.0])  # an earlier pass's
    runs = []

    def run(rebuild):  # fp16 backward: scale · 1000 must stay below 65504, so the scale must fall to 2^6
        runs.append(rebuild)
        scaler.backward((p.half() * 1000).float().sum())
        return "terms"

    assert scaler.accumulate(run) == "terms"
    assert runs == [False] + [True] * 10 and scaler.scale == 2.0**6 and scaler.retries == 10
    assert torch.equal(p.grad, torch.tensor([1000.5, 1000.25, 1001.0]))
    runs.clear()  # a NaN loss is not an overflow: no rerun, the scale stays
    scaler.accumulate(lambda rebuild: (runs.append(rebuild), scaler.backward(p.sum() * float("nan"))))
    assert runs == [False] and scaler.scale == 2.0**6 and not torch.isfinite(p.grad).any()


def test_an_enabled_scaler_without_parameters_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        LossScaler(enabled=True).accumulate(lambda _: None)


# ----------------------------------------------------------------------------- skip, one step
def _components(scaler, limit=3):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    scaler.params = [p]
    opt = torch.optim.AdamW([{"params": [p], "name": "lora"}], lr=0.1)
    sync = DataParallel(opt, max_grad_norm=1.0, scaler=scaler)
    c = SimpleNamespace(sync=sync, nonfinite_streak=0, optimizer_steps=0,
                        cfg=SimpleNamespace(training=SimpleNamespace(max_nonfinite_updates=limit)))
    return c, p, opt


def test_input_gradient_non_finite_at_every_scale_skips_the_update(capsys):
    scaler = LossScaler(enabled=True, init_scale=2.0**16)
    c, p, opt = _components(scaler)
    scaler.found_inf = True  # gradients finite, an input-gradient pass not
    p.grad = torch.ones(3)
    assert L.guarded_step(c, 0, 1, []) == {} and not opt.state and not scaler.found_inf and c.nonfinite_streak == 1
    assert "fp16 input gradient" in capsys.readouterr().err and scaler.scale == 2.0**16


def test_step_takes_exactly_one_optimiser_step_on_unscaled_gradients():
    scaler = LossScaler(enabled=True, init_scale=2.0**10, growth_interval=2)
    c, p, opt = _components(scaler)
    ref_p = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([ref_p], lr=0.1)
    g = torch.tensor([0.3, -0.1, 0.2])  # norm < 1: no clipping
    calls = []
    opt.step = (lambda step: lambda *a, **k: (calls.append(1), step(*a, **k))[1])(opt.step)
    scaler.accumulate(lambda _: scaler.backward((p * g).sum()))  # scaled backward, unscaled into .grad
    stats = L.guarded_step(c, 0, 0, [])
    ref_p.grad = g.clone()
    ref.step()
    assert calls == [1] and opt.state[p]["step"] == 1
    assert torch.equal(p.detach(), ref_p.detach())  # unscaling by a power of two is exact
    assert stats["loss_scale"] == 2.0**10 and stats["grad_norm/lora"] == pytest.approx(float(g.norm()))
    scaler.accumulate(lambda _: scaler.backward((p * g).sum()))
    assert L.guarded_step(c, 0, 1, [])["loss_scale"] == 2.0**11  # growth_interval good updates: doubled


def test_a_true_non_finite_value_still_stops_the_run():
    """Overflows never reach the guard (they are rerun): every non-finite update counts at once."""
    from lowmem_nablagfn.checkpoint import NonFiniteError

    scaler = LossScaler(enabled=True, init_scale=4.0, min_scale=1.0)
    c, p, _ = _components(scaler, limit=2)
    with pytest.raises(NonFiniteError):
        for i in range(10):
            p.grad = torch.full((3,), float("nan"))
            L.guarded_step(c, 0, i, [])
    assert i == 1 and scaler.scale == 4.0  # two counted failures; the scale untouched


def test_loss_scale_is_saved_and_restored():
    scaler = LossScaler(enabled=True, init_scale=2.0**9)
    scaler.scales["reverse"], scaler.good_updates["reward"] = 2.0**3, 5
    c, _, _ = _components(scaler)
    state = c.sync.state_dict()
    c2, _, _ = _components(LossScaler(enabled=True))
    c2.sync.load(state, None)
    assert c2.sync.scaler.scales == {"params": 2.0**9, "reward": 2.0**9, "reverse": 2.0**3}
    assert c2.sync.scaler.good_updates == {"params": 0, "reward": 5, "reverse": 0}


def test_a_checkpoint_with_one_loss_scale_loads_and_an_unknown_one_is_refused():
    """Checkpoints written before per-kind scales hold {"scale", "good_updates"}: every kind starts there."""
    scaler = LossScaler(enabled=True)
    scaler.load_state_dict({"scale": 128.0, "good_updates": 7})
    assert set(scaler.scales.values()) == {128.0} and set(scaler.good_updates.values()) == {7}
    with pytest.raises(ValueError, match="unknown loss-scaler state"):
        scaler.load_state_dict({"loss_scale": 1.0})


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
        assert c.sync.scaler.params == [p for g in c.optimizer.param_groups for p in g["params"]]
        c.sync.close()


# ----------------------------------------------------------------------------- the scale search costs no update
def _metrics(run_dir):
    import json

    return {r["epoch"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # fp16 is slow on a CPU: about half a minute
def test_tiny_fp16_run_steps_from_its_first_update(tmp_path):
    """The default job in fp16 (V100): the reverse score overflows fp16 at the initial scale 2^16 and the
    training backward at 2^8, yet no update of epoch 0 is lost to the scale search (before: epochs 0
    and 1 were skipped whole while the scale fell to 128); the search is counted per epoch."""
    from lowmem_nablagfn.config import load_config
    from lowmem_nablagfn.trainer import train

    cfg = load_config("tiny_cpu", ["training.mixed_precision=fp16", "training.num_epochs=1",
                                   "logging.sample_grid_seeds=0", "logging.tensorboard=false",
                                   f"logging.output_dir={tmp_path}"])
    row = _metrics(train(cfg))[0]
    assert row["optimizer_steps"] == L.updates_per_epoch(cfg) == 4
    assert row["train/skipped_updates"] == 0 and row["train/scale_retries"] > 0  # searched, nothing lost
    assert row["train/loss_scale"] < 2.0**16 and row["train/loss_scale_reverse"] < 2.0**16


@pytest.mark.slow  # fp16 is slow on a CPU: 3 rows, one at a time, everything checkpointed
def test_sd15_v100_settings_step_from_their_first_update(tmp_path):
    """sd15_v100's memory settings (everything checkpointed, one row per pass, text encoder offloaded),
    fp16 and β on the tiny model: the same path, every update of the first epoch steps."""
    from lowmem_nablagfn.config import load_config

    cfg = load_config("sd15_v100", ["pretrained.model=tiny", "device=cpu", "reward.name=builtin:redness",
                                    "sampling.num_steps=10", "sampling.resolution=64", "sampling.batch_size=1",
                                    "model.timestep_fraction=0.2", "model.flow_block_widths=[16,32]",
                                    "training.batch_size=1", "logging.tensorboard=false",
                                    f"logging.output_dir={tmp_path}"])
    assert cfg.training.mixed_precision == "fp16" and cfg.memory.train_chunk == 1 and cfg.memory.checkpoint_unet
    c = L.setup(cfg)
    metrics = L.train_epoch(c, L.sample_epoch(c, -1), 0)
    assert c.optimizer_steps == L.updates_per_epoch(cfg) == 1 and metrics["train/skipped_updates"] == 0
    assert metrics["train/scale_retries"] > 0  # the search happened, inside the update
    c.sync.close()


@pytest.mark.slow  # fp16 on a CPU
def test_official_schedule_reruns_its_kept_graphs_in_fp16(tmp_path):
    """memory.mode=official keeps the policy's graph from the policy phase to the training backward; a
    rerun of the training pass rebuilds it (the failed backward freed it) — every update still steps."""
    c = L.setup(small_config(tmp_path, "training.mixed_precision=fp16", "memory.mode=official",
                             "sampling.batch_size=2"))
    metrics = L.train_epoch(c, L.sample_epoch(c, -1), 0)
    assert c.optimizer_steps == 1 and metrics["train/skipped_updates"] == 0 and metrics["train/scale_retries"] > 0
    assert all(torch.isfinite(p).all() for p in c.lora_params)
    c.sync.close()


def test_a_non_finite_value_that_is_not_an_overflow_is_reported_as_such(capsys):
    """A NaN loss is not the loss scale's fault: the update is skipped and counted as non-finite at once
    (streak 1, one warning line naming the cause), the scale stays where it is — before, the scale was
    halved and the skip hidden as an overflow, without a warning, for up to 16 updates."""
    scaler = LossScaler(enabled=True, init_scale=2.0**16)
    c, p, opt = _components(scaler)
    p.grad = torch.full((3,), float("nan"))
    assert L.guarded_step(c, 0, 0, ["loss"]) == {}
    err = capsys.readouterr().err
    assert c.nonfinite_streak == 1 and scaler.scale == 2.0**16 and not opt.state and p.grad is None
    assert err.count("\n") == 1 and "non-finite loss" in err and "not an fp16 overflow" in err, err


@pytest.mark.slow  # four fp16 epochs of one update on a CPU
def test_fp16_resume_ends_bitwise_where_the_uninterrupted_run_ends(tmp_path):
    """The searched scales (per kind) are saved and restored: the resumed run does not search again."""
    from safetensors.torch import load_file

    from lowmem_nablagfn.trainer import train

    def final(name, **kw):
        cfg = small_config(tmp_path, "training.mixed_precision=fp16", "training.num_epochs=2",
                           "sampling.batch_size=2", name=name)
        run = train(cfg, **kw)
        return run, load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))

    whole, lora_a = final("whole")
    final("cut", stop_after_epoch=0)
    cut, lora_b = final("cut", resume="auto")
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    rows_a, rows_b = _metrics(whole), _metrics(cut)
    assert rows_a[0]["train/scale_retries"] > 0  # searched in epoch 0; the resumed epoch 1 does not search again
    assert rows_b[1]["train/scale_retries"] == 0 == rows_a[1]["train/scale_retries"]
    assert rows_a[1]["train/loss_scale"] == rows_b[1]["train/loss_scale"]


def test_reverse_score_normalises_at_every_fp16_scale_including_one():
    """A scale that fell to 1 is still fp16: the vector sent back through the fp16 noise model is
    normalised (its entries grow like 1/std², far past fp16's 65504 on the last step), so the result is
    finite and equals the fp32 one; ``None`` (bf16/fp32, no scaler) sends it as it is."""
    from lowmem_nablagfn.diffusion import make_schedule

    sched = make_schedule("ddim", 10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    step = torch.tensor([9, 9])  # the last step: the smallest std

    def score(grad_scale, half):
        xr = x.clone().requires_grad_(True)
        eps = (xr.half() * 0.5).float() if half else xr * 0.5  # an fp16 "noise model" and its fp32 twin
        from lowmem_nablagfn.diffusion import step_mean

        x_next = step_mean(sched, step, x, (x * 0.5)) + 2000.0  # far from the mean: c_eps u ~ 1e5
        return reverse_score(sched, step, xr, eps, x_next, grad_scale=grad_scale)

    ref = score(None, half=False)
    assert not torch.isfinite(score(None, half=True)).all()  # the control: unnormalised, fp16 overflows
    for scale in (1.0, 4.0):
        got = score(scale, half=True)
        assert torch.isfinite(got).all() and rel_err(got, ref) < 1e-3, (scale, rel_err(got, ref))
