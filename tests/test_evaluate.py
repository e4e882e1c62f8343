"""Evaluation on the tiny model: every metric that needs no external weights is computed, the others
are null with a message naming the option; FID and CLIP score run with stand-in models."""
import json

import pytest
import torch
from torch import nn

from lowmem_nablagfn.checkpoint import save_lora
from lowmem_nablagfn.cli import main
from lowmem_nablagfn.config import load_config, to_dict
from lowmem_nablagfn.evaluate import EvalSettings, eval_config, evaluate, format_table
from lowmem_nablagfn.image_metrics import build_fid, mean_pairwise_cosine_distance
from lowmem_nablagfn.targets import resolve_target

FAST = ["sampling.num_steps=4", "model.timestep_fraction=0.25", "sampling.resolution=64", "device=cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train() leaves it (config.json, lora/), with a random non-zero LoRA."""
    from diffusers import UNet2DConditionModel

    from lowmem_nablagfn.models import add_lora, builtin_configs

    run = tmp_path_factory.mktemp("eval") / "run"
    cfg = load_config("tiny_cpu", FAST + [f"logging.output_dir={run.parent}", "logging.run_name=run"])
    unet = UNet2DConditionModel(**builtin_configs("tiny")["unet"])  # the LoRA's names depend only on the UNet's shape
    add_lora(unet, cfg.model.lora.rank, cfg.model.lora.target_modules, "gaussian", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    (run / "lora").mkdir(parents=True)
    save_lora(unet, run / "lora")
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    return run


def test_pairwise_distance_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    # group 0: orthogonal pair -> 1; group 1: identical directions -> 0; group 2: a single image, skipped
    assert mean_pairwise_cosine_distance(e[:4], [0, 0, 1, 1]) == pytest.approx(((1.0) + (1 - 2 ** -0.5)) / 2)
    assert mean_pairwise_cosine_distance(e[3:], [1, 1]) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_cosine_distance(e[:1], [2]) is None


def test_fid_identical_sets_is_zero():
    feature = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())  # 48-d stand-in for Inception
    fid, note = build_fid(None, feature, "cpu")
    images = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(float(fid.compute())) < 1e-3 and "custom module" in note


def test_cli_eval_reports_weight_free_metrics_and_messages(run_dir, capsys):
    args = ["eval", str(run_dir), *FAST, "--num-prompts", "2", "-n", "2", "--batch-size", "4", "--quiet",
            "--save-images", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "FID vs base" in out and "--inception-weights" in out and "--clip" in out
    assert "Reward (builtin:redness, mean ± std): base " in out and "lowmem-nablagfn export" in out  # summary
    result = json.loads((run_dir / "eval" / "eval_lora.json").read_text())
    m = result["metrics"]
    for policy in ("finetuned", "base"):
        assert torch.isfinite(torch.tensor([m["reward"][policy]["mean"], m["reward"][policy]["std"]])).all()
        assert 0 < m["diversity"][policy] < 2
    assert m["reward"]["finetuned"]["mean"] != m["reward"]["base"]["mean"]  # the LoRA was applied
    assert m["diversity"]["method"] == "pixel-cosine" and "--dreamsim-cache" in m["diversity"]["message"]
    assert m["fid_vs_base"]["value"] is None and "--inception-weights" in m["fid_vs_base"]["message"]
    assert m["clip_score"]["finetuned"] is None and "--clip" in m["clip_score"]["message"]
    assert result["prompts"] == {"set": "simple_animals", "split": "eval", "count": 2}
    assert result["sampling"]["num_steps"] == 4
    for name in result["sample_grids"].values():
        assert (run_dir / "eval" / name).stat().st_size > 0
    assert "eval_lora.json" in (run_dir / "report.html").read_text()  # the run's report lists it


def test_evaluate_with_fid_features_and_clip(run_dir, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16))
    clip.save_pretrained(str(tmp_path / "clip"))
    target = resolve_target(str(run_dir / "lora"))
    cfg = eval_config(target, None, FAST)
    settings = EvalSettings(images_per_prompt=2, num_prompts=2, batch_size=4, quiet=True, save_images=0,
                            clip=str(tmp_path / "clip"))
    feature = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())  # 12-d: full-rank covariances from 4 images
    result = evaluate(target, cfg, settings, fid_feature=feature)
    m = result["metrics"]
    assert m["fid_vs_base"]["value"] is not None and m["fid_vs_base"]["value"] > 0
    assert 0 <= m["clip_score"]["finetuned"] <= 100 and 0 <= m["clip_score"]["base"] <= 100
    assert "CLIP score" in format_table(result)
