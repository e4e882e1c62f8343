"""The one memory plan of a run: built once, carrying every phase in order and the row arithmetic that
the executor, the trainer, the profiler and the planner read (no second copy of a rule)."""
import pytest
import torch
from helpers import SMALL, small_config

from lowmem_nablagfn import cli, planner, profiler
from lowmem_nablagfn import loop as L
from lowmem_nablagfn.config import MemoryConfig, load_config
from lowmem_nablagfn.memtrack import GiB
from lowmem_nablagfn.memory import (OFFICIAL, Batches, MemoryPlan, Mode, Phase, Rows, build_plan, executor,
                                    official_memory)
from lowmem_nablagfn.memory import plan as plan_module


@pytest.fixture
def run_plans(monkeypatch):
    """Every run plan (one built from a whole configuration, with row arithmetic) constructed meanwhile."""
    built = []
    original = MemoryPlan.__post_init__

    def counting(self):
        original(self)
        if self.batches is not None:
            built.append(self)

    monkeypatch.setattr(MemoryPlan, "__post_init__", counting)
    return built


def test_a_training_run_builds_one_plan(tmp_path, run_plans):
    args = ["train", "--preset", "tiny_cpu", "--quiet", *SMALL, f"logging.output_dir={tmp_path}",
            "logging.run_name=run", "training.num_epochs=2"]
    assert cli.main(args) == 0
    assert len(run_plans) == 1


def test_the_fit_check_reads_the_runs_plan(tmp_path, monkeypatch, run_plans):
    """On CUDA ``train`` checks the fit before set-up: with the run's plan, not a second one."""
    monkeypatch.setattr(planner.gpu, "cuda_vram_gib", lambda: 80.0)
    cfg = load_config("tiny_cpu", ["device=cuda"])
    plan = build_plan(cfg)
    assert planner.fit_check(cfg, plan) is None
    assert run_plans == [plan]


def test_components_hold_the_plan_and_the_profiler_leaves_them_alone(tmp_path):
    cfg = small_config(tmp_path, "sampling.num_batches_per_epoch=3", "training.gradient_accumulation_steps=2")
    c = L.setup(cfg)
    plan, before = c.plan, c.cfg
    assert c.plan is plan and isinstance(plan, MemoryPlan) and plan.batches == Batches.of(cfg)
    res = profiler.run_profile(cfg, updates=1, warmup=0, components=c)  # cuts the epoch to one update
    assert c.cfg is before and c.plan is plan  # the caller's run is untouched
    assert res["config"]["sampling"]["num_batches_per_epoch"] == 1
    assert res["phase_order"] == list(plan.phase_order)


@pytest.mark.parametrize("preset", ["sd15_rtx4090", "tiny_cpu", "sdxl_rtx4090", "sd15_a100x8_fast"])
def test_row_arithmetic_against_the_configuration(preset):
    cfg = load_config(preset)
    s, t = cfg.sampling, cfg.training
    b = build_plan(cfg).batches
    k = int(s.num_steps * cfg.model.timestep_fraction)
    assert b.kept == (s.num_steps if k == s.num_steps else k + 1)
    assert b.rows == t.batch_size * b.kept and b.live == b.rows - t.batch_size
    assert b.updates_per_epoch == s.batch_size * s.num_batches_per_epoch // (t.batch_size * t.gradient_accumulation_steps)
    assert b.held_epochs == (1 if t.on_policy else 2)
    assert L.updates_per_epoch(cfg) == b.updates_per_epoch


def test_sd15_row_arithmetic_in_numbers():
    """The paper's setting: T=50, K=5 (6 kept), B=4, 16x4 trajectories, 8 accumulation steps."""
    b = build_plan(load_config("sd15_a100x8")).batches
    assert (b.kept, b.rows, b.live, b.trajectories_per_epoch, b.updates_per_epoch) == (6, 24, 20, 64, 2)


def test_chunk_rule():
    assert Phase("train", 0).call_rows(24) == 24 and Phase("train", 0).calls(24) == 1
    assert Phase("train", 5).call_rows(24) == 5 and Phase("train", 5).calls(24) == 5
    assert Phase("train", 50).call_rows(24) == 24 and Phase("train", 3).calls(0) == 0


@pytest.mark.parametrize("mode", ["optimized", "naive", "official"])
@pytest.mark.parametrize("no_flow", [False, True])
def test_phase_order_is_the_runs(mode, no_flow):
    keep_graph = [] if mode == "optimized" else planner.OFFICIAL_OVERRIDES  # the shipped trace's flags
    cfg = load_config("sd15_rtx4090", keep_graph + [f"memory.mode={mode}", f"model.no_flow={str(no_flow).lower()}"])
    plan = build_plan(cfg)
    assert plan.mode is Mode(mode) and plan.mode == mode and plan.per_slot == (mode == "official")
    assert plan.residual == (not no_flow)
    update = [p.name for p in plan.phases]
    assert plan.phase_order == ("encode", "sampling", "final_reward", *update, "optimizer")
    assert ("reward_grad_cur" in update) == (not no_flow)
    pred = planner.predict(cfg, planner.Probes(cfg, allow_trace=False))
    assert list(pred.phases) == [n for n in plan.phase_order if n in pred.phases]


def test_rows_per_phase_and_groups():
    cfg = load_config("sd15_a100x8", ["memory.input_grad_chunk=7"])
    plan = build_plan(cfg)
    by = {p.name: p for p in plan.phases}
    assert plan.phase_rows(by["reward_grad_next"]) == 24 and plan.unet_rows(by["reward_grad_next"]) == 20
    assert plan.phase_rows(by["reward_grad_cur"]) == 20 and plan.unet_rows(by["reward_grad_cur"]) == 20
    assert by["reward_grad_next"].call_rows(24) == 7 and plan.groups() == (24, 1)
    official = build_plan(load_config("sd15_a100x8", ["memory.mode=official"]))
    assert official.groups() == (4, 6)
    assert not any(p.skips_unet_on_last for p in official.phases)  # the official pass calls the UNet on every row
    with pytest.raises(ValueError, match="row arithmetic"):
        build_plan(MemoryConfig()).phase_rows(by["train"])


def test_one_definition_of_the_official_schedule():
    cfg = load_config("sd15_rtx4090")
    base = planner.official_baseline(cfg)
    assert base.memory == official_memory(cfg.memory)
    assert all(getattr(base.memory, k) == v for k, v in OFFICIAL.items())
    assert base.memory.attention == cfg.memory.attention and cfg.memory.mode == "optimized"  # caller's untouched
    assert load_config("sd15_rtx4090", planner.OFFICIAL_OVERRIDES).memory == base.memory


def test_the_checkpoint_flags_name_their_modules(tmp_path):
    """``Placement.checkpointing`` is the one map of flag -> module; the trainer's switch follows it."""
    c = L.setup(small_config(tmp_path, "reward.name=aesthetic", "reward.checkpoint=random:reduced",
                             "memory.checkpoint_vae=true", "memory.checkpoint_flow=true"))
    assert c.plan.placement.checkpointing == {"unet": False, "vae": True, "reward": False, "flow": True}
    flags = {"unet": c.parts.unet.is_gradient_checkpointing, "vae": "forward" in c.parts.vae.decoder.__dict__,
             "flow": c.flow_model.is_gradient_checkpointing}  # the VAE decoder: per-layer, an instance forward
    assert flags == {"unet": False, "vae": True, "flow": True}


def test_executor_calls_follow_the_chunk_rule(monkeypatch):
    """The executor's calls per phase are ``Phase.calls`` of its rows (what the planner counts)."""
    calls = []
    monkeypatch.setattr(executor, "reward_grad_at", lambda ctx, rows, nxt: calls.append(len(rows)) or
                        torch.zeros_like(rows.x))
    n = 10
    rows = Rows(torch.zeros(n, 2), torch.zeros(n, 2), torch.zeros(n, 2), torch.zeros(n, dtype=torch.long),
                torch.zeros(n, 1, 2), [""] * n, torch.arange(n) % 5 == 4)

    class Ctx:
        plan = build_plan(MemoryConfig(input_grad_chunk=3))

    g = executor._Group(rows, 1.0, 1.0, 1.0)
    ph = Ctx.plan.phase("reward_grad_next")
    executor._reward_grad_next(Ctx, g, ph)
    assert calls == [3, 3, 3, 1] and len(calls) == ph.calls(n)
    calls.clear()
    ph = Ctx.plan.phase("reward_grad_cur")
    executor._reward_grad_cur(Ctx, g, ph)
    assert calls == [3, 3, 2] and len(calls) == ph.calls(8)  # the live rows only


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown phase"):
        MemoryPlan((Phase("nope"),))
    assert plan_module.PHASES == ("reference", "policy", "reward_grad_next", "reward_grad_cur", "train")


def test_a_monitored_run_plans_the_monitor_phase(tmp_path, monkeypatch):
    """``monitor.rewards`` adds the monitor's phase to the run's plan, and the planner costs it."""
    monkeypatch.setenv("LOWMEM_NABLAGFN_CACHE", str(tmp_path))
    cfg = load_config("tiny_cpu", ["monitor.rewards=[builtin:blueness]"])
    plan = build_plan(cfg)
    assert plan.phase_order[-2:] == ("optimizer", "monitor")
    assert "monitor" not in build_plan(load_config("tiny_cpu")).phase_order
    pred = planner.predict(cfg, planner.Probes(cfg))
    assert list(pred.phases) == list(plan.phase_order)
    plain = planner.predict(load_config("tiny_cpu"), planner.Probes(load_config("tiny_cpu")))
    assert {n: pred.phases[n] for n in plain.phases} == plain.phases  # blueness has no weights to hold
    from lowmem_nablagfn.planner.monitor import monitor_cost

    assert pred.phases["monitor"] > monitor_cost(cfg).phase > 0


def test_the_fit_check_predicts_sd3(monkeypatch):
    """An SD 3.x run is fit-checked on its own architecture (the transformer, no text encoder), not an SD 1.5
    estimate in disguise: refused on a 10 MiB card, with SD 3's figures."""
    monkeypatch.setattr(planner.gpu, "cuda_vram_gib", lambda: 0.01)
    cfg = load_config("tiny_cpu", ["device=cuda", "pretrained.model=tiny-sd3"])
    msg = planner.fit_check(cfg)
    pred = planner.predict(cfg, planner.Probes(cfg))
    assert msg is not None and f"peak {pred.peak / GiB:.2f} GiB in {pred.peak_phase}" in msg, msg
    unet = load_config("tiny_cpu", ["device=cuda"])
    assert planner.predict(unet, planner.Probes(unet)).peak != pred.peak  # not the UNet's figure
    assert planner.fit_check(load_config("tiny_cpu", ["device=cuda"])) is not None  # 10 MiB: the UNet is refused
