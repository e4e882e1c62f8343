"""Analytic validation (lowmem_nablagfn/analytic/): exact model, closed-form tilt, and a small
end-to-end run of residual ∇-DB vs a reward-maximising baseline against the exact tilted target."""
import math

import pytest
import torch

from lowmem_nablagfn.analytic import (AnalyticConfig, ExactEps, ExactVelocity, FlowMLP, GaussianMixture,
                                      LinearReward, ResidualEps, accumulate_update,
                                      alphas_cumprod_table, evaluate, mmd_rbf, run_experiment,
                                      sample_final, target_mixture, update_context)
from lowmem_nablagfn.diffusion import make_schedule
from lowmem_nablagfn.sampling import sample


@pytest.fixture(scope="module")
def sched20():
    return make_schedule("ddim", 20, eta=1.0)


def _mixture():
    return GaussianMixture.make([0.3, 0.7], [[-1.0, 0.5], [1.2, -0.3]], [0.3, 0.45])


def test_exact_eps_matches_autograd_of_log_density():
    mix = _mixture()
    exact = ExactEps(mix)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([999, 951, 701, 501, 251, 51, 1, 0])
    x = (torch.randn(t.numel(), 2, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    alpha = exact.alpha(t)
    (grad,) = torch.autograd.grad(mix.log_prob(x, alpha).sum(), x)
    expected = -(1 - alpha).sqrt().unsqueeze(-1) * grad
    torch.testing.assert_close(exact(x, t), expected, rtol=1e-10, atol=1e-12)
    # float32 input gives float32 output with the same values
    torch.testing.assert_close(exact(x.detach().float(), t), expected.float(), rtol=1e-5, atol=1e-6)


def test_exact_velocity_is_the_score_of_the_rectified_flow_marginal():
    """v*(x, t) = E[ε - x0 | x_t] of x_t = (1-t) x0 + t ε equals (-t ∇log q_t(x) - x) / (1 - t) with
    q_t = Σ w_k N((1-t) μ_k, ((1-t)² s_k² + t²) I) (autograd of the density), and its limits at
    t = 1 (x - mean) and t = 0 (-x); ExactVelocity reads the model timestep 1000 t."""
    mix = _mixture()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.999, 0.9, 0.6, 0.3, 0.05, 0.001], dtype=torch.float64)
    x = (torch.randn(t.numel(), 2, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    (score,) = torch.autograd.grad(mix.log_prob(x, (1 - t) ** 2, t**2).sum(), x)
    expected = (-t.unsqueeze(-1) * score - x) / (1 - t).unsqueeze(-1)
    torch.testing.assert_close(mix.velocity(x, t), expected, rtol=1e-8, atol=1e-10)
    ends = torch.tensor([1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(mix.velocity(x[:2], ends), torch.stack([x[0] - mix.mean(), -x[1]]))
    torch.testing.assert_close(ExactVelocity(mix)(x.detach().float(), (1000 * t).float()),
                               expected.float(), rtol=1e-4, atol=1e-5)


def test_untuned_flow_sde_sampler_reproduces_data_mixture():
    """The flow-matching "pretrained model" run by the project's flow-sde sampler (a = 0.7, T = 20, SD 3.5's
    shift-3 grid) samples the data mixture: mode masses and mean."""
    mix = _mixture()
    sched = make_schedule("flow-sde", 20, 0.7)
    xs = sample_final(ExactVelocity(mix), sched, 6000, seed=3)
    counts = torch.bincount(mix.nearest(xs), minlength=2).double() / xs.shape[0]
    assert (counts - mix.weights).abs().max() < 0.03, counts
    torch.testing.assert_close(xs.double().mean(0), mix.mean(), atol=0.05, rtol=0)


def test_noised_marginal_is_normalised_and_alphas_match_schedule(sched20):
    ac = alphas_cumprod_table()
    torch.testing.assert_close(ac[sched20.timesteps], sched20.alpha_cur)
    mix = _mixture()
    # numerical integral of q_t over a wide grid
    grid = torch.linspace(-8, 8, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    for a in (0.05, 0.5, 0.999):
        dens = mix.log_prob(pts, torch.full((pts.shape[0],), a, dtype=torch.float64)).exp()
        assert abs(float(dens.sum()) * (16 / 400) ** 2 - 1) < 1e-3


def test_tilt_is_closed_form_of_p_times_exp_beta_r():
    mix = _mixture()
    a, beta = (0.8, 0.6), 0.9
    tilted = mix.tilt(a, beta)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64) * 2
    diff = tilted.log_prob(x) - mix.log_prob(x) - beta * (x @ torch.tensor(a, dtype=torch.float64))
    assert float(diff.max() - diff.min()) < 1e-10  # log p_tilt = log p + β a·x - log Z
    # log Z = log Σ w_k exp(β a·μ_k + ½ β² s_k² |a|²)
    s2 = mix.stds**2
    log_z = torch.logsumexp(mix.weights.log() + beta * mix.means @ torch.tensor(a, dtype=torch.float64)
                            + 0.5 * beta**2 * s2, 0)
    torch.testing.assert_close(-diff.mean(), log_z)


def test_log_flow_matches_monte_carlo():
    mix = _mixture()
    a, beta = (0.8, 0.6), 0.7
    x = torch.tensor([[0.2, -0.4]], dtype=torch.float64)
    alpha = torch.tensor([0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x0 = mix.sample(200_000, g)
    # E[exp(β a·x0) | x_t = x] with weights ∝ N(x; √ᾱ x0, (1-ᾱ) I)
    logw = -((x - alpha.sqrt() * x0) ** 2).sum(1) / (2 * (1 - alpha))
    w = torch.softmax(logw, 0)
    mc = torch.log((w * torch.exp(beta * x0 @ torch.tensor(a, dtype=torch.float64))).sum())
    assert abs(float(mix.log_flow(x, alpha, a, beta)) - float(mc)) < 0.01
    # at ᾱ = 1 the flow is the reward itself
    one = torch.ones(1, dtype=torch.float64)
    torch.testing.assert_close(mix.log_flow(x, one, a, beta),
                               beta * x @ torch.tensor(a, dtype=torch.float64))


def test_untuned_exact_model_reproduces_data_mixture(sched20):
    mix = _mixture()
    xs = sample_final(ExactEps(mix), sched20, 6000, seed=3)
    counts = torch.bincount(mix.nearest(xs), minlength=2).double() / xs.shape[0]
    assert (counts - mix.weights).abs().max() < 0.03, counts
    torch.testing.assert_close(xs.double().mean(0), mix.mean(), atol=0.05, rtol=0)
    # per-mode spread: DDPM-20 shrinks it a little (discretisation), but not by more than 20 %
    comp = mix.nearest(xs)
    for k in range(2):
        std = xs[comp == k].double().std(0).mean()
        assert abs(float(std) / float(mix.stds[k]) - 1) < 0.2, (k, float(std))


def test_residual_policy_and_flow_start_at_the_exact_model(sched20):
    exact = ExactEps(_mixture())
    for param in ("mean", "score", "eps"):
        pol = ResidualEps(exact, hidden=16, depth=2, param=param, sched=sched20)
        x = torch.randn(7, 2)
        t = sched20.timesteps[:7]
        torch.testing.assert_close(pol(x, t), exact(x, t))
    flow = FlowMLP(2, 16, 2)
    with torch.no_grad():
        assert float(flow(torch.randn(5, 2), torch.tensor([0, 1, 51, 501, 951])).abs().max()) == 0.0


def test_mode_mass_mmd_and_reward_metrics():
    mix = _mixture()
    g = torch.Generator().manual_seed(4)
    ref, same = mix.sample(1500, g), mix.sample(1500, g)
    shifted = same + torch.tensor([0.5, 0.0], dtype=torch.float64)
    assert mmd_rbf(same, ref) < 0.5 * mmd_rbf(shifted, ref)
    m = evaluate(same, mix, LinearReward((1.0, 0.0)), ref)
    assert m["mass_error"] < 0.04
    assert abs(m["reward"] - float(mix.mean()[0])) < 0.06


def test_target_mixture_uses_effective_terminal_tilt(sched20):
    cfg = AnalyticConfig()
    tgt = target_mixture(cfg, sched20)
    plain = cfg.mixture().tilt(cfg.reward_direction, cfg.reward_scale)
    assert (tgt.weights - plain.weights).abs().max() < 2e-3
    # the default setting tilts the 0.5/0.5 data to about 0.2/0.8
    assert abs(float(tgt.weights[1]) - 0.8) < 0.02


def _naive_loss(policy, flow, sched, cfg, x, x_next, eps_sampled, j, end_norm):
    """The batch loss of docs/algorithm.md written out row by row from the Gaussian transition density
    ``log P_F(x' | x) = -|x' - c_x x - c_eps ε(x)|² / (2σ²)`` by autograd (no library score, loss or
    executor function).  Flow matching (``flow-sde``): ε is the velocity v, ``x̂0 = x - t v`` and the
    reward weight's ᾱ is ``(1 - t)²`` with ``t`` = timestep / 1000.  Returns (loss, terms)."""
    a = torch.tensor(cfg.reward_direction)
    flow_matching = sched.name == "flow-sde"
    terms = {"forward": 0.0, "reverse": 0.0, "terminal": 0.0, "reg": 0.0}
    n = x.shape[0]
    for i in range(n):
        k = int(j[i])
        t, t_next = sched.timesteps[k:k + 1], sched.next_timesteps[k:k + 1]
        c_x, c_eps, std = float(sched.c_x[k]), float(sched.c_eps[k]), float(sched.std[k])
        if flow_matching:
            a_cur, a_next = (1 - float(t) / 1000) ** 2, (1 - float(t_next) / 1000) ** 2
        else:
            a_cur, a_next = float(sched.alpha_cur[k]), float(sched.alpha_next[k])
        end = k == sched.num_steps - 1
        xi, xn = x[i:i + 1], x_next[i:i + 1]

        def log_pf(model, xs, xns):
            return -((xns - c_x * xs - c_eps * model(xs, t)) ** 2).sum() / (2 * std**2)

        def score_next(model):  # ∇_{x_{t-1}} log P_F, with the graph to the model's parameters
            xns = xn.clone().requires_grad_(True)
            return torch.autograd.grad(log_pf(model, xi, xns), xns, create_graph=True)[0]

        def score_cur(model):  # ∇_{x_t} log P_F, first order (detached)
            xs = xi.clone().requires_grad_(True)
            return torch.autograd.grad(log_pf(model, xs, xn), xs)[0]

        def reward_score(xs, tt, alpha, clean):  # β ᾱ ∇_x R(x̂0(x)), x̂0 of the current policy
            xs = xs.clone().requires_grad_(True)
            if clean:
                x0 = xs
            elif flow_matching:
                x0 = xs - (float(tt) / 1000) * policy(xs, tt)
            else:
                x0 = (xs - (1 - alpha) ** 0.5 * policy(xs, tt)) / alpha**0.5
            return cfg.reward_scale * alpha * torch.autograd.grad(x0 @ a, xs)[0]

        y_f = score_next(policy.exact).detach() + reward_score(xn, t_next, a_next, end)
        if flow is not None and not end:
            y_f = y_f + flow(xn, t_next)
        terms["forward"] = terms["forward"] + ((score_next(policy) - y_f) ** 2).mean() / n
        if flow is not None:
            y_b = 0.0 if end else score_cur(policy.exact) - flow(xi, t) - reward_score(xi, t, a_cur, False)
            terms["reverse"] = terms["reverse"] + ((score_cur(policy) - y_b) ** 2).mean() / n
            if end:
                terms["terminal"] = terms["terminal"] + (flow(xn, t_next) ** 2).mean() / end_norm
        terms["reg"] = terms["reg"] + ((policy(xi, t) - eps_sampled[i:i + 1]) ** 2).mean() / n
    lam_rev = cfg.reverse_loss_scale if flow is not None else 0.0
    loss = terms["forward"] + lam_rev * terms["reverse"] + terms["terminal"] + cfg.unet_reg_scale * terms["reg"]
    return loss, terms


@pytest.mark.parametrize("with_flow", [True, False])
def test_analytic_update_is_the_naive_batch_loss_gradient(sched20, with_flow):
    """The analytic validation trains through the production rows, divisors and executor
    (analytic.accumulate_update): its gradients and loss terms equal the hand-written batch loss's,
    with the terminal term averaged over last transitions inside the mean over a trajectory's K
    transitions (end_norm = n_end × K)."""
    cfg = AnalyticConfig(hidden=16, depth=2, reverse_loss_scale=3.0, unet_reg_scale=2.0)
    _check_update_against_naive_loss(cfg, sched20, with_flow)


@pytest.mark.parametrize("plan", ["optimized", "official"])
def test_analytic_flow_matching_update_is_the_naive_batch_loss_gradient(plan):
    """The same through the flow-sde sampler (flow matching, exact velocity): the executor's x̂0 is
    ``x - t v`` and the reward weight ``(1 - t)²``, in the optimized plan and in the official pass
    (keep_graph) alike."""
    cfg = AnalyticConfig(hidden=16, depth=2, reverse_loss_scale=3.0, unet_reg_scale=2.0, sampler="flow-sde",
                         num_steps=20)
    # loss terms to 2e-3: the last flow-SDE step's std is 0.0063 (a t_last, t_last = 0.0089 at shift 3), so
    # the forward score there is ~200 and float32 rounding of the mean (1e-7) / std² moves it by ~1e-3
    # (the naive loss multiplies by float64 coefficients, the library by float32 ones); gradients as DDPM
    _check_update_against_naive_loss(cfg, cfg.schedule(), True, plan, terms_rtol=2e-3)


def _check_update_against_naive_loss(cfg, sched20, with_flow, plan="optimized", terms_rtol=1e-4):
    from lowmem_nablagfn.config import MemoryConfig
    from lowmem_nablagfn.memory import build_plan

    exact = cfg.exact_model()
    torch.manual_seed(0)
    pol = ResidualEps(exact, 16, 2, cfg.residual_param, sched20)
    flow = FlowMLP(2, 16, 2) if with_flow else None
    for m in (pol.residual,) + ((flow,) if flow is not None else ()):  # every gradient path non-zero
        torch.nn.init.normal_(m.net[-1].weight, std=0.1)
    g = torch.Generator().manual_seed(5)
    b, k = 6, 5
    keep = torch.stack([torch.randperm(19, generator=g)[:k].sort().values for _ in range(b)])
    keep[:3, -1] = 19  # three trajectories with their last transition, three without
    traj = sample(lambda x, t, c: exact(x, t), sched20, torch.zeros(b, 1, 1), (2,), g, keep=keep,
                  prompts=[""] * b)
    idx = torch.tensor([4, 0, 2, 5, 1])
    params = list(pol.residual.parameters()) + (list(flow.parameters()) if flow is not None else [])
    ctx = update_context(pol, flow, sched20, LinearReward(cfg.reward_direction), cfg)
    if plan != "optimized":
        ctx.plan = build_plan(MemoryConfig(mode=plan), ctx.residual)
    got_terms = accumulate_update(ctx, traj, idx)
    got = [p.grad.clone() for p in params]

    sub = traj.select(idx)
    j = sub.step_index.reshape(-1)
    n_end = int((j == 19).sum())
    assert n_end == 3  # the batch holds last transitions (the terminal term is exercised)
    for p in params:
        p.grad = None
    loss, terms = _naive_loss(pol, flow, sched20, cfg, sub.latents.reshape(-1, 2),
                              sub.next_latents.reshape(-1, 2), sub.eps_sampled.reshape(-1, 2), j,
                              end_norm=(n_end + 1e-6) * k)
    loss.backward()
    for p, want in zip(params, got):
        assert float(p.grad.abs().max()) > 0
        torch.testing.assert_close(want, p.grad, rtol=1e-3, atol=1e-4 * float(p.grad.abs().max()))  # float32
    for name, v in terms.items():
        assert got_terms[name] == pytest.approx(float(torch.as_tensor(v).detach()), rel=terms_rtol, abs=1e-9), name
    if not with_flow:
        assert got_terms["reverse"] == 0.0 and got_terms["terminal"] == 0.0


# Small end-to-end version of benchmarks/analytic.py (fixed seeds; under a minute of CPU on an idle
# 2-core machine): T = 20 and a third of the benchmark's training, so the masses move only part of the
# way (the benchmark asserts the 0.05 criterion through analytic.verdict); looser tolerances here.
CI_CONFIG = dict(num_steps=20, num_epochs=120, num_traj=128, batches_per_epoch=16, num_eval=1000)


@pytest.fixture(scope="module")
def small_run():
    cfg = AnalyticConfig(**CI_CONFIG)
    target, rows = run_experiment(cfg, methods=("nabla_db", "draft"))
    return cfg, target, {r.name.split(" ")[0]: r.metrics for r in rows}


def test_residual_nabla_db_moves_mode_masses_toward_the_tilt_and_keeps_both(small_run):
    cfg, target, m = small_run
    prior = cfg.mixture().weights
    exact = target.weights
    got = torch.tensor(m["residual"]["mass"], dtype=torch.float64)
    assert float(got.min()) > 0.1  # both modes are kept
    moved = float((got[1] - prior[1]) / (exact[1] - prior[1]))
    assert moved > 0.6, (got, exact)  # 0.79 at this budget (mass 0.738 vs 0.800)
    assert m["residual"]["mass_error"] < 0.12  # 0.062 here; the benchmark's criterion is 0.05


def test_baseline_collapses_with_higher_reward_and_worse_mmd(small_run):
    cfg, target, m = small_run
    nabla, draft = m["residual"], m["DRaFT-5"]
    assert draft["reward"] >= nabla["reward"]
    assert nabla["mmd"] < draft["mmd"]
    assert nabla["mmd"] < m["pretrained"]["mmd"]
    assert nabla["mmd_sampler"] < draft["mmd_sampler"]


def test_verdict_checks_each_criterion():
    from lowmem_nablagfn.analytic import Row, verdict

    def rows(err, mmd, base_mmd, reward, base_reward):
        return [Row("residual ∇-DB", {"mass_error": err, "mmd": mmd, "reward": reward}),
                Row("DRaFT-5 (reward max.)", {"mass_error": 0.1, "mmd": base_mmd, "reward": base_reward})]

    assert verdict(rows(0.03, 0.1, 1.0, 0.5, 1.5))[0]
    met, why = verdict(rows(0.06, 0.1, 1.0, 0.5, 1.5))
    assert not met and "0.060 > 0.05" in why
    assert not verdict(rows(0.03, 1.1, 1.0, 0.5, 1.5))[0]  # MMD not lower than the baseline's
    assert not verdict(rows(0.03, 0.1, 1.0, 0.5, 0.4))[0]  # baseline reward lower
    assert not verdict(rows(0.03, 0.1, 1.0, 0.5, 1.5)[:1])[0]  # baseline missing


@pytest.mark.slow
def test_flow_matching_nabla_db_moves_mode_masses_toward_the_tilt():
    """The flow-matching case at the CI budget (flow-SDE-20, a = 0.7, SD 3.5's grid; 24 s, 2 min on a
    busy 2-core machine): residual ∇-DB through the production executor moves the mode masses most of
    the way to the exact tilt and keeps both modes (0.313/0.687 vs 0.193/0.807 here, 0.62 of the way;
    at the trainer's ε-tuned λ_reg = 1 it moves a third of the way in the full run).  The 0.05
    criterion is the benchmark's (``benchmarks/analytic.py --sampler flow-sde``)."""
    from lowmem_nablagfn.analytic import flow_matching_config

    cfg = flow_matching_config(**CI_CONFIG)
    target, rows = run_experiment(cfg, methods=("nabla_db",))
    m = {r.name.split(" ")[0]: r.metrics for r in rows}
    prior, exact = cfg.mixture().weights, target.weights
    got = torch.tensor(m["residual"]["mass"], dtype=torch.float64)
    assert float(got.min()) > 0.1
    moved = float((got[1] - prior[1]) / (exact[1] - prior[1]))
    assert moved > 0.45, (got, exact)
    assert m["residual"]["mmd"] < 0.6 * m["pretrained"]["mmd"]
