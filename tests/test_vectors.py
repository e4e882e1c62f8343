"""The step and loss math against the reference vectors (every file of each kind, any shape).

Files: ``tests/data/vectors/*.npz`` plus every ``.npz`` in the directories listed in
``LOWMEM_NABLAGFN_EXTRA_VECTORS`` (colon-separated). Tolerance: max|out - ref| / max|ref| < 1e-4 (fp32).
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lowmem_nablagfn.diffusion import forward_score, make_schedule, pred_x0, reverse_score, step_mean
from lowmem_nablagfn.objective import FlowValues, LossWeights, RewardGrads, Scores, Steps, TrustRegion, nabla_db_loss

HERE = Path(__file__).parent / "data" / "vectors"
RTOL = 1e-4


def _files():
    dirs = [HERE] + [Path(d) for d in os.environ.get("LOWMEM_NABLAGFN_EXTRA_VECTORS", "").split(":") if d]
    return sorted({p.resolve() for d in dirs for p in d.glob("*.npz")})


def _load(path):
    data = dict(np.load(path, allow_pickle=False))
    meta = json.loads(str(data.pop("meta")))
    return meta, data


FILES = _files()
BY_KIND = {}
for _p in FILES:
    BY_KIND.setdefault(_load(_p)[0]["kind"], []).append(_p)


def rel_err(out, ref):
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    out = out.detach().to(torch.float64).reshape(ref.shape)
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def t32(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def test_every_kind_is_present():
    assert {"ddim_step", "sde_dpmpp1_step", "nabla_db_loss", "flow_sde_step"} <= set(BY_KIND), BY_KIND.keys()


def _schedule(meta):
    name = "ddim" if meta["kind"] == "ddim_step" else "dpm-solver"
    cfg = {k: v for k, v in meta["scheduler_config"].items()
           if k not in ("algorithm_type", "solver_order", "final_sigmas_type")}
    return make_schedule(name, meta["num_inference_steps"], meta.get("eta", 1.0), cfg)


def _step_checks(path):
    meta, d = _load(path)
    sched = _schedule(meta)
    j = torch.as_tensor(d["step_index"]).long()
    assert torch.equal(sched.timesteps[j], torch.as_tensor(d["timestep"]).long())
    x, x_prev, eps = t32(d["x_t"]), t32(d["x_prev"]), t32(d["eps"])
    strength, slope = float(d["strength"]), float(d["eps_slope"])
    mean = step_mean(sched, j, x, eps)
    out = {"step_mean": mean, "score_next": strength * forward_score(sched, j, x_prev, mean)}
    xg = x.clone().requires_grad_(True)
    eps_lin = slope * xg + t32(d["eps_offset"])
    out["score_cur"] = strength * reverse_score(sched, j, xg, eps_lin, x_prev)
    if "step_var" in d:
        out["step_var"] = sched.std[j] ** 2
    if "step_std" in d:
        out["step_std"] = sched.std[j]
    if "x0_next" in d:
        t_next = torch.as_tensor(d["timestep_next"]).long()
        assert torch.equal(sched.next_timesteps[j], t_next)
        a_next = sched.gather("alpha_next", j, x)
        x0n = pred_x0(x_prev, t32(d["eps_next"]), a_next)
        out["x0_next"] = torch.where((t_next == 0).view(-1, 1, 1, 1), x_prev, x0n)
        out["x0_cur"] = pred_x0(x, eps, sched.gather("alpha_cur", j, x))
        out["alpha_prod_next"], out["alpha_prod_cur"] = sched.alpha_next[j], sched.alpha_cur[j]
    for key, value in out.items():
        assert rel_err(value, d[key]) < RTOL, (path.name, key, rel_err(value, d[key]))


@pytest.mark.parametrize("path", BY_KIND.get("ddim_step", []), ids=lambda p: p.name)
def test_ddim_step(path):
    _step_checks(path)


@pytest.mark.parametrize("path", BY_KIND.get("sde_dpmpp1_step", []), ids=lambda p: p.name)
def test_sde_dpmpp1_step(path):
    _step_checks(path)


@pytest.mark.parametrize("path", BY_KIND.get("flow_sde_step", []), ids=lambda p: p.name)
def test_flow_sde_step(path):
    """Flow-GRPO's SDE step on the flow-matching grid (tests/data/vectors/make_flow_sde.py): timesteps,
    mean, std, forward and reverse scores (v linear in x), x̂0 = x - t v and the reward weight's ᾱ
    analogue (1 - t)², all through the library's one code path."""
    meta, d = _load(path)
    sched = make_schedule("flow-sde", meta["num_inference_steps"], meta["noise_level"], meta["scheduler_config"])
    j = torch.as_tensor(d["step_index"]).long()
    x, x_prev, v = t32(d["x_t"]), t32(d["x_prev"]), t32(d["v"])
    strength = float(d["strength"])
    mean = step_mean(sched, j, x, v)
    xg = x.clone().requires_grad_(True)
    v_lin = float(d["v_slope"]) * xg + t32(d["v_offset"])
    out = {"timestep": sched.timesteps[j], "timestep_next": sched.next_timesteps[j], "step_mean": mean,
           "step_std": sched.std[j], "score_next": strength * forward_score(sched, j, x_prev, mean),
           "score_cur": strength * reverse_score(sched, j, xg, v_lin, x_prev),
           "x0_cur": sched.pred_x0(j, x, v), "x0_next": sched.pred_x0(j, x_prev, t32(d["v_next"]), nxt=True),
           "alpha_prod_cur": sched.alpha_cur[j], "alpha_prod_next": sched.alpha_next[j]}
    for key, value in out.items():
        assert rel_err(value, d[key]) < RTOL, (path.name, key, rel_err(value, d[key]))


def loss(s_next, s_next_ref, s_cur, s_cur_ref, flow_cur, flow_next, r_next, r_cur, alpha_next, alpha_cur, end, eps,
         eps_sampled, weights, **norms):
    """:func:`nabla_db_loss` from the vectors' flat list of tensors (its inputs are grouped)."""
    flow = None if flow_next is None else FlowValues(cur=flow_cur, next=flow_next)
    return nabla_db_loss(policy=Scores(s_next, s_cur), reference=Scores(s_next_ref, s_cur_ref),
                         reward=RewardGrads(r_next, r_cur), flow=flow, steps=Steps(alpha_next, alpha_cur, end),
                         trust=TrustRegion(eps, eps_sampled), weights=weights, **norms)


@pytest.mark.parametrize("path", BY_KIND.get("nabla_db_loss", []), ids=lambda p: p.name)
def test_nabla_db_loss(path):
    meta, d = _load(path)
    no_flow = meta["no_flow"]
    g = {k: t32(d[k]) for k in ("res_logflow", "res_logflow_next")}
    terms = loss(t32(d["score_pf"]), t32(d["score_pf_ref"]), t32(d["score_pf_reverse"]), t32(d["score_pf_ref_reverse"]),
                 None if no_flow else g["res_logflow"], None if no_flow else g["res_logflow_next"],
                 t32(d["reward_grad_next"]), t32(d["reward_grad"]), t32(d["alpha_prod_next"]), t32(d["alpha_prod"]),
                 torch.as_tensor(d["end_mask"]).bool(), t32(d["unet_out"]), t32(d["unet_out_sampled"]),
                 LossWeights(float(d["reward_scale"]), float(d["reverse_loss_scale"]), float(d["unet_reg_scale"]),
                             meta["reward_adaptive_mode"]))
    for key, value in [("target_forward", terms.target_forward), ("target_reverse", terms.target_reverse),
                       ("loss_forward", terms.forward), ("loss_reverse", terms.reverse),
                       ("loss_terminal", terms.terminal), ("unet_reg", terms.reg), ("loss", terms.loss)]:
        ref = np.asarray(d[key])
        if np.abs(ref).max() == 0:
            assert float(value.abs().max()) < 1e-6, (path.name, key)
        else:
            assert rel_err(value, ref) < RTOL, (path.name, key, rel_err(value, ref))


def test_loss_chunks_sum_to_the_batch_loss():
    """row_norm / end_norm make chunked losses add up exactly (the memory plan relies on it)."""
    gen = torch.Generator().manual_seed(0)
    n = 6
    r = lambda: torch.randn(n, 4, 3, 3, generator=gen, dtype=torch.float64)  # noqa: E731
    args = [r() for _ in range(8)]
    end = torch.tensor([True, False, False, True, False, False])
    a_n, a_c = torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    e, es = r(), r()
    w = LossWeights(10.0, 0.5, 3.0)
    whole = loss(*args, a_n, a_c, end, e, es, w).loss
    parts = sum(loss(*[a[i:i + 2] for a in args], a_n[i:i + 2], a_c[i:i + 2], end[i:i + 2], e[i:i + 2], es[i:i + 2],
                     w, row_norm=n, end_norm=float(end.sum()) + 1e-6).loss for i in range(0, n, 2))
    assert torch.allclose(whole, parts, rtol=1e-12)
