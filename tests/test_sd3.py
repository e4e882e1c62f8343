"""Stable Diffusion 3.x parts (lowmem_nablagfn/models/sd3.py): the built-in tiny-sd3 / sd35m-random are
the real diffusers / transformers classes, the conditioning is StableDiffusion3Pipeline.encode_prompt's,
a saved SD 3 directory loads through load_sd, and prompt embeddings are cached (no text encoder needed
on a hit)."""
import pytest
import torch

from lowmem_nablagfn.models import load_sd
from lowmem_nablagfn.models.prompt_cache import model_identity, prompt_embeddings
from lowmem_nablagfn.sampling import Conditioning
from lowmem_nablagfn.models.sd3 import (MODEL_PARTS, SD3Parts, TextOptions, build_random_sd3, instantiate_sd3,
                                        sd3_builtin_configs, sd3_pipeline)

PROMPTS = ["a cat", "a photo of a dog riding a horse, highly detailed", ""]


@pytest.fixture(scope="module")
def tiny():
    return build_random_sd3("tiny-sd3", seed=0)


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_sd3_is_the_real_classes(tiny):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(tiny.transformer, SD3Transformer2DModel) and tiny.denoiser is tiny.transformer
    assert isinstance(tiny.vae, AutoencoderKL) and tiny.vae.config.latent_channels == 16
    assert (tiny.vae.config.scaling_factor, tiny.vae.config.shift_factor) == (1.5305, 0.0609)  # SD 3's latents
    assert all(isinstance(te, CLIPTextModelWithProjection) for te in (tiny.text_encoder, tiny.text_encoder_2))
    assert isinstance(tiny.text_encoder_3, T5EncoderModel) and len(tiny.tokenizer_3) == 1103
    blocks = tiny.transformer.transformer_blocks  # SD 3.5's MMDiT-X: dual attention, RMS q/k norm
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None and blocks[-1].context_pre_only
    assert tiny.vae_scale_factor == 8 and tiny.prompt_embed_dim == 96 and tiny.prompt_length == 77 + 256
    assert tiny.scheduler_config["shift"] == 3.0


def test_builtin_is_deterministic_part_by_part(tiny):
    """Each component has its own seed, so the text encoders alone (to fill the prompt cache) are the
    full model's, and a full rebuild is the same model."""
    text_only = build_random_sd3("tiny-sd3", seed=0, parts=("text", "text_2", "text_3"))
    assert text_only.transformer is None and text_only.vae is None
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert _equal_weights(getattr(text_only, name), getattr(tiny, name)), name
    assert _equal_weights(build_random_sd3("tiny-sd3", seed=0, parts=MODEL_PARTS).transformer, tiny.transformer)
    other = build_random_sd3("tiny-sd3", seed=1, parts=("transformer",)).transformer
    assert not _equal_weights(other, tiny.transformer)


def test_sd35m_random_is_sd35_medium_on_meta():
    """The real architecture's sizes without memory: MMDiT-X 2.5 B with its 384² position table, 24 blocks
    (0-12 with dual attention), 4096-wide joint attention; T5 v1.1 XXL's encoder 4.76 B; CLIP-L and bigG
    with projections (pooled 768 + 1280 = 2048)."""
    with torch.device("meta"):
        parts = instantiate_sd3(sd3_builtin_configs("sd35m-random"))
    count = lambda m, buffers=False: sum(t.numel() for t in (*m.parameters(), *(m.buffers() if buffers else ())))  # noqa: E731
    assert abs(count(parts.transformer, buffers=True) / 2.47e9 - 1) < 0.01
    assert abs(count(parts.text_encoder_3) / 4.762e9 - 1) < 0.001
    assert (count(parts.text_encoder), count(parts.text_encoder_2)) == (123_650_304, 694_659_840)
    blocks = parts.transformer.transformer_blocks
    assert len(blocks) == 24 and sum(b.attn2 is not None for b in blocks) == 13
    assert parts.prompt_embed_dim == 4096 and parts.transformer.config.pooled_projection_dim == 2048
    assert parts.transformer.device.type == "meta" and parts.vae_scale_factor == 8


@pytest.mark.parametrize("t5", [True, False])
def test_encode_is_the_pipelines(tiny, t5):
    """Prompt embeddings (B, 77 + 256, 96) and pooled (B, 80) as StableDiffusion3Pipeline.encode_prompt
    computes them, and the CFG row its default negative prompt; without T5 its part is zeros."""
    parts = tiny if t5 else SD3Parts(**{**tiny.__dict__, "text_encoder_3": None, "tokenizer_3": None,
                                        "text_options": TextOptions(t5=False)})
    cond = parts.encode(PROMPTS, "cpu")
    want, want_neg, pooled, pooled_neg = sd3_pipeline(parts).encode_prompt(PROMPTS, None, None, device="cpu")
    assert cond.prompt_embeds.shape == (3, 77 + 256, 96) and cond.pooled_embeds.shape == (3, 80)
    torch.testing.assert_close(cond.prompt_embeds, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=1e-5, atol=1e-5)
    uncond = parts.uncond("cpu")
    torch.testing.assert_close(uncond.prompt_embeds, want_neg[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond.pooled_embeds, pooled_neg[:1], rtol=1e-5, atol=1e-5)
    t5_part = cond.prompt_embeds[:, 77:]
    assert bool((t5_part == 0).all()) != t5
    assert float(cond.prompt_embeds[:, :77, :80].abs().mean()) > 0.1 and bool((cond.prompt_embeds[:, :77, 80:] == 0).all())


def test_text_options_are_checked():
    with pytest.raises(ValueError, match="max_sequence_length=600.*1 to 512"):
        TextOptions(max_sequence_length=600)


def test_a_saved_sd3_directory_loads_through_load_sd(tiny, tmp_path):
    """StableDiffusion3Pipeline.save_pretrained's directory is recognised by its model_index.json and
    loads as SD3Parts with the same weights; components=… loads only those (the transformer's config
    is still read: the conditioning width)."""
    sd3_pipeline(tiny).save_pretrained(str(tmp_path))
    parts = load_sd(str(tmp_path))
    assert isinstance(parts, SD3Parts)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert _equal_weights(getattr(parts, name), getattr(tiny, name)), name
    assert parts.tokenizer_3("a cat").input_ids == tiny.tokenizer_3("a cat").input_ids
    assert parts.scheduler_config["shift"] == 3.0 and not parts.scheduler_config["use_dynamic_shifting"]
    text = load_sd(str(tmp_path), components=("text", "text_2", "text_3"), text_options=TextOptions(t5=False))
    assert (text.transformer, text.vae, text.text_encoder_3) == (None, None, None) and text.prompt_embed_dim == 96
    torch.testing.assert_close(text.encode(PROMPTS[:1], "cpu").pooled_embeds, tiny.encode(PROMPTS[:1], "cpu").pooled_embeds)


def test_an_uncached_hub_id_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="stable-diffusion-3.5-medium.*HF_HUB_OFFLINE is set"):
        load_sd("stabilityai/stable-diffusion-3.5-medium")


def test_prompt_embeddings_are_computed_once(tiny, tmp_path):
    """The first call encodes (the text encoders are built then only); later calls read the file and
    never build them; the rows are the encoders' own, looked up by prompt; another option, model or
    prompt list is another file."""
    calls = []

    def make_encoder():
        calls.append(1)
        return tiny

    identity = model_identity("tiny-sd3", seed=0)
    options = {"max_sequence_length": 256, "t5": True}
    first = prompt_embeddings(PROMPTS, identity, options, make_encoder, cache_dir=tmp_path, label="tiny-sd3-x-train",
                              batch_size=2)
    again = prompt_embeddings(PROMPTS, identity, options, make_encoder, cache_dir=tmp_path, label="tiny-sd3-x-train")
    assert len(calls) == 1 and len(list(tmp_path.glob("tiny-sd3-x-train-*.safetensors"))) == 1
    want = tiny.encode(PROMPTS, "cpu")
    rows = again.encode([PROMPTS[1], PROMPTS[0]], "cpu")
    torch.testing.assert_close(rows.prompt_embeds, want.prompt_embeds[[1, 0]])
    torch.testing.assert_close(rows.pooled_embeds, want.pooled_embeds[[1, 0]])
    torch.testing.assert_close(first.uncond.prompt_embeds, tiny.uncond("cpu").prompt_embeds)
    assert rows.time_ids is None
    with pytest.raises(KeyError, match="'a bird' is not in the cached prompt set"):
        again.encode(["a bird"], "cpu")


    class Stub:  # a stand-in encoder: only whether it is asked matters below
        def encode(self, prompts, device, resolution=None):
            calls.append(1)
            return Conditioning(torch.zeros(len(prompts), 2, 3), torch.zeros(len(prompts), 4))

        uncond = lambda self, device, resolution=None: self.encode([""], device)  # noqa: E731

    calls.clear()
    for key in [(PROMPTS, identity, {**options, "t5": False}), (PROMPTS[:2], identity, options),
                (PROMPTS, model_identity("tiny-sd3", seed=1), options), (PROMPTS, identity, options)]:
        prompt_embeddings(*key, Stub, cache_dir=tmp_path, label="tiny-sd3-x-train")
    assert len(calls) == 3 * 2  # three new keys (rows + CFG row each); the last one was cached


def test_model_identity_follows_the_text_encoder_files(tiny, tmp_path):
    sd3_pipeline(tiny).save_pretrained(str(tmp_path))
    before = model_identity(str(tmp_path))
    assert model_identity(str(tmp_path)) == before and str(tmp_path.resolve()) in before
    (tmp_path / "transformer" / "extra.txt").write_text("not a text encoder")
    assert model_identity(str(tmp_path)) == before
    (tmp_path / "text_encoder_3" / "config.json").write_text("{}")
    assert model_identity(str(tmp_path)) != before
    assert model_identity("tiny-sd3", seed=0) != model_identity("tiny-sd3", seed=1)
    assert model_identity("owner/not-cached", revision="abc") == "hub:owner/not-cached@abc"


def test_tiny_sd3_decoder_is_the_latent_preview(tiny):
    """As tiny's: the decoded colours are LATENT_RGB^T of the first four latent channels (upsampled,
    blurred, RMS-normalised); the other twelve are not shown."""
    import torch.nn.functional as F

    from lowmem_nablagfn.models import LATENT_RGB

    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    other = torch.cat([z[:, :4], torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(1))], 1)
    with torch.no_grad():
        out, out_other = tiny.vae.decode(z).sample, tiny.vae.decode(other).sample
    u, k = z[:, :4], torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    for _ in range(3):
        u = F.conv2d(F.interpolate(u, scale_factor=2, mode="nearest"), k.expand(4, 1, 3, 3), padding=1, groups=4)
    u = u / (u.pow(2).mean((2, 3), keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out, torch.einsum("bjhw,jc->bchw", u, torch.tensor(LATENT_RGB)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out_other, out, rtol=0, atol=1e-6)
