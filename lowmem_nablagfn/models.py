"""Model loading: Stable Diffusion parts (local directory, hub id, ``tiny``, ``sd15-random``),
the LoRA adapter (peft) and the residual log-flow model ``g_φ``.

``tiny`` and ``sd15-random`` are random weights of the real diffusers/transformers classes,
deterministic from a seed; their tokenizer is the real CLIP BPE tokenizer, built from the vocabulary
that ships inside open-clip-torch (no download).
"""
from __future__ import annotations

import contextlib
import gzip
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

CLIP_VOCAB_SIZE = 49408
#: ``pretrained.model`` ending so is a single checkpoint file in the original (A1111 / ComfyUI) layout.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def vae_dtype(vae_config, is_sdxl: bool, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in fp16 (NaN images), so under fp16 it is upcast to fp32 when its config
    says ``force_upcast`` (as diffusers' SDXL pipelines do); an fp16-fix VAE (``force_upcast: false``)
    stays fp16, and bf16 / fp32 are kept.  SD 1.x VAEs run in fp16 as they are."""
    if is_sdxl and dtype == torch.float16 and getattr(vae_config, "force_upcast", False):
        return torch.float32
    return dtype


@dataclass
class SDParts:
    """The parts of a Stable Diffusion model the trainer uses.

    SDXL has a second text encoder (OpenCLIP bigG, ``CLIPTextModelWithProjection``) and tokenizer;
    the UNet then takes added conditioning (pooled embedding and time ids), which
    :meth:`encode` / :meth:`uncond` return as a :class:`~lowmem_nablagfn.sampling.Conditioning`.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict
    text_encoder_2: Optional[nn.Module] = None
    tokenizer_2: Optional[object] = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> List[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def prompt_embed_dim(self) -> int:
        """Width D of the prompt embeddings the UNet (and the flow model) attends to (SDXL: 2048)."""
        return sum(te.config.hidden_size for te in self.text_encoders)

    def frozen_dtype(self, module: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of a frozen part under ``training.mixed_precision`` (see :func:`vae_dtype`)."""
        return vae_dtype(self.vae.config, self.is_sdxl, dtype) if module is self.vae else dtype

    def encode(self, prompts: Sequence[str], device, resolution: int):
        """Prompt conditioning of ``prompts`` on ``device``: a (B, L, D) tensor (SD 1.x) or a
        ``Conditioning`` with pooled embeddings and time ids for ``resolution``-px images (SDXL)."""
        from .sampling import encode_prompts, encode_prompts_sdxl

        if not self.is_sdxl:
            return encode_prompts(self.text_encoder, self.tokenizer, prompts, device)
        return encode_prompts_sdxl(self.text_encoders, [self.tokenizer, self.tokenizer_2], prompts, device,
                                   resolution)

    def uncond(self, device, resolution: int):
        """The unconditional (CFG) row: SD 1.x encodes the empty prompt; SDXL uses zero embeddings,
        as ``StableDiffusionXLPipeline`` does without a negative prompt (``force_zeros_for_empty_prompt``)."""
        c = self.encode([""], device, resolution)
        if not self.is_sdxl:
            return c
        return replace(c, prompt_embeds=torch.zeros_like(c.prompt_embeds),
                       pooled_embeds=torch.zeros_like(c.pooled_embeds))


# ----------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple:
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ImportError("the CLIP vocabulary ships with open-clip-torch: pip install open-clip-torch") from exc
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The CLIP BPE tokenizer (49408 tokens, same ids as open_clip's), offline.  SDXL's second
    tokenizer (OpenCLIP bigG) is the same vocabulary padded with ``!`` (id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                        pad_token=pad_token)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


# ----------------------------------------------------------------------------- built-in models

def _tiny_configs() -> dict:
    unet = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=8)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=1, norm_num_groups=8, sample_size=64)
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    return dict(unet=unet, vae=vae, text=text)


def _sd15_configs() -> dict:
    unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, sample_size=512)
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return dict(unet=unet, vae=vae, text=text)


def _sdxl_unet(blocks, down, up, heads, layers, transformer_layers, cross_dim, time_dim, pooled_dim, **extra) -> dict:
    """An SDXL UNet config: ``text_time`` added conditioning = 6 time ids × ``time_dim`` + pooled."""
    return dict(in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=blocks,
                down_block_types=down, up_block_types=up, attention_head_dim=heads,
                transformer_layers_per_block=transformer_layers, cross_attention_dim=cross_dim,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + pooled_dim, **extra)


def _tiny_sdxl_configs() -> dict:
    """Tiny SDXL: two small text encoders of different widths (32 + 48 = 80-wide prompt embeddings,
    48-wide pooled projection), a 2-block ``text_time`` UNet, the tiny VAE with SDXL's scaling."""
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, projection_dim=32)
    text_2 = dict(text, hidden_size=48, intermediate_size=96, num_hidden_layers=3, hidden_act="gelu",
                  projection_dim=48, pad_token_id=0)
    unet = _sdxl_unet((32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"),
                      heads=(2, 4), layers=1, transformer_layers=(1, 2), cross_dim=80, time_dim=8, pooled_dim=48,
                      sample_size=8, norm_num_groups=8)
    vae = dict(_tiny_configs()["vae"], scaling_factor=0.13025, force_upcast=True)
    return dict(unet=unet, vae=vae, text=text, text_2=text_2)


def _sdxl_configs() -> dict:
    """SDXL base 1.0's architecture (stabilityai/stable-diffusion-xl-base-1.0 component configs)."""
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    text_2 = dict(text, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
    unet = _sdxl_unet((320, 640, 1280), ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), heads=(5, 10, 20), layers=2,
                      transformer_layers=(1, 2, 10), cross_dim=2048, time_dim=256, pooled_dim=1280,
                      sample_size=128)
    vae = dict(_sd15_configs()["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return dict(unet=unet, vae=vae, text=text, text_2=text_2)


#: Built-in random-weight models (real classes, deterministic from ``pretrained.seed``).
BUILTIN_CONFIGS = {"tiny": _tiny_configs, "sd15-random": _sd15_configs,
                   "tiny-sdxl": _tiny_sdxl_configs, "sdxl-random": _sdxl_configs}
#: Pixels of the built-in models' native resolution (``sampling.resolution`` default in their presets).
NATIVE_RESOLUTION = {"tiny": 64, "sd15-random": 512, "tiny-sdxl": 64, "sdxl-random": 1024}


def instantiate(cfgs: dict, scheduler_config: Optional[dict] = None) -> SDParts:
    """SD parts of the given component configs (``unet``, ``vae``, ``text`` and, for SDXL,
    ``text_2``), with the offline CLIP tokenizers; random weights (or on the current default device,
    e.g. ``meta`` for the planner)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .diffusion import SD_SCHEDULER_CONFIG

    def text_config(c: dict) -> CLIPTextConfig:
        return CLIPTextConfig(**{k: v for k, v in c.items() if not k.startswith("_")})

    unet = UNet2DConditionModel.from_config(cfgs["unet"])
    vae = AutoencoderKL.from_config(cfgs["vae"])
    text_encoder = CLIPTextModel(text_config(cfgs["text"]))
    text_encoder_2 = tokenizer_2 = None
    if cfgs.get("text_2") is not None:
        text_encoder_2 = CLIPTextModelWithProjection(text_config(cfgs["text_2"]))
        tokenizer_2 = clip_tokenizer(pad_token="!")
    return SDParts(unet, vae, text_encoder, clip_tokenizer(), dict(scheduler_config or SD_SCHEDULER_CONFIG),
                   text_encoder_2, tokenizer_2)


def build_random_sd(name: str, seed: int = 0) -> SDParts:
    """``tiny``, ``sd15-random``, ``tiny-sdxl`` or ``sdxl-random``: real classes, random weights,
    deterministic from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = instantiate(BUILTIN_CONFIGS[name]())
    if name == "tiny":  # a decoder whose colours follow the latents: the default job's effect is visible
        preview_decoder_(parts.vae)
    return parts


# The tiny decoder's colours (rows: latent channels; columns: R, G, B): brightness, cyan-red,
# magenta-green, blue-yellow (opponent colours: a colour reward has one clear direction per channel).
# Signs: with the default seed the untrained samples come out cool (green, cyan, blue), so the
# redness reward's effect reads at a glance.
LATENT_RGB = ((0.35, 0.35, 0.35), (-0.5, 0.25, 0.25), (0.25, -0.5, 0.25), (-0.25, -0.25, 0.5))


@torch.no_grad()
def preview_decoder_(vae: nn.Module, gain: float = 1.0) -> nn.Module:
    """Set an ``AutoencoderKL`` decoder (in place) to a smooth "latent preview": pixel = ``gain ·
    LATENT_RGB^T u``, where ``u_j`` is latent channel ``j`` upsampled (nearest, then a [1 2 1]² blur
    per stage) and divided by its root mean square over the image.

    Why: a random decoder's last GroupNorm removes each image's mean colour, so a colour reward
    barely moves and its samples stay coloured noise.  Here every residual branch and the mid-block
    attention output are zero (identity blocks), ``conv_in`` writes ``(+z_j, -z_j)`` into the two
    channels of one group of the final GroupNorm (mean 0 by construction, so only the RMS is
    divided out) and ``conv_out`` reads ``SiLU(a) - SiLU(-a) = a``.  Needs latent channels ≤ 4 and
    two channels per group in the last GroupNorm (the ``tiny`` VAE: 16 channels, 8 groups).
    """
    dec, c = vae.decoder, vae.config.latent_channels
    norm = dec.conv_norm_out
    if c > len(LATENT_RGB) or norm.num_channels != 2 * norm.num_groups or norm.num_groups < c:
        raise ValueError(f"preview_decoder_ needs <= {len(LATENT_RGB)} latent channels and 2 channels per "
                         f"group in the decoder's last GroupNorm; got {c}, {norm.num_channels}/{norm.num_groups}")
    for conv in (vae.post_quant_conv, dec.conv_in, dec.conv_out):
        conv.weight.zero_()
        conv.bias.zero_()
    vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(c)
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = blur[:, None] * blur[None, :] / 16
    for m in dec.modules():
        kind = type(m).__name__
        if kind == "ResnetBlock2D":  # residual branch off: the block is its shortcut
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
            if m.conv_shortcut is not None:
                w = m.conv_shortcut.weight
                w.zero_()
                m.conv_shortcut.bias.zero_()
                n = min(w.shape[:2])
                w[:n, :n, 0, 0] = torch.eye(n)
        elif kind == "Attention":
            m.to_out[0].weight.zero_()
            m.to_out[0].bias.zero_()
        elif kind == "Upsample2D" and m.conv is not None:
            m.conv.weight.zero_()
            m.conv.bias.zero_()
            for i in range(m.conv.weight.shape[0]):
                m.conv.weight[i, i] = blur
    for j in range(c):
        dec.conv_in.weight[2 * j, j, 1, 1] = 1.0
        dec.conv_in.weight[2 * j + 1, j, 1, 1] = -1.0
        dec.conv_out.weight[:, 2 * j, 1, 1] = gain * torch.tensor(LATENT_RGB[j])
        dec.conv_out.weight[:, 2 * j + 1, 1, 1] = -gain * torch.tensor(LATENT_RGB[j])
    return vae


def load_sd(name: str, revision: Optional[str] = None, seed: int = 0, vae: Optional[str] = None) -> SDParts:
    """Load SD parts from a built-in name / a local diffusers directory / a single file / a hub id,
    with the VAE replaced by the diffusers ``AutoencoderKL`` at ``vae`` when given (``pretrained.vae``).

    Hub ids go through huggingface_hub, which honours ``HF_HUB_OFFLINE=1`` (cache only).
    """
    parts = _load_sd(name, revision, seed)
    if vae:
        from diffusers import AutoencoderKL

        try:
            parts.vae = AutoencoderKL.from_pretrained(str(Path(vae).expanduser()) if Path(vae).expanduser().is_dir() else vae)
        except OSError as exc:
            raise FileNotFoundError(f"could not load pretrained.vae={vae!r}: {str(exc).splitlines()[0]}") from exc
    return parts


def _load_sd(name: str, revision: Optional[str], seed: int) -> SDParts:
    if name in BUILTIN_CONFIGS:
        return build_random_sd(name, seed)
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(name).expanduser()
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from .single_file import load_single_file

        return load_single_file(local)
    if name.startswith(("/", ".", "~")) and not local.is_dir():
        raise FileNotFoundError(f"model directory {name} not found; give a diffusers model directory, "
                                f"a single .safetensors/.ckpt file, a hub id, or one of "
                                f"{', '.join(BUILTIN_CONFIGS)}")
    src = str(local) if local.is_dir() else name
    kw = {} if local.is_dir() else {"revision": revision}
    text_encoder_2 = tokenizer_2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        if DiffusionPipeline.load_config(src, **kw).get("text_encoder_2"):  # SDXL (model_index.json)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw)
            tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (" HF_HUB_OFFLINE is set: download it once online, or point pretrained.model at a local "
                "directory." if offline else "")
        raise FileNotFoundError(f"could not load Stable Diffusion from {name!r}: {exc}.{hint}") from exc
    for tok in (tokenizer, tokenizer_2):
        if tok is not None and len(tok) != CLIP_VOCAB_SIZE:  # transformers can silently return a broken tokenizer
            raise RuntimeError(f"tokenizer of {name!r} has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return SDParts(unet, vae, text_encoder, tokenizer, config, text_encoder_2, tokenizer_2)


def unet_config_of(name: str) -> Optional[dict]:
    """The UNet config of ``pretrained.model`` without loading weights (built-in dict, a diffusers
    directory's ``unet/config.json``, a single file's identified architecture, a cached hub repo), or
    None when it cannot be found offline."""
    import json

    if name in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[name]()["unet"])
    local = Path(name).expanduser()
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES and local.is_file():
        from .single_file import identify

        return dict(identify(local).configs["unet"])
    path = local / "unet" / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "unet/config.json")
            path = Path(hit) if isinstance(hit, str) else None
        except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
            path = None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def save_sd(parts: SDParts, path: str | Path) -> None:
    """Write the parts as a diffusers model directory (loadable by ``StableDiffusionPipeline`` or,
    for SDXL, ``StableDiffusionXLPipeline``)."""
    pipe = make_pipeline(parts)
    pipe.save_pretrained(str(path), safe_serialization=True)


def pipeline_class(parts: SDParts):
    """The diffusers pipeline class of the parts' family (also reads LoRA files for it)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if parts.is_sdxl else StableDiffusionPipeline


def make_pipeline(parts: SDParts):
    """A ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``, zero unconditional
    embeddings as SDXL base ships it) over the parts, DDIM scheduler, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if parts.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
            scheduler=DDIMScheduler.from_config(parts.scheduler_config), force_zeros_for_empty_prompt=True,
            add_watermarker=False)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


# ----------------------------------------------------------------------------- LoRA

def freeze(module: torch.nn.Module, device=None, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """No gradients, eval mode, moved/cast.  diffusers 0.42's ``ModelMixin.to`` warns on every dtype
    cast even when the model keeps no module in float32 (its list is empty, as for SD 1.5), once per
    model per run; those models get ``torch.nn.Module.to``, the others keep diffusers' cast."""
    module.requires_grad_(False).eval()
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device, dtype=dtype)
    return torch.nn.Module.to(module, device, dtype=dtype)


def vae_encoder_modules(vae: torch.nn.Module) -> List[torch.nn.Module]:
    """The parts of an ``AutoencoderKL`` that only *encode* images (never used by sampling, the reward
    or training: they start from noise and only decode)."""
    return [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]


def add_lora(unet: nn.Module, rank: int, target_modules: List[str], init: str = "gaussian",
             seed: int = 0) -> List[nn.Parameter]:
    """Attach a peft LoRA adapter (alpha = rank) and return its parameters, cast to fp32."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules),
                                    init_lora_weights=True if init == "default" else init))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no LoRA parameter was created: model.lora.target_modules={target_modules} "
                         f"matches no module of the UNet")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def reference_policy(unet: nn.Module) -> Iterator[nn.Module]:
    """The reference policy ``P_F^ref``: the same UNet with its adapter disabled."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


# ----------------------------------------------------------------------------- attention backend

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


def check_attention_backend(backend: str, device) -> None:
    """Raise a clear error, before any model is loaded, when ``memory.attention`` cannot run here."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"memory.attention={backend!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend != "xformers":
        return
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        raise ImportError("memory.attention=xformers needs the xformers package, which is not installed: "
                          "pip install xformers (a wheel matching your torch and CUDA), or use "
                          "memory.attention=sdpa (the default; PyTorch's own flash / memory-efficient kernels)")
    if torch.device(device).type != "cuda":
        raise ValueError(f"memory.attention=xformers runs on CUDA only (device is {device}); "
                         f"use memory.attention=sdpa")


class MathSDPAProcessor:
    """diffusers' SDPA processor with ``F.scaled_dot_product_attention`` forced to its math kernel
    (the attention matrix is materialised and, with a graph, kept for the backward)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self.inner(*args, **kwargs)


def set_attention_backend(modules, backend: str) -> None:
    """Give every attention layer of these diffusers models (UNet, VAE, flow model; ``None`` skipped)
    the processor of ``memory.attention``: ``sdpa`` (diffusers' ``AttnProcessor2_0``), ``xformers``
    (``XFormersAttnProcessor``) or ``math`` (:class:`MathSDPAProcessor`)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    make = {"sdpa": AttnProcessor2_0, "xformers": XFormersAttnProcessor, "math": MathSDPAProcessor}[backend]
    for module in modules:
        if module is not None and hasattr(module, "set_attn_processor"):
            module.set_attn_processor(make())


# ----------------------------------------------------------------------------- flow model

def build_flow_model(latent_channels: int, latent_size: int, cross_attention_dim: int,
                     block_widths: List[int], seed: int = 0) -> nn.Module:
    """Residual log-flow score model ``g_φ(x, t, c)``: a small UNet2DConditionModel whose output
    (the gradient field ∇_x log F̃_t) has a zero-initialised bias, 1 layer per block."""
    from diffusers import UNet2DConditionModel

    n = len(block_widths)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",) if n > 1 else ("CrossAttnDownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1) if n > 1 else ("CrossAttnUpBlock2D",)
    groups = min(32, min(block_widths))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            layers_per_block=1, block_out_channels=tuple(block_widths), down_block_types=down,
            up_block_types=up, cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
            attention_head_dim=max(1, min(8, block_widths[0] // 8)))
    nn.init.zeros_(model.conv_out.bias)
    return model.float()
