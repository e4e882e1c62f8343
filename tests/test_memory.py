"""Every memory optimisation — and the official schedule (one graph and one backward per transition
slot) — leaves the LoRA and flow gradients of one update unchanged (vs naive: the whole batch in one
graph, one backward)."""
import pytest
import torch

from lowmem_nablagfn import trainer as T
from lowmem_nablagfn.memory import accumulate_gradients
from lowmem_nablagfn.sampling import Trajectories
from lowmem_nablagfn.subsample import gather

from helpers import small_config

OPTIONS = {
    "optimized": {},
    "checkpoint_unet": {"checkpoint_unet": True},
    "checkpoint_vae": {"checkpoint_vae": True},
    "checkpoint_flow": {"checkpoint_flow": True},
    "input_grad_chunk=1": {"input_grad_chunk": 1},
    "train_chunk=2": {"train_chunk": 2},
    "all": {"checkpoint_unet": True, "checkpoint_vae": True, "checkpoint_flow": True,
            "input_grad_chunk": 1, "train_chunk": 3},
    "official": {"mode": "official"},
    "official+checkpointing": {"mode": "official", "checkpoint_unet": True, "checkpoint_vae": True,
                               "checkpoint_flow": True},
}


def _grads(c, rows, mode, opts):
    for module, key in ((c.parts.unet, "checkpoint_unet"), (c.parts.vae, "checkpoint_vae"),
                        (c.flow_model, "checkpoint_flow")):
        if module is not None:
            (module.enable_gradient_checkpointing if opts.get(key) else module.disable_gradient_checkpointing)()
    ctx = T.update_context(c)
    ctx.mode, ctx.input_grad_chunk, ctx.train_chunk = (opts.get("mode", mode), opts.get("input_grad_chunk", 0),
                                                       opts.get("train_chunk", 0))
    c.optimizer.zero_grad(set_to_none=True)
    n_end = float(rows.end.sum())
    terms = accumulate_gradients(ctx, rows, float(len(rows)), (n_end + 1e-6) * 3, scale=0.5)
    flat = {g: torch.cat([p.grad.reshape(-1) for p in ps]) for g, ps in c.trainable.items()}
    return flat, terms


@pytest.fixture(scope="module", params=["residual", "no_flow"])
def setup_and_rows(request, tmp_path_factory):
    extra = ["model.no_flow=true"] if request.param == "no_flow" else []
    cfg = small_config(tmp_path_factory.mktemp("mem"), *extra)
    c = T.setup(cfg)
    gen = torch.Generator().manual_seed(0)
    for name, p in c.parts.unet.named_parameters():  # B = 0 at init would leave lora_A's gradient zero
        if "lora_B" in name:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=gen))
    data = T.sample_epoch(c, 0)
    rows = T.flatten(data.select(torch.arange(2)), c.sched.num_steps, c.device)
    naive, naive_terms = _grads(c, rows, "naive", {})
    lora_a = [p.grad for n, p in c.parts.unet.named_parameters() if "lora_A" in n]
    assert lora_a and all(g is not None and g.abs().sum() > 0 for g in lora_a)
    return c, rows, naive, naive_terms


@pytest.mark.parametrize("name", list(OPTIONS))
def test_gradients_equal_naive(setup_and_rows, name):
    c, rows, naive, naive_terms = setup_and_rows
    assert any(g.abs().sum() > 0 for g in naive.values())
    grads, terms = _grads(c, rows, "optimized", OPTIONS[name])
    for key, g in naive.items():
        # rtol 1e-4 per element; entries ~1e-5 of the group's largest are fp32 noise (e.g. biases
        # feeding a normalisation, whose true gradient is zero)
        assert torch.allclose(grads[key], g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), key
    assert terms["loss"] == pytest.approx(naive_terms["loss"], rel=1e-4)
    assert set(grads) == ({"lora"} if c.flow_model is None else {"lora", "flow"})


def test_official_schedule_runs_one_graph_per_slot(setup_and_rows, monkeypatch):
    """``memory.mode=official``: the naive passes once per transition slot, on that slot's B rows."""
    from lowmem_nablagfn import memory

    c, rows, _, _ = setup_and_rows
    seen = []
    inner = memory._naive
    monkeypatch.setattr(memory, "_naive", lambda ctx, r, *a: seen.append(r) or inner(ctx, r, *a))
    _grads(c, rows, "official", {})
    per_traj = 3  # K + 1 of tiny_cpu
    assert len(seen) == per_traj and all(len(r) == 2 for r in seen)  # B = 2 trajectories per batch
    for s, r in enumerate(seen):
        assert torch.equal(r.slot, torch.full((2,), s)) and torch.equal(r.x, rows.x[s::per_traj])


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
