"""The paper's command gives the paper's run: the official numbers, copied here from the official
``config/default_config.py`` / ``config/aesthetic.py`` / README and the paper (docs/algorithm.md, "Official
defaults"), held against the dataclass defaults and the presets that reproduce each run."""
import pytest

from lowmem_nablagfn.config import load_config, validate

#: config/default_config.py (per process)
OFFICIAL_DEFAULTS = {
    "sampling.batch_size": 16,
    "sampling.num_batches_per_epoch": 4,
    "training.batch_size": 4,
    "training.gradient_accumulation_steps": 8,
    "training.num_epochs": 100,
    "model.reward_scale": 1e3,
    "model.unet_reg_scale": 1e3,
    "model.timestep_fraction": 0.1,
    "training.learning_rate": 1e-3,
    "training.flow_learning_rate": 1e-3,
    "training.flow_weight_decay": 1e-2,
    "training.adam_weight_decay": 1e-4,
    "training.adam_beta1": 0.9,
    "training.adam_beta2": 0.999,
    "training.adam_epsilon": 1e-8,
    "training.max_grad_norm": 1.0,
    "sampling.num_steps": 50,
    "sampling.eta": 1.0,
    "sampling.guidance_scale": 5.0,
    "model.lora.rank": 8,
    "model.reverse_loss_scale": 1.0,
    "model.pretrained_strength": 1.0,
}
#: the official README's aesthetic command (8x A100): --config.model.reward_scale=1e4
#: --config.sampling.low_var_subsampling=True --config.model.unet_reg_scale=2e3
AESTHETIC = {**OFFICIAL_DEFAULTS, "model.reward_scale": 1e4, "sampling.low_var_subsampling": True,
             "model.unet_reg_scale": 2e3, "reward.name": "aesthetic", "prompts.set": "simple_animals"}
#: its "fast" setting
FAST = {**AESTHETIC, "model.timestep_fraction": 0.1, "training.gradient_accumulation_steps": 1,
        "sampling.batch_size": 4, "sampling.num_batches_per_epoch": 1, "training.num_epochs": 400}
#: its "fewer GPUs" setting (2 GPUs)
FEWER_GPUS = {**AESTHETIC, "training.gradient_accumulation_steps": 4, "sampling.num_batches_per_epoch": 4}
#: the paper's HPSv2 and ImageReward runs (β, λ_reg); the official code loads HPS v2.1 as "hpsv2"
HPSV2 = {**AESTHETIC, "model.reward_scale": 5e5, "model.unet_reg_scale": 5e3, "reward.name": "hpsv2.1",
         "prompts.set": "hpd_photo_painting"}
IMAGEREWARD = {**AESTHETIC, "model.reward_scale": 1e4, "model.unet_reg_scale": 5e3, "reward.name": "imagereward",
               "prompts.set": "drawbench"}

RUNS = {"sd15_a100x8": AESTHETIC, "sd15_a100x8_fast": FAST, "sd15_a100x2": FEWER_GPUS,
        "sd15_a100x8_hpsv2": HPSV2, "sd15_a100x8_imagereward": IMAGEREWARD}
#: what a preset may set beyond the official values: where and how it runs, never the math
NOT_MATH = ("pretrained.", "memory.", "logging.", "distributed.", "device", "seed")


def value(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def leaves(cfg, prefix=""):
    from dataclasses import fields, is_dataclass

    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out.update(leaves(v, f"{prefix}{f.name}.") if is_dataclass(v) else {f"{prefix}{f.name}": v})
    return out


def test_defaults_are_the_official_defaults():
    cfg = validate(load_config())
    assert {k: value(cfg, k) for k in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS
    assert cfg.memory.transition_dtype == "fp32"


@pytest.mark.parametrize("preset", sorted(RUNS))
def test_preset_is_the_official_run(preset):
    """Every official value holds, and every other math setting is the default (nothing extra)."""
    cfg = validate(load_config(preset))
    want = RUNS[preset]
    assert {k: value(cfg, k) for k in want} == want
    default = leaves(load_config())
    changed = {k for k, v in leaves(cfg).items() if v != default[k] and not k.startswith(NOT_MATH)}
    assert changed <= set(want), f"{preset} changes {sorted(changed - set(want))} beyond the official run"
    assert cfg.pretrained.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.memory.transition_dtype == "fp32"


def test_official_command_spelling_gives_the_preset():
    """The README's command typed on the defaults gives the sd15_a100x8 preset's math."""
    typed = load_config(None, ["--config.model.reward_scale=1e4", "--config.sampling.low_var_subsampling=True",
                               "--config.model.unet_reg_scale=2e3", "reward.name=aesthetic"])
    preset = load_config("sd15_a100x8")
    for key in AESTHETIC:
        assert value(typed, key) == value(preset, key), key


@pytest.mark.parametrize("preset", ["sd15_rtx4090", "sd15_l40", "sd15_v100", "sd15_nof_lowmem"])
def test_single_gpu_presets_keep_the_papers_beta_and_reg(preset):
    cfg = validate(load_config(preset))
    assert (cfg.model.reward_scale, cfg.model.unet_reg_scale, cfg.reward.name) == (1e4, 2e3, "aesthetic")


def test_readme_states_the_papers_hyperparameters_next_to_the_presets():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for preset in RUNS:
        assert f"`{preset}`" in readme
    for needle in ("β 1e4, λ_reg 2e3", "β 5e5, λ_reg 5e3", "β 1e4, λ_reg 5e3",
                   "Differences from the official implementation"):
        assert needle in readme, needle


def test_timestep_fraction_advice_validates():
    """The advice in config.py's docstring and error message: every suggested value validates."""
    for steps, sched, fraction in [(50, "ddim", 0.1), (20, "dpm-solver", 0.1), (20, "dpm-solver", 0.2),
                                   (20, "dpm-solver", 0.25)]:
        validate(load_config("tiny_cpu", [f"sampling.num_steps={steps}", f"sampling.scheduler={sched}",
                                          f"model.timestep_fraction={fraction}"]))
    from lowmem_nablagfn.config import ConfigError

    with pytest.raises(ConfigError, match="0.1, 0.2 or 0.25 for 20 DPM-Solver"):
        validate(load_config("tiny_cpu", ["sampling.num_steps=20", "model.timestep_fraction=0"]))
    import inspect

    from lowmem_nablagfn.config import loading, schema, validation

    for module in (loading, schema, validation):
        assert "0.4 for 20" not in inspect.getsource(module)


def test_kept_transitions_are_stored_in_fp32_by_default(tmp_path):
    """``memory.transition_dtype``: fp32 by default (bf16 storage puts ~11 % error into s_F at the
    last transition), bf16 on request; the trainer trains on them in fp32 either way; the planner
    counts the bytes."""
    import torch

    from lowmem_nablagfn import planner
    from lowmem_nablagfn import loop as L
    from lowmem_nablagfn.memory import Rows

    from helpers import small_config

    c = L.setup(small_config(tmp_path, "training.mixed_precision=no", "sampling.batch_size=2"))
    from dataclasses import replace

    from lowmem_nablagfn.memory import build_plan

    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # the run's plan reads it once (build_plan); sample_epoch stores in the plan's dtype
        c.plan = build_plan(replace(c.cfg, memory=replace(c.cfg.memory, transition_dtype=dtype)))
        data = L.sample_epoch(c, 0)
        assert data.latents.dtype == data.next_latents.dtype == data.eps_sampled.dtype == want
        assert Rows.from_trajectories(data, c.sched.num_steps, c.device).x.dtype == torch.float32
    c.sync.close()
    cfg = load_config("sd15_rtx4090")
    profile = planner.Probes(cfg, allow_trace=False)
    sizes = {d: planner.predict(load_config("sd15_rtx4090", [f"memory.transition_dtype={d}"]),
                                profile).resident["trajectories"] for d in ("fp32", "bf16")}
    assert sizes["fp32"] > sizes["bf16"]
