"""Every memory optimisation — and the official schedule (one graph and one backward per transition
slot) — leaves the LoRA and flow gradients of one update unchanged (vs naive: the whole batch in one
graph, one backward).

The comparisons compare something: ``lora_B`` is moved away from its zero init (else every ``lora_A``
gradient is 0), the batch holds last transitions and live ones, chunk sizes do not divide the rows,
and the reward is a CLIP-tower reward whose blocks can be checkpointed.  The models run in float64
(the reward computes in float32 inside): in float32, β = 3e5 amplifies the rounding of a UNet call on
4 rows instead of 6 to ~1e-3 of a gradient, which would hide a real difference of that size."""
import pytest
import torch

from lowmem_nablagfn import loop as T
from lowmem_nablagfn import memtrack
from lowmem_nablagfn.config import MemoryConfig
from lowmem_nablagfn.memory import Rows, accumulate_gradients, build_plan, executor
from lowmem_nablagfn.sampling import Trajectories
from lowmem_nablagfn.subsample import gather

from helpers import small_config

OPTIONS = {
    "optimized": {},
    "checkpoint_unet": {"checkpoint_unet": True},
    "checkpoint_reward": {"checkpoint_reward": True},
    "input_grad_chunk=4 (uneven)": {"input_grad_chunk": 4},
    "train_chunk=4 (uneven)": {"train_chunk": 4},
    "all": {"checkpoint_unet": True, "checkpoint_vae": True, "checkpoint_reward": True, "checkpoint_flow": True,
            "input_grad_chunk": 5, "train_chunk": 4},
    "official": {"mode": "official"},
    "official+checkpointing": {"mode": "official", "checkpoint_unet": True, "checkpoint_vae": True,
                               "checkpoint_reward": True, "checkpoint_flow": True},
}
REWARD = ["reward.name=aesthetic", "reward.checkpoint=random:reduced"]  # a tower reward: checkpointable blocks


def _ctx(c, opts):
    """The update context of ``c`` under the memory options ``opts`` (checkpointing switched on/off)."""
    plan = build_plan(MemoryConfig(**opts), c.flow_model is not None)
    plan.placement.apply_checkpointing(c.parts.denoiser, c.parts.vae, c.reward_model, c.flow_model)  # the trainer's switch
    ctx = T.update_context(c)
    ctx.plan = plan
    return ctx


def _grads(c, rows, opts):
    ctx = _ctx(c, opts)
    c.optimizer.zero_grad(set_to_none=True)
    row_norm, end_norm = rows.norms(3)
    terms = accumulate_gradients(ctx, rows, row_norm=row_norm, end_norm=end_norm, scale=0.5)
    flat = {g: torch.cat([p.grad.reshape(-1) for p in ps]) for g, ps in c.trainable.items()}
    return flat, terms


@pytest.fixture(scope="module", params=["residual", "no_flow"])
def setup_and_rows(request, tmp_path_factory):
    extra = ["model.no_flow=true"] if request.param == "no_flow" else []
    cfg = small_config(tmp_path_factory.mktemp("mem"), *REWARD, *extra)
    c = T.setup(cfg)
    assert hasattr(c.reward_model, "set_checkpointing")
    gen = torch.Generator().manual_seed(0)
    for name, p in c.parts.unet.named_parameters():  # B = 0 at init would leave lora_A's gradient zero
        if "lora_B" in name:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=gen))
    data = T.sample_epoch(c, 0)
    rows = Rows.from_trajectories(data.select(torch.arange(2)), c.sched.num_steps, c.device)
    for module in (c.parts.unet, c.parts.vae, c.flow_model, c.reward_model):
        if module is not None:
            module.double()
    c.uncond = c.uncond.double()
    rows = Rows(rows.x.double(), rows.x_next.double(), rows.eps_sampled.double(), rows.step_index,
                rows.cond.double(), rows.prompts, rows.end, rows.slot)
    assert len(rows) == 6 and 0 < int(rows.end.sum()) < len(rows)  # last transitions and live ones
    naive, naive_terms = _grads(c, rows, {"mode": "naive"})
    for name, p in c.parts.unet.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if c.flow_model is not None:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in c.flow_model.parameters())
    c.data = data
    return c, rows, naive, naive_terms


@pytest.mark.parametrize("name", list(OPTIONS))
def test_gradients_equal_naive(setup_and_rows, name):
    c, rows, naive, naive_terms = setup_and_rows
    grads, terms = _grads(c, rows, OPTIONS[name])
    for key, g in naive.items():
        # the reward's float32 rounding on other row counts: ~1e-6 of the group's largest entry
        assert torch.allclose(grads[key], g, rtol=1e-5, atol=1e-5 * float(g.abs().max())), key
    assert float(terms["loss"]) == pytest.approx(float(naive_terms["loss"]), rel=1e-6)
    assert set(grads) == ({"lora"} if c.flow_model is None else {"lora", "flow"})


def test_official_schedule_runs_one_graph_per_slot(setup_and_rows, monkeypatch):
    """``memory.mode=official``: the phases once per transition slot, on that slot's B rows."""
    c, rows, _, _ = setup_and_rows
    seen = []
    inner = executor.PASSES["policy"]
    monkeypatch.setitem(executor.PASSES, "policy", lambda ctx, g, ph: seen.append(g.rows) or inner(ctx, g, ph))
    _grads(c, rows, {"mode": "official"})
    per_traj = 3  # K + 1 of tiny_cpu
    assert len(seen) == per_traj and all(len(r) == 2 for r in seen)  # B = 2 trajectories per batch
    for s, r in enumerate(seen):
        assert torch.equal(r.slot, torch.full((2,), s)) and torch.equal(r.x, rows.x[s::per_traj])


@pytest.mark.parametrize("mode", ["optimized", "naive", "official"])
def test_executor_runs_the_plan_it_is_given(setup_and_rows, mode):
    """The phases the executor marks are the plan's, in the plan's order, chunked as the plan says."""
    c, rows, _, _ = setup_and_rows
    opts = {"mode": mode, "input_grad_chunk": 4, "train_chunk": 4}
    ctx = _ctx(c, opts)
    order = []
    with memtrack.recording(torch.device("cpu")) as rec:
        inner = memtrack.phase

        def spy(name):
            order.append(name)
            return inner(name)

        memtrack.phase = spy
        try:
            accumulate_gradients(ctx, rows, row_norm=6.0, end_norm=1.0)
        finally:
            memtrack.phase = inner
    names = [p.name for p in ctx.plan.phases]
    groups = 3 if mode == "official" else 1
    assert order == names * groups and set(names) <= set(rec.phases)
    if mode == "optimized":  # 6 rows in chunks of 4: 2 training passes; the flow adds nothing to count
        assert [p.chunk for p in ctx.plan.phases] == [4] * len(names)


def test_placement_parks_trajectories_in_host_memory(setup_and_rows):
    """``memory.offload_trajectories``: stored samples live in host memory between sampling and training."""
    c, _, _, _ = setup_and_rows
    traj = c.data
    parked = build_plan(MemoryConfig(offload_trajectories=True)).placement.park(traj)
    assert parked.latents.device.type == "cpu"
    assert parked.latents.is_pinned() == torch.cuda.is_available()
    assert build_plan(MemoryConfig()).placement.park(traj) is traj


def test_store_only_trained_equals_gather_after(tmp_path):
    """Select-before-sample stores exactly the transitions a full trajectory gathers afterwards."""
    cfg = small_config(tmp_path, "memory.store_only_trained=true")
    c = T.setup(cfg)
    kept = T.sample_epoch(c, 0)
    c.cfg.memory.store_only_trained = False
    full = T.sample_epoch(c, 0)
    for name in ("latents", "next_latents", "eps_sampled", "step_index", "final_latents"):
        assert torch.equal(getattr(kept, name), getattr(full, name)), name
    assert kept.latents.shape[1] == 3  # K + 1 of T = 10, not T


def test_gather_matches_indexing():
    x = torch.randn(3, 10, 2, 2)
    idx = torch.tensor([[9, 4, 1], [9, 0, 2], [9, 9, 3]])
    out = gather({"x": x}, idx)["x"]
    for b in range(3):
        for s in range(3):
            assert torch.equal(out[b, s], x[b, idx[b, s]])
    assert isinstance(Trajectories, type)
