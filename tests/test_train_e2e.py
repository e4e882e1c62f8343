"""End to end on the tiny model: the real CLI, reward rising, LoRA reload, resume, no-flow, step count."""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import small_config

from lowmem_nablagfn import loop as L
from lowmem_nablagfn import trainer as T


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "lowmem_nablagfn.cli", "train", "--preset", "tiny_cpu", "--quiet",
           f"logging.output_dir={out}", "logging.save_every=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "terminal.json").write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))
    return out / "tiny_cpu"


def test_cli_run_leaves_artefacts(cli_run):
    assert (cli_run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (cli_run / "samples" / "final.png").is_file()
    assert (cli_run / "checkpoints" / "latest").is_file()
    assert any((cli_run / "tensorboard").iterdir())
    assert not list((cli_run / "checkpoints").glob(".tmp-*"))


def test_builtin_reward_rises(cli_run):
    """The default job's point: the reward rises clearly (not noisily) and the samples show it."""
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads((cli_run / "config.json").read_text())
    epochs = cfg["training"]["num_epochs"]
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == epochs + 1  # epoch -1 (sampling only) + the epochs
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    spread = max(r["reward/std"] for r in rows)
    assert last > first + 0.15 and last - first > 3 * spread, rewards  # far beyond one epoch's spread
    half = sum(rewards[len(rewards) // 2 - 1:len(rewards) // 2 + 2]) / 3
    assert first < half < last, rewards  # rising through the run, not one lucky epoch
    s, t = cfg["sampling"], cfg["training"]
    per_epoch = s["batch_size"] * s["num_batches_per_epoch"] // (t["batch_size"] * t["gradient_accumulation_steps"])
    assert rows[-1]["optimizer_steps"] == epochs * per_epoch


def _redness(png):
    from PIL import Image

    img = Image.open(png).convert("RGB")
    r, g, b = (torch.tensor(list(c.getdata()), dtype=torch.float32) / 255 for c in img.split())
    return float((r - (g + b) / 2).mean())


def test_sample_grids_turn_visibly_redder(cli_run):
    before, after = _redness(cli_run / "samples" / "epoch_0000.png"), _redness(cli_run / "samples" / "final.png")
    assert after > before + 0.3, (before, after)  # cool to red (the grid's black padding counts too)
    from PIL import Image

    assert min(Image.open(cli_run / "samples" / "final.png").size) >= 256  # 2x2 of >= 128 px: can be looked at
    page = (cli_run / "report.html").read_text()
    assert "Before and after" in page and "samples/epoch_0000.png" in page and "samples/final.png" in page


def test_terminal_shows_only_the_summary(cli_run):
    """Quiet start (no optional-dependency warnings) and an end-of-run summary that says what next."""
    term = json.loads((cli_run.parent / "terminal.json").read_text())
    assert term["stderr"].strip() == "", term["stderr"][-3000:]
    out = term["stdout"]
    epochs = json.loads((cli_run / "config.json").read_text())["training"]["num_epochs"]
    for needle in (f"Finished {epochs} epochs", "Reward (builtin:redness", "→", "peak memory", "/lora/", "report.html",
                   "checkpoints/epoch-", "lowmem-nablagfn eval", "lowmem-nablagfn export", "lowmem-nablagfn report"):
        assert needle in out, (needle, out)


def test_lora_reloads_in_pipeline_and_reproduces_sample(cli_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from lowmem_nablagfn.models import build_random_sd, save_sd

    save_sd(build_random_sd("tiny", seed=0), tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"), safety_checker=None)
    pipe.load_lora_weights(str(cli_run / "lora"))
    ref = T.load_final_sample(cli_run / "samples" / T.FINAL_SAMPLE)
    out = pipe(ref["prompts"], num_inference_steps=10, guidance_scale=5.0, eta=1.0, height=64, width=64,
               generator=torch.Generator().manual_seed(ref["seed"]), output_type="latent").images
    assert torch.allclose(out, ref["latents"], atol=1e-4, rtol=1e-4), (out - ref["latents"]).abs().max()
    # and the base model (adapter off) gives a different sample: the LoRA did something
    pipe.unload_lora_weights()
    base = pipe(ref["prompts"], num_inference_steps=10, guidance_scale=5.0, eta=1.0, height=64, width=64,
                generator=torch.Generator().manual_seed(ref["seed"]), output_type="latent").images
    assert not torch.allclose(base, ref["latents"], atol=1e-3)


def _final_state(run_dir):
    from safetensors.torch import load_file

    lora = load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))
    ckpt = sorted((run_dir / "checkpoints").glob("epoch-*"))[-1]
    flow = load_file(str(ckpt / "flow_model" / "diffusion_pytorch_model.safetensors"))
    return lora, flow


def test_resume_after_interruption_ends_where_uninterrupted_ends(tmp_path):
    cfg = small_config(tmp_path, "training.num_epochs=3", name="whole")
    whole = T.train(cfg)
    cfg = small_config(tmp_path, "training.num_epochs=3", name="cut")
    T.train(cfg, stop_after_epoch=0)  # "interrupted" after epoch 0's checkpoint
    assert (tmp_path / "cut" / "checkpoints" / "epoch-000000").is_dir()
    cut = T.train(cfg, resume="auto")
    (lora_a, flow_a), (lora_b, flow_b) = _final_state(whole), _final_state(cut)
    assert lora_a.keys() == lora_b.keys()
    for k in lora_a:
        assert torch.allclose(lora_a[k], lora_b[k], atol=1e-6), k
    for k in flow_a:
        assert torch.allclose(flow_a[k], flow_b[k], atol=1e-6), k


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("when", ["after_checkpoint", "during_checkpoint_write"])
def test_kill_9_then_resume_ends_bitwise_where_the_uninterrupted_run_ends(cli_run, tmp_path, when):
    """SIGKILL the real CLI (right after a checkpoint, i.e. in the next epoch's sampling/training; or
    while a checkpoint is being written), then ``--resume``: the final LoRA and sample are bit-identical
    to the uninterrupted run's (``cli_run``, same command), and no temporary directory is left."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "lowmem_nablagfn.cli", "train", "--preset", "tiny_cpu", "--quiet",
           f"logging.output_dir={tmp_path}", "logging.save_every=4"]
    ckpts = tmp_path / "tiny_cpu" / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed, deadline = False, time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if when == "after_checkpoint":
            hit = (ckpts / "epoch-000003" / "manifest.json").is_file()
        else:  # the second checkpoint's temporary directory exists: the write is under way
            hit = ckpts.is_dir() and any(ckpts.glob(".tmp-epoch-000007*"))
        if hit:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    if not killed:
        pytest.skip(f"the run finished before the kill point '{when}' was seen (a too-fast write)")
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "tiny_cpu" / "lora").exists()  # really cut short
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "tiny_cpu"
    for name in ("lora/pytorch_lora_weights.safetensors", f"samples/{T.FINAL_SAMPLE}"):
        a, b = _tensors(cli_run / name), _tensors(run / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert not list(ckpts.glob(".tmp-*"))
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # no duplicated epoch line after the resume


def test_resume_with_missing_path_is_clear(tmp_path):
    from lowmem_nablagfn.checkpoint import RunError, decide_start

    with pytest.raises(RunError, match="neither a checkpoint directory"):
        decide_start(small_config(tmp_path), str(tmp_path / "nope"))


def test_no_flow_mode_creates_no_flow_model(tmp_path):
    cfg = small_config(tmp_path, "model.no_flow=true", "training.num_epochs=1")
    c = L.setup(cfg)
    assert c.flow_model is None and len(c.optimizer.param_groups) == 1
    run = T.train(cfg)
    ckpt = sorted((run / "checkpoints").glob("epoch-*"))[-1]
    assert not (ckpt / "flow_model").exists()


def test_exactly_one_optimizer_step_per_update(tmp_path):
    cfg = small_config(tmp_path, "sampling.batch_size=8", "training.batch_size=2",
                       "training.gradient_accumulation_steps=2")
    c = L.setup(cfg)
    calls = []
    c.optimizer.register_step_post_hook(lambda *a: calls.append(1))
    data = L.sample_epoch(c, 0)
    L.train_epoch(c, data, 0)
    assert len(calls) == 8 // (2 * 2)
