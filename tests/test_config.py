"""Every preset loads and validates; each bad value gets one clear error before any model is built."""
import pytest

from lowmem_nablagfn.config import ConfigError, list_presets, load_config, validate

PRESETS = list_presets()


def test_presets_exist():
    assert {"tiny_cpu", "sd15_a100x8", "sd15_rtx4090", "sd15_v100", "sd15_l40", "sd15_nof_lowmem"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_and_validates(preset):
    cfg = validate(load_config(preset))
    assert cfg.sampling.batch_size > 0


def test_defaults_are_the_official_settings():
    cfg = load_config()
    assert cfg.sampling.num_steps == 50 and cfg.sampling.eta == 1.0 and cfg.sampling.guidance_scale == 5.0
    assert cfg.model.timestep_fraction == 0.1 and cfg.model.lora.rank == 8
    assert cfg.model.flow_block_widths == [64, 128, 256, 256] and cfg.model.reward_adaptive_mode == "squared"
    assert cfg.training.learning_rate == 1e-3 and cfg.training.flow_weight_decay == 1e-2
    assert cfg.training.max_grad_norm == 1.0 and not cfg.training.on_policy


def test_official_override_spelling():
    cfg = load_config("tiny_cpu", ["--config.model.reward_scale=1e4", "config.sampling.low_var_subsampling=False",
                                   "--seed=3", "--exp_name=abc", "model.no_flow=true"])
    assert cfg.model.reward_scale == 1e4 and cfg.sampling.low_var_subsampling is False
    assert cfg.seed == 3 and cfg.logging.run_name == "abc" and cfg.model.no_flow


BAD = [
    (["sampling.batch_size=0"], "sampling.batch_size=0"),
    (["training.batch_size=-2"], "training.batch_size=-2"),
    (["training.gradient_accumulation_steps=0"], "gradient_accumulation_steps=0"),
    (["model.timestep_fraction=0"], "timestep_fraction=0"),
    (["model.timestep_fraction=1.5"], "timestep_fraction=1.5"),
    (["model.pretrained_strength=2"], "pretrained_strength=2"),
    (["sampling.scheduler=euler"], "sampling.scheduler='euler'"),
    (["reward.name=clipscor"], "reward.name='clipscor'"),
    (["pretrained.model=/does/not/exist"], "no such directory"),
    (["training.batch_size=3"], "does not divide the 8 trajectories"),
    (["training.gradient_accumulation_steps=3"], "does not divide the 4 training batches"),
    (["model.timestep_fraction=0.3"], "divisible by the number of blocks K=3"),
    (["training.optimizer=sgd"], "training.optimizer='sgd'"),
    (["memory.mode=fast"], "memory.mode='fast'"),
    (["prompts.set=/no/such/file.txt"], "prompts.set"),
    (["training.optimizer=adamw8bit", "distributed.backend=deepspeed"], "cannot be partitioned"),
    (["sampling.eta=0"], "sampling.eta=0"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_value_has_one_clear_error(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny_cpu", overrides))
    msg = str(err.value)
    assert needle in msg
    assert msg.count("\n  - ") == 1, msg  # exactly one problem reported


def test_unknown_key_and_bad_type_are_clear():
    with pytest.raises(ConfigError, match="reward_scal"):
        load_config("tiny_cpu", ["model.reward_scal=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config("tiny_cpu", ["sampling.batch_size=many"])
    with pytest.raises(ConfigError, match="not found; available"):
        load_config("no_such_preset")


def test_cli_reports_errors_before_building_models(capsys):
    from lowmem_nablagfn.cli import main

    assert main(["train", "--preset", "tiny_cpu", "model.timestep_fraction=0.3"]) == 2
    assert "K=3" in capsys.readouterr().err


def test_presets_and_data_ship_inside_the_package():
    """A non-editable install must find the presets, the planner profiles and the prompt sets: the
    presets' source is the top-level ``configs/`` (setup.py installs it as ``lowmem_nablagfn/configs/``),
    the rest lives in the package directory, and pyproject's package-data names them all
    (test_install.py builds the wheel and uses it)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import lowmem_nablagfn
    from lowmem_nablagfn.config import PRESET_DIR, list_presets

    pkg = Path(lowmem_nablagfn.__file__).resolve().parent
    assert PRESET_DIR == pkg.parent / "configs" and "tiny_cpu" in list_presets()
    package_data = tomllib.loads((pkg.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert package_data["lowmem_nablagfn.configs"] == ["*.yaml"]
    assert 'package_dir={"lowmem_nablagfn.configs": "configs"}' in (pkg.parent / "setup.py").read_text()
    patterns = package_data["lowmem_nablagfn"]
    data = [p for p in pkg.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".csv", ".txt")
            and "__pycache__" not in p.parts]
    assert data
    for p in data:
        rel = p.relative_to(pkg).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), f"{rel} is not package data"
