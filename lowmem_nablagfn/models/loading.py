"""Loading SD parts by ``pretrained.model``: a built-in name, a local diffusers directory, a
single-file checkpoint or a hub id (``HF_HUB_OFFLINE=1``: cache only) — SD 1.x / SDXL as
:class:`SDParts`, SD 3.x as :class:`~.sd3.SD3Parts`; the UNet config of a model without loading its
weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from .builtin import BUILTIN_CONFIGS, build_random_sd
from .parts import SDParts
from ..config.validation import is_sd3_index
from .sd3 import MODEL_PARTS, SD3_BUILTIN_CONFIGS, TEXT_PARTS, SD3Parts, TextOptions, build_random_sd3, load_sd3
from .single_file import SINGLE_FILE_SUFFIXES, identify, load_single_file
from ..tokenizer import CLIP_VOCAB_SIZE


def load_sd(name: str, revision: Optional[str] = None, seed: int = 0, vae: Optional[str] = None,
            text_options: Optional[TextOptions] = None,
            components: Sequence[str] = MODEL_PARTS + TEXT_PARTS) -> Union[SDParts, SD3Parts]:
    """Load SD parts from a built-in name / a local diffusers directory / a single file / a hub id,
    with the VAE replaced by the diffusers ``AutoencoderKL`` at ``vae`` when given (``pretrained.vae``).

    Hub ids go through huggingface_hub, which honours ``HF_HUB_OFFLINE=1`` (cache only).  SD 3.x
    only: ``text_options`` (T5 or not, its length) and ``components``, the parts to load (e.g. the
    text encoders alone to fill the prompt-embedding cache, or everything but them).
    """
    parts = _load_sd(name, revision, seed, text_options or TextOptions(), components)
    if vae:
        from diffusers import AutoencoderKL

        try:
            parts.vae = AutoencoderKL.from_pretrained(str(Path(vae).expanduser()) if Path(vae).expanduser().is_dir() else vae)
        except OSError as exc:
            raise FileNotFoundError(f"could not load pretrained.vae={vae!r}: {str(exc).splitlines()[0]}") from exc
    return parts


def is_sd3(name: str, revision: Optional[str] = None) -> bool:
    """Whether ``pretrained.model`` is SD 3.x: :func:`~lowmem_nablagfn.config.is_sd3_model` (built-in names,
    local and cached ``model_index.json``), else the hub's ``model_index.json``; a model that cannot be
    found is not SD 3 here (:func:`load_sd` then says why it cannot load)."""
    from ..config import is_sd3_model

    known = is_sd3_model(name, revision)
    if known is not None:
        return known
    from diffusers import DiffusionPipeline

    try:
        return is_sd3_index(DiffusionPipeline.load_config(name, revision=revision))
    except (OSError, ValueError):
        return False


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return (" HF_HUB_OFFLINE is set: download it once online, or point pretrained.model at a local "
            "directory." if offline else "")


def _load_sd(name: str, revision: Optional[str], seed: int, text_options: TextOptions,
             components: Sequence[str]) -> Union[SDParts, SD3Parts]:
    if name in BUILTIN_CONFIGS:
        return build_random_sd(name, seed)
    if name in SD3_BUILTIN_CONFIGS:
        return build_random_sd3(name, seed, components, text_options)
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(name).expanduser()
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return load_single_file(local)
    if name.startswith(("/", ".", "~")) and not local.is_dir():
        raise FileNotFoundError(f"model directory {name} not found; give a diffusers model directory, "
                                f"a single .safetensors/.ckpt file, a hub id, or one of "
                                f"{', '.join(list(BUILTIN_CONFIGS) + list(SD3_BUILTIN_CONFIGS))}")
    src = str(local) if local.is_dir() else name
    kw = {} if local.is_dir() else {"revision": revision}
    try:
        if is_sd3_index(DiffusionPipeline.load_config(src, **kw)):  # model_index.json names the family
            return load_sd3(src, kw.get("revision"), components, text_options)
    except OSError as exc:
        raise FileNotFoundError(f"could not load Stable Diffusion from {name!r}: {exc}.{_offline_hint()}") from exc
    text_encoder_2 = tokenizer_2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        if DiffusionPipeline.load_config(src, **kw).get("text_encoder_2"):  # SDXL
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw)
            tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
    except OSError as exc:
        raise FileNotFoundError(f"could not load Stable Diffusion from {name!r}: {exc}.{_offline_hint()}") from exc
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

