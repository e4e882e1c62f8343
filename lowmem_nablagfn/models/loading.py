"""Loading SD parts by ``pretrained.model``: a built-in name, a local diffusers directory, a
single-file checkpoint or a hub id (``HF_HUB_OFFLINE=1``: cache only); the UNet config of a model
without loading its weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .builtin import BUILTIN_CONFIGS, build_random_sd
from .parts import SDParts
from .single_file import SINGLE_FILE_SUFFIXES, identify, load_single_file
from ..tokenizer import CLIP_VOCAB_SIZE


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

