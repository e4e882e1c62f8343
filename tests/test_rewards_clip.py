"""PickScore and CLIPScore against their reference implementations, offline, on random weights.

References: PickScore — the model card's code (transformers ``CLIPModel`` + ``CLIPProcessor`` on PIL
images, ``logit_scale.exp() * cos``); CLIPScore — torchmetrics' ``CLIPScore`` (its ``max(mean(100 *
cos), 0)``).  Both processors are built locally (``CLIPImageProcessor`` with the hub repos' settings,
the project's offline CLIP tokenizer).  The reduced models run always; the full-size ones (ViT-H/14
986 M and ViT-L/14 428 M parameters) are ``slow``, one model alive at a time.  The memory knobs
(activation checkpointing, bf16 storage), the saved-folder round trip through the real loading path,
``HF_HUB_OFFLINE``, the meta-device build of the planner and a tiny training run from the CLI.
"""
from __future__ import annotations

import gc
import json
import time

import numpy as np
import pytest
import torch

from lowmem_nablagfn.config import ConfigError, RewardConfig, load_config, validate
from lowmem_nablagfn.rewards import build_reward, clipscore, pickscore
from lowmem_nablagfn.rewards.loading import MissingCheckpointError

from helpers import SMALL
from test_rewards import graph_bytes, score_and_grad

NAMES = ["pickscore", "clipscore"]
MODULES = {"pickscore": pickscore, "clipscore": clipscore}
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk, highly detailed, trending on artstation"]


def uint8_images(batch=2, h=224, w=224, seed=0):
    """(B, 3, h, w) uint8: what both references read (PIL images / torchmetrics' 0-255 tensors)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)


def processor(name, pil=False):
    """The reference processor: the hub repo's image settings (laion/CLIP-ViT-H-14-laion2B-s32B-b79K and
    openai/clip-vit-large-patch14 have the same ones) and the offline CLIP tokenizer.  ``pil``: the
    PIL backend (transformers 5's default CLIPImageProcessor resizes with torchvision)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from lowmem_nablagfn.tokenizer import clip_tokenizer

    settings = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                    do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
    if pil:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    else:
        cls = CLIPImageProcessor
    return CLIPProcessor(image_processor=cls(**settings), tokenizer=clip_tokenizer())


@torch.no_grad()
def pickscore_reference(model, proc, images_u8, prompts):
    """The PickScore model card's ``calc_probs`` up to the softmax, one score per (image, prompt) pair
    (transformers 5: ``get_*_features`` return an output whose ``pooler_output`` is the projection)."""
    from PIL import Image

    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images_u8]
    image_inputs = proc(images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = proc(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    image_embs = model.get_image_features(**image_inputs).pooler_output
    image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
    text_embs = model.get_text_features(**text_inputs).pooler_output
    text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
    return (model.logit_scale.exp() * (text_embs @ image_embs.T)).diagonal()


class Transformers4Outputs(torch.nn.Module):
    """``get_*_features`` returning tensors, as torchmetrics 1.9 expects: with transformers 5 its
    CLIPScore fails ('BaseModelOutputWithPooling' object has no attribute 'norm'; torchmetrics #3407,
    fixed upstream by unwrapping ``pooler_output`` exactly so).  The math is CLIPModel's."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


@torch.no_grad()
def clipscore_reference(model, proc, images_u8, prompts):
    """torchmetrics' CLIPScore: per pair (a batch of one: ``max(100 cos, 0)``) and of the batch
    (``max(mean(100 cos), 0)``)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (Transformers4Outputs(model), proc))
    pairs = torch.stack([metric(x, p) for x, p in zip(images_u8, prompts)])
    metric.reset()
    return pairs, metric(images_u8, list(prompts))


def ours(reward, images_u8, prompts):
    with torch.no_grad():
        return reward(images_u8.float() / 255, prompts)


def compare(name, clip, images_u8, prompts=PROMPTS, pil=False):
    """(ours, reference) for the same weights; the reference runs first, before the reward wraps them."""
    module = MODULES[name]
    proc = processor(name, pil)
    if name == "pickscore":
        ref = pickscore_reference(clip, proc, images_u8, prompts)
        got = ours(module.wrap(clip), images_u8, prompts)
        return got, ref
    pairs, batch = clipscore_reference(clip, proc, images_u8, prompts)
    got = ours(module.wrap(clip), images_u8, prompts)
    # each pair (a batch of one: max(100 cos, 0)), then the batch (max(mean(100 cos), 0))
    return torch.cat([got.clamp_min(0), got.mean().clamp_min(0)[None]]), torch.cat([pairs, batch[None]])


def differences(got, ref):
    diff = (got - ref).abs().max().item()
    return diff, diff / ref.abs().max().item()


# ----------------------------------------------------------------------------- reference equality
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pil", [False, True], ids=["torchvision", "pil"])
def test_equals_reference_reduced(name, pil, capsys):
    clip = MODULES[name].random_clip("reduced")
    got, ref = compare(name, clip, uint8_images(2), pil=pil)
    with capsys.disabled():
        print(f"\n[{name} reduced, 224 px, {'PIL' if pil else 'torchvision'} processor] max abs diff "
              f"{differences(got, ref)[0]:.2e}, rel {differences(got, ref)[1]:.2e}, scores {got.tolist()}")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_resize_against_the_processors(name, capsys):
    """Larger, non-square images: the processors resize 8-bit images (rounding to 0-255 after the resize,
    torchvision also in between), ours resizes in float (differentiable): close, not equal."""
    clip = MODULES[name].random_clip("reduced")
    x = uint8_images(2, 300, 410, seed=1)
    for pil in (False, True):
        got, ref = compare(name, clip, x, pil=pil)
        diff, rel = differences(got, ref)
        with capsys.disabled():
            print(f"\n[{name} reduced, 300x410 px, {'PIL' if pil else 'torchvision'} processor] "
                  f"max abs diff {diff:.2e}, rel {rel:.2e}")
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_equals_reference_full_size_and_round_trip(name, tmp_path, capsys):
    """The real architecture (random weights, ``reward.checkpoint=random``), then the same weights saved
    as a CLIPModel folder and loaded through the real path offline; one model alive at a time."""
    module = MODULES[name]
    clip = module.random_clip("full")
    millions = round(sum(p.numel() for p in clip.parameters()) / 1e6, 1)
    assert millions == {"pickscore": 986.1, "clipscore": 427.6}[name]
    x = uint8_images(2, seed=2)
    start = time.perf_counter()
    got, ref = compare(name, clip, x)
    diff, rel = differences(got, ref)
    with capsys.disabled():
        print(f"\n[{name} full size, 224 px] max abs diff {diff:.2e}, rel {rel:.2e}, scores {got.tolist()} "
              f"({time.perf_counter() - start:.0f} s)")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    clip.save_pretrained(tmp_path / "model")
    del clip
    gc.collect()
    loaded = build_reward(RewardConfig(name=name, backbone=str(tmp_path / "model")))
    back = ours(loaded, x, PROMPTS)
    want = got if name == "pickscore" else got[:-1]  # CLIPScore: the pairs, without the batch value
    torch.testing.assert_close(back if name == "pickscore" else back.clamp_min(0), want, rtol=1e-5, atol=1e-5)


def test_random_full_size_matches_the_random_build():
    """``reward.checkpoint=random`` builds exactly ``random_clip("full")`` (what the slow test compares),
    here on the meta device: the planner's build, exact parameter counts, no memory."""
    for name, millions in (("pickscore", 986.1), ("clipscore", 427.6)):
        with torch.device("meta"):
            r = build_reward(RewardConfig(name=name, checkpoint="random"), "meta")
        assert round(sum(p.numel() for p in r.parameters()) / 1e6, 1) == millions
        assert type(r).__name__ == {"pickscore": "PickScoreReward", "clipscore": "CLIPScoreReward"}[name]
        assert r.text.text_model.config.max_position_embeddings == 77 and r.transform.size == 224


def test_full_size_architectures_are_the_hub_ones():
    """PickScore_v1 is a CLIPModel of open_clip's ViT-H-14 (the HPSv2 architecture); CLIPScore's is
    openai/clip-vit-large-patch14 (ViT-L/14, quick_gelu, the aesthetic reward's image tower)."""
    import open_clip

    with torch.device("meta"):
        h = pickscore.random_clip("full")
        l14 = clipscore.random_clip("full")
        ref_h = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
        ref_l = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(h) == count(ref_h) and count(l14) == count(ref_l)
    assert h.config.vision_config.hidden_act == h.config.text_config.hidden_act == "gelu"
    assert l14.config.vision_config.hidden_act == l14.config.text_config.hidden_act == "quick_gelu"
    from lowmem_nablagfn.rewards import aesthetic

    tower = {k: v for k, v in aesthetic.VISION_CONFIGS["full"].items() if k != "projection_dim"}
    assert {k: getattr(l14.config.vision_config, k) for k in tower} == tower
    assert l14.config.projection_dim == aesthetic.VISION_CONFIGS["full"]["projection_dim"]


# ----------------------------------------------------------------------------- as a reward
@pytest.fixture(scope="module")
def rewards():
    return {name: build_reward(RewardConfig(name=name, checkpoint="random:reduced")) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_pixels_and_scores_are_fp32(rewards, name):
    r = rewards[name]
    x = torch.rand(2, 3, 64, 48)
    s, g = score_and_grad(r, x, PROMPTS)
    assert s.shape == (2,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0 and not r.prompt_free
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        sb = r(x, PROMPTS)
    assert sb.dtype == torch.float32
    torch.testing.assert_close(sb, s, rtol=0, atol=0)  # fp32 math under autocast


@pytest.mark.parametrize("name", NAMES)
def test_text_features_do_not_depend_on_the_batch(rewards, name):
    """Cached per prompt and padded per batch: one prompt at a time gives the batch's scores."""
    fresh = build_reward(RewardConfig(name=name, checkpoint="random:reduced"))
    x = torch.rand(2, 3, 32, 32)
    both = fresh(x, PROMPTS)
    alone = build_reward(RewardConfig(name=name, checkpoint="random:reduced"))
    one = torch.cat([alone(x[i:i + 1], [p]) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(one, both, rtol=1e-5, atol=1e-5)  # padding lengths differ: fp32 noise only


@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing_same_scores_less_graph(name):
    from lowmem_nablagfn.models import set_checkpointing

    r = build_reward(RewardConfig(name=name, checkpoint="random:reduced"))
    x = torch.rand(1, 3, 64, 64)
    s, g = score_and_grad(r, x, PROMPTS[:1])
    kept = graph_bytes(r, x, PROMPTS[:1])
    set_checkpointing(r, True)  # what memory.checkpoint_reward does
    s2, g2 = score_and_grad(r, x, PROMPTS[:1])
    torch.testing.assert_close(s2, s, rtol=0, atol=0)
    torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-8)
    assert graph_bytes(r, x, PROMPTS[:1]) < kept


@pytest.mark.parametrize("name", NAMES)
def test_bf16_storage_is_fp32_math_on_rounded_weights(name):
    bf16 = build_reward(RewardConfig(name=name, checkpoint="random:reduced", weight_dtype="bf16"))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.logit_scale.dtype == torch.float32  # a buffer: never rounded (PickScore's scale)
    rounded = build_reward(RewardConfig(name=name, checkpoint="random:reduced"))
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    x = torch.rand(2, 3, 64, 64)
    s16, g16 = score_and_grad(bf16, x, PROMPTS)
    sr, gr = score_and_grad(rounded, x, PROMPTS)
    torch.testing.assert_close(s16, sr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g16, gr, rtol=1e-4, atol=1e-7 * gr.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_antialias_option_applies(name):
    assert build_reward(RewardConfig(name=name, checkpoint="random:reduced")).transform.antialias
    r = build_reward(RewardConfig(name=name, checkpoint="random:reduced", antialias=False))
    assert not r.transform.antialias and r.transform.fit == "crop" and r.transform.size == 224


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", NAMES)
def test_saved_folder_round_trip_reduced(name, tmp_path):
    clip = MODULES[name].random_clip("reduced")
    x = uint8_images(2, 256, 256, seed=3)
    reward = MODULES[name].wrap(clip)
    want = ours(reward, x, PROMPTS)
    official = reward.official_state_dict()  # a CLIPModel's names, e.g. to save a finetuned copy
    assert official.keys() == clip.state_dict().keys()
    assert all(torch.equal(official[k], v) for k, v in clip.state_dict().items())
    clip.save_pretrained(tmp_path / "model")  # the layout of the hub repo (config.json + model.safetensors)
    loaded = build_reward(RewardConfig(name=name, backbone=str(tmp_path / "model")))
    torch.testing.assert_close(ours(loaded, x, PROMPTS), want, rtol=0, atol=0)
    assert loaded.logit_scale.item() == pytest.approx(clip.logit_scale.item())


@pytest.mark.parametrize("name,hub", [("pickscore", "yuvalkirstain/PickScore_v1"),
                                      ("clipscore", "openai/clip-vit-large-patch14")])
def test_offline_missing_model_is_a_clear_error(name, hub, tmp_path):
    start = time.monotonic()
    with pytest.raises(MissingCheckpointError) as err:
        build_reward(RewardConfig(name=name))
    assert time.monotonic() - start < 10  # HF_HUB_OFFLINE=1 (conftest): the cache only, never a download
    for needle in (hub, "HF_HUB_OFFLINE", "reward.backbone=DIR", f"hf download {hub}"):
        assert needle in str(err.value), (needle, str(err.value))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingCheckpointError, match="config.json"):
        build_reward(RewardConfig(name=name, backbone=str(tmp_path / "empty")))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_key_is_refused_with_the_fix(name):
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny_cpu", [f"reward.name={name}", "reward.checkpoint=/x/model.safetensors"]))
    assert "reward.backbone=DIR" in str(err.value) and str(err.value).count("\n  - ") == 1


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_reward_knob_leaves_the_update_gradients(name, tmp_path, monkeypatch):
    """``memory.checkpoint_reward=true`` through the trainer's set-up: the reward's blocks run under
    ``torch.utils.checkpoint`` and the LoRA and flow gradients of one update are those without it.

    The comparison compares something: every zero-initialised tensor (``lora_B``; the towers' biases
    and norm shifts) is moved away from zero first, and every trainable tensor gets a gradient.  (The
    pixel gradient of the reward alone: ``test_activation_checkpointing_same_scores_less_graph``.)"""
    from lowmem_nablagfn import loop as T
    from lowmem_nablagfn.memory import Rows, accumulate_gradients
    from lowmem_nablagfn.models import set_checkpointing
    from lowmem_nablagfn.rewards import towers

    from helpers import small_config

    torch.set_num_threads(1)
    c = T.setup(small_config(tmp_path, f"reward.name={name}", "reward.checkpoint=random:reduced",
                             "memory.checkpoint_reward=true"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*c.reward_model.parameters(), *(q for ps in c.trainable.values() for q in ps)]:
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    rows = Rows.from_trajectories(T.sample_epoch(c, 0).select(torch.arange(2)), c.sched.num_steps, c.device)
    row_norm, end_norm = rows.norms(c.k + 1)
    calls = []
    inner = towers.checkpoint
    monkeypatch.setattr(towers, "checkpoint", lambda *a, **k: calls.append(1) or inner(*a, **k))

    def grads():
        c.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(T.update_context(c), rows, row_norm=row_norm, end_norm=end_norm, scale=0.5)
        return {n: torch.cat([p.grad.reshape(-1) for p in ps]) for n, ps in c.trainable.items()}

    with_ckpt = grads()
    assert calls, "memory.checkpoint_reward=true did not checkpoint the reward's blocks"
    for p in (q for ps in c.trainable.values() for q in ps):
        assert p.grad is not None and p.grad.abs().sum() > 0
    set_checkpointing(c.reward_model, False)
    calls.clear()
    without = grads()
    assert not calls and with_ckpt.keys() == without.keys() == {"lora", "flow"}
    for key, g in without.items():
        torch.testing.assert_close(with_ckpt[key], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_cli_trains_the_tiny_model_on_it(name, tmp_path, capsys):
    from lowmem_nablagfn.cli import main

    torch.set_num_threads(1)  # two spinning OpenMP threads on a busy 2-core machine run 10x slower
    rc = main(["train", "--preset", "tiny_cpu", "--quiet", *SMALL, f"reward.name={name}",
               "reward.checkpoint=random:reduced", "memory.checkpoint_reward=true", "prompts.set=drawbench",
               f"logging.output_dir={tmp_path}", "logging.run_name=run", "training.num_epochs=1"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["reward/mean"]) and r["reward/std"] > 0 for r in rows), rows
    assert np.isfinite(rows[-1]["train/loss"]) and rows[-1]["optimizer_steps"] == 2
