"""Stable Diffusion 3.x as this package sees it: :class:`SD3Parts` (MMDiT transformer, 16-channel VAE,
CLIP-L + OpenCLIP bigG + T5 text encoders, flow-matching scheduler config), its conditioning as
``StableDiffusion3Pipeline.encode_prompt`` computes it, and the built-in random models
``tiny-sd3`` (tiny configs of the real classes, CPU tests) and ``sd35m-random`` (Stable Diffusion
3.5 Medium's architecture, random weights, for memory and speed; on ``meta`` when only sizes count).

Loading a diffusers directory or hub id of SD 3.x is :func:`load_sd3`, reached through
:func:`~lowmem_nablagfn.models.loading.load_sd` like every other model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer, t5_tokenizer


@dataclass(frozen=True)
class TextOptions:
    """How prompts become SD 3 conditioning (part of every prompt-embedding cache key).

    Attributes:
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256; at most 512).  The
            transformer attends to ``77 + max_sequence_length`` text tokens.
        t5: run T5-XXL.  ``False`` gives zeros for its part, as ``StableDiffusion3Pipeline`` does with
            ``text_encoder_3=None``: 4.7 B parameters never loaded, at a cost in prompt following
            (long, compositional and typographic prompts suffer most; Stability AI's SD3 paper reports
            lower human-preference scores without it).
    """

    max_sequence_length: int = 256
    t5: bool = True

    def __post_init__(self):
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length={self.max_sequence_length}: T5 takes 1 to 512 tokens "
                             f"(StableDiffusion3Pipeline refuses more); the pipeline's default is 256")


def _clip(hidden, layers, heads, act, proj, pad_token_id=1) -> dict:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                hidden_act=act, projection_dim=proj, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=pad_token_id)


def _tiny_sd3_configs() -> dict:
    """Tiny SD 3.5: a 2-block MMDiT with SD 3.5's dual attention (block 0) and RMS q/k norm, the tiny
    VAE with 16 latent channels and SD 3's scaling/shift, CLIP widths 32 + 48 (pooled 80), a 96-wide T5
    (the joint attention width; the CLIP states are zero-padded to it), 1,103 T5 tokens."""
    transformer = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                       caption_projection_dim=16, pooled_projection_dim=80, pos_embed_max_size=16,
                       dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    t5 = dict(d_model=96, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=32, feed_forward_proj="gated-gelu", t5_pieces=1000)
    return dict(transformer=transformer, vae=vae, text=_clip(32, 2, 4, "quick_gelu", 32),
                text_2=_clip(48, 3, 4, "gelu", 48), text_3=t5)


def _sd35m_configs() -> dict:
    """Stable Diffusion 3.5 Medium's architecture (stabilityai/stable-diffusion-3.5-medium component
    configs): MMDiT-X, 24 blocks of width 1536 (24 heads × 64), dual attention in blocks 0-12, RMS
    q/k norm; the SD 3 VAE; CLIP-L/14 and OpenCLIP bigG/14 with projections; T5 v1.1 XXL."""
    transformer = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                       dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    vae = dict(_tiny_sd3_configs()["vae"], block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               norm_num_groups=32, sample_size=1024)
    t5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, feed_forward_proj="gated-gelu", t5_pieces=31997,
              vocab_size=32128)
    return dict(transformer=transformer, vae=vae, text=_clip(768, 12, 12, "quick_gelu", 768),
                text_2=_clip(1280, 32, 20, "gelu", 1280), text_3=t5)


#: Built-in random-weight SD 3 models (real classes, deterministic from ``pretrained.seed``).
SD3_BUILTIN_CONFIGS = {"tiny-sd3": _tiny_sd3_configs, "sd35m-random": _sd35m_configs}
#: Pixels of their native resolution.
SD3_NATIVE_RESOLUTION = {"tiny-sd3": 64, "sd35m-random": 1024}
#: The parts a text-encoder-only build or load makes (the order seeds the built-in ones).
TEXT_PARTS = ("text", "text_2", "text_3")
MODEL_PARTS = ("transformer", "vae")


@dataclass
class SD3Parts:
    """The parts of a Stable Diffusion 3.x model the trainer uses.

    The text encoders are None once dropped (:meth:`drop_text_encoders`: the prompt embeddings are
    cached, so none stays resident) or when never loaded; ``text_encoder_3`` is None without T5
    (``text_options.t5=False``).  The transformer / VAE are None in a text-encoder-only load.
    ``prompt_table``: the cached conditioning of a run's prompts
    (:class:`~.prompt_cache.PromptEmbeddings`, :func:`~.family.load_run_parts`), which :meth:`encode`
    and :meth:`uncond` read when there are no text encoders.
    """

    transformer: Optional[nn.Module]
    vae: Optional[nn.Module]
    text_encoder: Optional[nn.Module]
    tokenizer: Optional[object]
    text_encoder_2: Optional[nn.Module]
    tokenizer_2: Optional[object]
    text_encoder_3: Optional[nn.Module]
    tokenizer_3: Optional[object]
    scheduler_config: dict
    transformer_config: dict
    text_options: TextOptions = field(default_factory=TextOptions)
    prompt_table: Optional[object] = None

    is_sdxl = False  # the UNet families' flag (SDParts); SD 3 is told by its type
    is_sd3 = True

    @property
    def denoiser(self) -> nn.Module:
        """The network the sampler calls and LoRA adapts (SD 1.x / SDXL: the UNet)."""
        return self.transformer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> List[nn.Module]:
        return [te for te in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if te is not None]

    @property
    def prompt_embed_dim(self) -> int:
        """Width D of the prompt embeddings: the transformer's ``joint_attention_dim`` (SD 3.5: 4096)."""
        return self.transformer_config["joint_attention_dim"]

    @property
    def prompt_length(self) -> int:
        """Text tokens L the transformer attends to: 77 CLIP + ``max_sequence_length`` T5."""
        return 77 + self.text_options.max_sequence_length

    def frozen_dtype(self, module: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of a frozen part: ``dtype`` for all (SD 3's pipeline runs its VAE as it is)."""
        return dtype

    def encode(self, prompts: Sequence[str], device, resolution: Optional[int] = None):
        """``Conditioning(prompt_embeds (B, 77 + max_sequence_length, D), pooled_embeds (B, P))`` of
        ``prompts`` (``resolution`` is unused: SD 3 has no size conditioning); rows of the prompt table
        when the text encoders are not loaded."""
        if self.text_encoder is None or self.text_encoder_2 is None:
            if self.prompt_table is not None:
                return self.prompt_table.encode(prompts, device)
            raise RuntimeError("the text encoders were dropped (the prompt embeddings are cached); encode "
                               "through the cache, or load the model with its text encoders")
        return encode_prompts_sd3(self, prompts, device)

    def uncond(self, device, resolution: Optional[int] = None):
        """The unconditional (CFG) row: the empty prompt through every encoder, as
        ``StableDiffusion3Pipeline`` computes its default negative prompt (not zeros, unlike SDXL)."""
        if self.text_encoder is None and self.prompt_table is not None:
            return self.prompt_table.uncond.to(device)
        return self.encode([""], device, resolution)

    def drop_text_encoders(self) -> None:
        """Release the text encoders (the cache holds what they computed)."""
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None


@torch.no_grad()
def encode_prompts_sd3(parts: SD3Parts, prompts: Sequence[str], device):
    """SD 3 conditioning of B prompts, as ``StableDiffusion3Pipeline.encode_prompt`` computes it
    (``clip_skip=None``, one image per prompt): each CLIP's penultimate states (B, 77, 768 / 1280)
    concatenated and zero-padded to T5's width, then T5's last states (B, max_sequence_length, 4096)
    appended along the sequence; pooled = both CLIP projections (B, 768 + 1280).  Without T5 its
    part is zeros of the transformer's ``joint_attention_dim``."""
    from ..sampling import Conditioning

    prompts = list(prompts)
    states, pooled = [], []
    for encoder, tokenizer in ((parts.text_encoder, parts.tokenizer), (parts.text_encoder_2, parts.tokenizer_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2].to(parts.text_encoder.dtype))
        pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds (B, P_i)
    clip_states = torch.cat(states, dim=-1)
    length = parts.text_options.max_sequence_length
    if parts.text_encoder_3 is None:
        t5_states = torch.zeros(len(prompts), length, parts.prompt_embed_dim,
                                device=device, dtype=parts.text_encoder.dtype)
    else:
        ids = parts.tokenizer_3(prompts, padding="max_length", max_length=length, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids
        t5_states = parts.text_encoder_3(ids.to(device))[0].to(parts.text_encoder_3.dtype)
    clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return Conditioning(torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1))


def sd3_builtin_configs(name: str) -> dict:
    """Fresh component configs (``transformer``, ``vae``, ``text``, ``text_2``, ``text_3``) of a
    built-in SD 3 model (one of :data:`SD3_BUILTIN_CONFIGS`)."""
    if name not in SD3_BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in SD 3 model {name!r}; choose one of {', '.join(SD3_BUILTIN_CONFIGS)}")
    return SD3_BUILTIN_CONFIGS[name]()


def _build_part(key: str, cfg: dict):
    """One component of an SD 3 model from its config (random weights, current default device/dtype)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if key == "transformer":
        return SD3Transformer2DModel.from_config(cfg)
    if key == "vae":
        return AutoencoderKL.from_config(cfg)
    if key in ("text", "text_2"):
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    t5 = {k: v for k, v in cfg.items() if k != "t5_pieces"}
    t5.setdefault("vocab_size", 3 + cfg["t5_pieces"] + 100)
    return T5EncoderModel(T5Config(**t5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                   tie_word_embeddings=False))


def instantiate_sd3(cfgs: dict, parts: Sequence[str] = MODEL_PARTS + TEXT_PARTS, seed: Optional[int] = None,
                    text_options: TextOptions = TextOptions(), scheduler_config: Optional[dict] = None) -> SD3Parts:
    """SD 3 parts of the given component configs with the offline tokenizers, building only ``parts``
    (the others None; ``text_3`` only with ``text_options.t5``).  With a ``seed`` each component is
    seeded by its own index, so a text-encoder-only build has the weights of a full one; build under
    ``torch.device("meta")`` for sizes only."""
    from ..diffusion import SD3_SCHEDULER_CONFIG

    wanted = [k for k in MODEL_PARTS + TEXT_PARTS if k in parts and (k != "text_3" or text_options.t5)]
    built = {}
    for key in wanted:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed * 1000 + (MODEL_PARTS + TEXT_PARTS).index(key))
            built[key] = _build_part(key, cfgs[key]).eval()  # as from_pretrained returns them (T5 has dropout)
    has = lambda k: built.get(k) is not None  # noqa: E731
    return SD3Parts(built.get("transformer"), built.get("vae"),
                    built.get("text"), clip_tokenizer() if has("text") else None,
                    built.get("text_2"), clip_tokenizer(pad_token="!") if has("text_2") else None,
                    built.get("text_3"), t5_tokenizer(cfgs["text_3"]["t5_pieces"]) if has("text_3") else None,
                    dict(scheduler_config or SD3_SCHEDULER_CONFIG), dict(cfgs["transformer"]), text_options)


def build_random_sd3(name: str, seed: int = 0, parts: Sequence[str] = MODEL_PARTS + TEXT_PARTS,
                     text_options: TextOptions = TextOptions()) -> SD3Parts:
    """``tiny-sd3`` or ``sd35m-random``: real classes, random weights, deterministic from ``seed``
    (component by component: see :func:`instantiate_sd3`).  ``tiny-sd3``'s decoder is the latent
    preview (its first four latent channels as colours), as ``tiny``'s, so that a colour reward moves."""
    from .preview import preview_decoder_

    built = instantiate_sd3(sd3_builtin_configs(name), parts, seed, text_options)
    if name == "tiny-sd3" and built.vae is not None:
        preview_decoder_(built.vae)
    return built


def sd3_pipeline(parts: SD3Parts):
    """A ``StableDiffusion3Pipeline`` over the parts (absent ones None), the flow-matching scheduler
    of the model's config: to save them as a model directory, sample, or read LoRA files."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=parts.transformer, vae=parts.vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            parts.scheduler_config), text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
        text_encoder_3=parts.text_encoder_3, tokenizer_3=parts.tokenizer_3)


def load_sd3(src: str, revision: Optional[str] = None, parts: Sequence[str] = MODEL_PARTS + TEXT_PARTS,
             text_options: TextOptions = TextOptions()) -> SD3Parts:
    """SD 3.x parts from a diffusers directory or hub id (``model_index.json`` naming
    ``StableDiffusion3Pipeline``), loading only ``parts`` (T5 only with ``text_options.t5``); the
    transformer's config is always read (the conditioning width).  ``OSError`` when something is
    missing (the caller words it, with the offline hint)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    kw = {"revision": revision} if revision else {}
    want = {k for k in parts if k != "text_3" or text_options.t5}
    loaders = {"transformer": (SD3Transformer2DModel, "transformer"), "vae": (AutoencoderKL, "vae"),
               "text": (CLIPTextModelWithProjection, "text_encoder"), "tok": (CLIPTokenizer, "tokenizer"),
               "text_2": (CLIPTextModelWithProjection, "text_encoder_2"), "tok_2": (CLIPTokenizer, "tokenizer_2"),
               "text_3": (T5EncoderModel, "text_encoder_3"), "tok_3": (T5TokenizerFast, "tokenizer_3")}
    tokenizer_of = {"text": "tok", "text_2": "tok_2", "text_3": "tok_3"}
    want |= {tokenizer_of[k] for k in want if k in tokenizer_of}
    got = {k: cls.from_pretrained(src, subfolder=sub, **kw) for k, (cls, sub) in loaders.items() if k in want}
    for key in ("tok", "tok_2"):
        if key in got and len(got[key]) != CLIP_VOCAB_SIZE:  # transformers can silently return a broken tokenizer
            raise RuntimeError(f"{loaders[key][1]} of {src!r} has {len(got[key])} tokens, expected {CLIP_VOCAB_SIZE}")
    scheduler = FlowMatchEulerDiscreteScheduler.load_config(src, subfolder="scheduler", **kw)
    transformer_config = SD3Transformer2DModel.load_config(src, subfolder="transformer", **kw)
    clean = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    return SD3Parts(got.get("transformer"), got.get("vae"), got.get("text"), got.get("tok"), got.get("text_2"),
                    got.get("tok_2"), got.get("text_3"), got.get("tok_3"),
                    {"_class_name": "FlowMatchEulerDiscreteScheduler", **clean(scheduler)},
                    clean(transformer_config), text_options)
