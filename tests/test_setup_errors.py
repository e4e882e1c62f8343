"""Set-up errors reach the user as one line and exit 2, before any model weight is loaded where the
configuration alone can tell (issue #23, item 5); a run name is a name, and ``--overwrite`` deletes
only a run's own outputs, and only once set-up has succeeded (5a); single-file v-prediction markers
and ``config`` without the model (6).

The CLI runs in-process; ``loop.load_run_parts`` is replaced by a failure wherever the error must come
before any weight is loaded.
"""
import json
from pathlib import Path

import pytest
import torch
from helpers import SMALL

from lowmem_nablagfn import cli
from lowmem_nablagfn import loop as L
from lowmem_nablagfn.config import ConfigError, load_config, to_dict, validate

TRAIN = ["train", "--preset", "tiny_cpu", "--quiet", *SMALL, "training.num_epochs=1"]


def _train(tmp_path: Path, *extra, name: str = "run") -> list:
    return TRAIN + [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", *extra]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if set-up gets as far as loading a model."""
    monkeypatch.setattr(L, "load_run_parts", lambda *a, **k: pytest.fail("a model was loaded"))


def _refused(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("lowmem-nablagfn:")]
    assert lines, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ----------------------------------------------------------------------------- item 5: set-up errors


def _save_lora_file(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    return path


def test_lora_file_as_model_is_refused_before_loading(tmp_path, capsys, no_model):
    lora = _save_lora_file(tmp_path / "style.safetensors")
    assert cli.main(_train(tmp_path, f"pretrained.model={lora}")) == 2
    _refused(capsys, "a LoRA, not a model", str(lora))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("xformers") is not None,
                    reason="xformers is installed here")
def test_xformers_without_the_package_is_refused_before_loading(tmp_path, capsys, no_model):
    assert cli.main(_train(tmp_path, "memory.attention=xformers")) == 2
    _refused(capsys, "memory.attention=xformers needs the xformers package", "memory.attention=sdpa")


def test_xformers_on_the_cpu_is_refused_before_loading(tmp_path, capsys, no_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else real(name, *a))
    assert cli.main(_train(tmp_path, "memory.attention=xformers", "device=cpu")) == 2
    _refused(capsys, "runs on CUDA only")


def test_unknown_lora_target_is_refused_before_loading(tmp_path, capsys, no_model):
    assert cli.main(_train(tmp_path, "model.lora.target_modules=[to_q,nonexistent]")) == 2
    err = _refused(capsys, "model.lora.target_modules", "no module of the UNet matches 'nonexistent';")
    assert "'to_q'" not in err.split("matches")[1]  # only the bad entry is named


def test_lora_target_of_an_unsupported_layer_type_is_refused(tmp_path, capsys):
    """peft refuses a norm layer only when it builds the adapter: the project's message, exit 2."""
    assert cli.main(_train(tmp_path, "model.lora.target_modules=[norm1]")) == 2
    _refused(capsys, "model.lora.target_modules", "norm1", "not supported")


def test_flow_widths_groupnorm_cannot_divide_are_refused_by_validation(tmp_path, capsys, no_model):
    assert cli.main(_train(tmp_path, "model.flow_block_widths=[40,64]")) == 2
    _refused(capsys, "model.flow_block_widths=[40, 64]", "32")


@pytest.mark.parametrize("widths", [[8, 16], [16, 24], [24, 48], [32, 40], [40, 64], [48, 16], [64, 96]])
def test_flow_width_rule_is_what_the_model_builds(widths):
    """validate() accepts exactly the block widths the flow model can be built and run with."""
    from lowmem_nablagfn.models import build_flow_model

    accepted = True
    try:
        validate(load_config("tiny_cpu", [f"model.flow_block_widths={widths}"]))
    except ConfigError:
        accepted = False
    try:
        model = build_flow_model(4, 8, 32, widths)
        with torch.no_grad():
            model(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 7, 32))
        builds = True
    except (ValueError, RuntimeError):
        builds = False
    assert accepted == builds, (widths, accepted, builds)


def test_empty_model_directory_is_refused_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "empty").mkdir()
    assert cli.main(_train(tmp_path, f"pretrained.model={tmp_path / 'empty'}")) == 2
    _refused(capsys, f"pretrained.model={str(tmp_path / 'empty')!r}", "model_index.json")


def test_any_setup_failure_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("the weights are damaged\nsecond line of detail")

    monkeypatch.setattr(L, "load_run_parts", broken)
    assert cli.main(_train(tmp_path)) == 2
    err = _refused(capsys, "set-up failed", "RuntimeError: the weights are damaged", f"{cli.TRACEBACK_ENV}=1")
    assert "second line" not in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")  # asked for: the original exception, whole
    assert cli.main(_train(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "second line of detail" in err and "in broken" in err, err


def _fake_run(run: Path, cfg) -> dict:
    """A run directory as train() leaves it: config.json, a checkpoint, metrics, a LoRA."""
    (run / "checkpoints" / "epoch-000000").mkdir(parents=True)
    (run / "checkpoints" / "epoch-000000" / "weights").write_text("w")
    (run / "lora").mkdir()
    (run / "lora" / "pytorch_lora_weights.safetensors").write_text("lora")
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_overwrite_deletes_nothing_when_setup_fails(tmp_path, capsys, monkeypatch):
    cfg = load_config("tiny_cpu", SMALL + [f"logging.output_dir={tmp_path}", "logging.run_name=run"])
    before = _fake_run(tmp_path / "run", cfg)
    monkeypatch.setattr(L, "load_run_parts", lambda *a, **k: (_ for _ in ()).throw(OSError("disk on fire")))
    assert cli.main(_train(tmp_path, "--overwrite")) == 2
    _refused(capsys, "set-up failed", "disk on fire")
    after = {str(p.relative_to(tmp_path / "run")): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before


# ----------------------------------------------------------------------------- item 5a: run names


@pytest.mark.parametrize("command", ["train", "config", "profile"])
@pytest.mark.parametrize("name", ["../../elsewhere", "ABS", "a/b", "..", ".", ""])
def test_run_name_must_be_a_name(command, name, tmp_path, capsys, no_model):
    out = tmp_path / "deep" / "runs"
    out.mkdir(parents=True)
    if name == "ABS":
        name = str(tmp_path / "abs_target")
    args = [command, "--preset", "tiny_cpu", *SMALL, f"logging.output_dir={out}", f"logging.run_name={name}"]
    assert cli.main(args) == 2
    _refused(capsys, "logging.run_name=")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "runs"]  # nothing written anywhere


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, no_model):
    """--overwrite into someone's directory that happens to hold samples/ and a config.json."""
    home = tmp_path / "home"
    (home / "samples").mkdir(parents=True)
    (home / "samples" / "holiday.png").write_bytes(b"png")
    (home / "config.json").write_text('{"editor": "vim"}')
    (home / "metrics.jsonl").write_text("my notes\n")
    assert cli.main(_train(tmp_path, "--overwrite", name="home")) == 2
    _refused(capsys, "--overwrite", "not a lowmem-nablagfn run", "samples")
    assert (home / "samples" / "holiday.png").read_bytes() == b"png"
    assert (home / "config.json").read_text() == '{"editor": "vim"}'
    assert (home / "metrics.jsonl").read_text() == "my notes\n"


def test_overwrite_still_starts_a_run_afresh(tmp_path):
    """The run marker (config.json of a run) lets --overwrite delete the run's outputs."""
    from lowmem_nablagfn import checkpoint as ckpt

    cfg = load_config("tiny_cpu", SMALL + [f"logging.output_dir={tmp_path}", "logging.run_name=run",
                                           "logging.overwrite=true"])
    _fake_run(tmp_path / "run", cfg)
    plan = ckpt.decide_start(cfg)
    ckpt.start_run(plan, cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "lora").exists()


# ----------------------------------------------------------------------------- item 6


@pytest.fixture(scope="module")
def vpred_file(tmp_path_factory):
    from test_sdxl import save_single_file

    from lowmem_nablagfn.models import build_random_sd

    root = tmp_path_factory.mktemp("vpred")
    path = save_single_file(build_random_sd("tiny-sdxl", seed=0), root / "xl_vpred.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["v_pred"] = torch.tensor([])  # the marker ComfyUI writes into v-prediction SDXL files
    save_file(state, str(path))
    return path


def test_single_file_v_pred_marker_is_honoured(vpred_file, tmp_path):
    from lowmem_nablagfn.diffusion import make_schedule
    from lowmem_nablagfn.models import identify, load_sd

    assert identify(vpred_file).scheduler_config["prediction_type"] == "v_prediction"
    parts = load_sd(str(vpred_file))
    assert parts.scheduler_config["prediction_type"] == "v_prediction"
    assert make_schedule("ddim", 5, 1.0, parts.scheduler_config).prediction_type == "v_prediction"


@pytest.mark.parametrize("marker", ["ztsnr", "edm_vpred.sigma_max", "edm_mean"])
def test_single_file_markers_the_trainer_cannot_honour_are_refused(marker, vpred_file, tmp_path, capsys, no_model):
    from safetensors.torch import load_file, save_file

    state = load_file(str(vpred_file))
    state[marker] = torch.tensor([])
    path = tmp_path / "marked.safetensors"
    save_file(state, str(path))
    assert cli.main(_train(tmp_path, f"pretrained.model={path}")) == 2
    _refused(capsys, marker, "not supported")


def test_config_prints_a_preset_whose_model_is_not_cached(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["config", "--preset", "sd15_a100x8"]) == 0
    captured = capsys.readouterr()
    assert "stable-diffusion-v1-5" in captured.out and captured.err == ""
    # train still checks the cache, before any model is built
    assert cli.main(["train", "--preset", "sd15_a100x8", "device=cpu"]) == 2
    assert "not in the local hub cache" in capsys.readouterr().err


def test_eval_and_profile_setup_failures_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """``eval`` and ``profile`` build models too: what fails there is one line and exit 2, as for train."""
    from lowmem_nablagfn import evaluate

    def broken(*a, **k):
        raise RuntimeError("the weights are damaged\nsecond line of detail")

    cfg = load_config("tiny_cpu", SMALL + [f"logging.output_dir={tmp_path}", "logging.run_name=run"])
    (tmp_path / "run" / "lora").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(to_dict(cfg)))
    (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    monkeypatch.setattr(evaluate, "load_models", broken)
    assert cli.main(["eval", str(tmp_path / "run"), "--quiet", "--num-prompts", "1", "-n", "1"]) == 2
    _refused(capsys, "set-up failed", "RuntimeError: the weights are damaged")
    monkeypatch.setattr(L, "setup", broken)
    assert cli.main(["profile", "--preset", "tiny_cpu", "--updates", "1", *SMALL, f"logging.output_dir={tmp_path}"]) == 2
    _refused(capsys, "set-up failed", "RuntimeError: the weights are damaged")
