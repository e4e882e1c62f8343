"""SD 3.x through the whole loop (issue #26): ``train --preset tiny_cpu pretrained.model=tiny-sd3``
(the sampler follows the family: flow-sde; shortened: 8 epochs, 16 T5 tokens) trains and the reward rises, with the
prompts encoded once into the cache; the LoRA file is the transformer's, ``eval``'s loader reproduces the
run's final sample from it, and ``--resume`` continues from a checkpoint; a sampler that does not fit the
model's family is refused in one line before any model loads."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lowmem_nablagfn import cli
from lowmem_nablagfn import loop as L
from lowmem_nablagfn import trainer as T
from lowmem_nablagfn.config import ConfigError, LoraConfig, load_config, validate
from lowmem_nablagfn.models.family import SD3Family, UNetFamily, lora_targets
from lowmem_nablagfn.models.sd3_lora import SD3_LORA_TARGETS

SD3 = ["pretrained.model=tiny-sd3"]  # the command: the sampler follows the family (flow-sde)
SHORT = ["training.num_epochs=8", "pretrained.max_sequence_length=16"]


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", XDG_CACHE_HOME=str(out / "cache"))
    cmd = [sys.executable, "-m", "lowmem_nablagfn.cli", "train", "--preset", "tiny_cpu", *SD3, *SHORT, "--quiet",
           f"logging.output_dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]  # a quiet start, as the UNet's
    return out / "tiny_cpu"


@pytest.fixture
def cache(sd3_run, monkeypatch):
    """The run's prompt-embedding cache (and nothing written to the real home)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(sd3_run.parent / "cache"))
    return sd3_run.parent / "cache" / "lowmem-nablagfn" / "prompt-embeddings"


def test_reward_rises_and_prompts_are_encoded_once(sd3_run, cache):
    rows = [json.loads(line) for line in (sd3_run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == 8 + 1  # epoch -1 (sampling only) + the epochs
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    spread = max(r["reward/std"] for r in rows)
    assert last > first + 0.15 and last - first > 3 * spread, rewards
    assert rows[-1]["optimizer_steps"] == 8 * 4  # 8 trajectories / batch 2 per epoch
    assert len(list(cache.glob("tiny-sd3-simple_animals-*.safetensors"))) == 1, list(cache.iterdir())
    cfg = json.loads((sd3_run / "config.json").read_text())
    assert cfg["pretrained"]["model"] == "tiny-sd3" and cfg["sampling"]["scheduler"] == "flow-sde"


def test_lora_is_the_transformers_and_eval_reproduces_the_final_sample(sd3_run, cache):
    """The final LoRA names the transformer's joint attention (diffusers' SD 3 file); ``eval``'s loader
    attaches it and, at the run's seed and prompts, samples the run's final latents; the base model
    (adapter off) samples others."""
    from safetensors.torch import load_file

    from lowmem_nablagfn.evaluate import load_models
    from lowmem_nablagfn.sampling import sample
    from lowmem_nablagfn.update import policy_eps_fn

    lora = load_file(str(sd3_run / "lora" / "pytorch_lora_weights.safetensors"))
    modules = {k.split(".lora_")[0].split(".attn.")[1] for k in lora}
    assert all(k.startswith("transformer.transformer_blocks.") for k in lora)
    assert modules == {t.split(".", 1)[1] for t in SD3_LORA_TARGETS}, modules

    cfg = load_config(str(sd3_run / "config.json"))
    m = load_models(cfg, sd3_run / "lora" / "pytorch_lora_weights.safetensors")
    ref = T.load_final_sample(sd3_run / "samples" / T.FINAL_SAMPLE)
    n = len(ref["prompts"])

    def final(policy: str):
        with torch.no_grad(), m.policy(policy):
            eps = policy_eps_fn(m.parts.denoiser, m.uncond, cfg.sampling.guidance_scale, m.sched)
            return sample(eps, m.sched, m.parts.encode(ref["prompts"], m.device), m.latent_shape,
                          torch.Generator().manual_seed(ref["seed"]), keep=torch.zeros(n, 0, dtype=torch.long),
                          device=m.device).final_latents

    assert m.parts.text_encoders == []  # the prompts came from the cache
    torch.testing.assert_close(final("finetuned"), ref["latents"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(final("base"), ref["latents"], atol=1e-2)


def test_resume_continues_from_the_checkpoint(sd3_run, cache, tmp_path):
    """``--resume`` loads the transformer's LoRA, the flow model and the optimiser from the last checkpoint
    and trains one more epoch (a longer run: only training.num_epochs changed)."""
    run = tmp_path / "tiny_cpu"
    shutil.copytree(sd3_run, run)
    cfg = load_config(str(run / "config.json"), [f"logging.output_dir={tmp_path}", "training.num_epochs=9"])
    T.train(cfg, resume="auto")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(-1, 9))
    assert rows[-1]["optimizer_steps"] == 9 * 4
    assert rows[-1]["reward/mean"] > rows[0]["reward/mean"] + 0.15  # it went on from the trained LoRA
    assert (run / "checkpoints" / "epoch-000008").is_dir()


# ----------------------------------------------------------------------------- configuration

def test_a_sampler_outside_the_family_is_refused_before_any_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(L, "load_run_parts", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["train", "--preset", "tiny_cpu", "--quiet", "pretrained.model=tiny-sd3", "sampling.scheduler=ddim",
                     f"logging.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "takes sampling.scheduler=flow-sde" in err, err
    with pytest.raises(ConfigError, match="flow-sde is for SD 3.x; use sampling.scheduler=ddim"):
        validate(load_config("tiny_cpu", ["sampling.scheduler=flow-sde"]))
    # unset, the sampler is the family's (an explicit one is kept, and checked above)
    assert load_config("tiny_cpu", ["pretrained.model=tiny-sd3"]).sampling.scheduler == "flow-sde"
    assert load_config("tiny_cpu").sampling.scheduler == "ddim"
    assert load_config("sdxl_rtx4090", ["pretrained.model=tiny-sd3"]).sampling.scheduler == "flow-sde"
    assert load_config("sdxl_a100x8", ["pretrained.model=tiny-sd3"]).sampling.scheduler == "ddim"  # the preset's
    with pytest.raises(ConfigError, match="pretrained.t5 / pretrained.max_sequence_length"):
        validate(load_config("tiny_cpu", ["pretrained.t5=false"]))


def test_an_sd3_directory_is_checked_for_its_transformer(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ConfigError, match="lacks transformer/config.json, vae/config.json") as info:
        validate(load_config("tiny_cpu", [*SD3, f"pretrained.model={tmp_path}"]))
    assert "unet/" not in str(info.value)


def test_lora_targets_follow_the_family():
    default = LoraConfig().target_modules
    assert tuple(default) == UNetFamily.lora_targets == tuple(lora_targets(UNetFamily, default))
    assert lora_targets(SD3Family, default) == list(SD3_LORA_TARGETS)  # the default stands for the family's
    assert lora_targets(SD3Family, ["attn.to_q", "ff.net.2"]) == ["attn.to_q", "ff.net.2"]  # a choice is kept


def test_fp16_trains_with_loss_scaling(tmp_path, monkeypatch):
    """SD 3 under ``training.mixed_precision=fp16``: transformer, VAE and prompt table in fp16, the loss scaled
    per pass.  The flow-SDE's last step has 1/std² ≈ 2.5e4 (docs/algorithm.md), so the training pass's scale
    falls well below fp16's default 65536 (retries, not skipped updates), and the update stays finite."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.main(["train", "--preset", "tiny_cpu", "--quiet", *SD3, "training.mixed_precision=fp16",
                     "training.num_epochs=1", "pretrained.max_sequence_length=8", f"logging.output_dir={tmp_path}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tiny_cpu" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["optimizer_steps"] == 4 and last["train/skipped_updates"] == 0
    assert last["train/loss_scale"] < 65536 and last["train/scale_retries"] > 0
    assert all(torch.isfinite(torch.tensor(r["reward/mean"])) for r in rows)
