"""Single-file checkpoints (``.safetensors`` / ``.ckpt``) in the original A1111 / ComfyUI layout.

Hobbyists keep Stable Diffusion as one file with the original (LDM / SGM) names
(``model.diffusion_model.…``, ``first_stage_model.…``, ``cond_stage_model.…`` or
``conditioner.embedders.{0,1}.…``).  diffusers' ``from_single_file`` converts such a file, but it
looks the component configs up on the hub; here they come from the package instead (the same dicts
that build the built-in random models, :data:`~lowmem_nablagfn.models.builtin.BUILTIN_CONFIGS`), written to
a temporary diffusers-layout folder and passed as ``config=`` — offline, no hub look-up.

Identification (before anything is loaded): the family from marker keys (SD 1.x: a CLIP text
encoder under ``cond_stage_model.transformer``; SDXL base: two encoders under
``conditioner.embedders``), then the architecture whose widths (UNet ``conv_in`` channels, text
widths) match the file — the real SD 1.5 / SDXL base configs, or the tiny test models.  SD 2.x,
the SDXL refiner, inpainting UNets and anything else are refused with a message saying what the
file looks like.

Marker keys (empty tensors some tools, ComfyUI first, write beside the weights, since the layout
itself cannot say what the model predicts): ``v_pred`` makes the scheduler config
``prediction_type="v_prediction"``, which the trainer supports (:mod:`~lowmem_nablagfn.diffusion`); markers of
schedules it does not follow (:data:`UNSUPPORTED_MARKERS`: zero terminal SNR, EDM) are refused rather
than trained as epsilon models.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from ..config import SINGLE_FILE_SUFFIXES  # noqa: F401 - defined where validation reads it (no torch there)
from .builtin import BUILTIN_CONFIGS
from .parts import SDParts
from ..tokenizer import clip_tokenizer
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD15_TEXT = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
SDXL_TEXT = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
SDXL_TEXT_2 = "conditioner.embedders.1.model.ln_final.weight"
#: family -> built-in architectures a file of that family may have (real one first)
CANDIDATES = {"sd15": ("sd15-random", "tiny"), "sdxl": ("sdxl-random", "tiny-sdxl")}
#: the marker key of a v-prediction file
V_PRED = "v_pred"
#: marker keys of schedules the trainer does not follow -> what they mean
UNSUPPORTED_MARKERS = {
    "ztsnr": "zero terminal SNR (betas rescaled so that the last timestep is pure noise), a schedule the "
             "trainer's samplers do not follow (SDE-DPM-Solver++ has no rescaled betas)",
    "edm_vpred.sigma_max": "an EDM v-prediction model (CosXL: continuous sigmas, no DDPM timesteps)",
    "edm_mean": "an EDM model with latent mean/std (Playground v2.5)",
}


class SingleFileError(ValueError):
    """The file is not a Stable Diffusion checkpoint this project can load."""


@dataclass
class Identified:
    """What :func:`identify` found: ``family`` (``sd15`` / ``sdxl``), the matching built-in
    architecture's name, its component configs (``unet``, ``vae``, ``text``, ``text_2``) and the
    scheduler config (SD's, with ``prediction_type`` from the file's ``v_pred`` marker)."""

    family: str
    architecture: str
    configs: dict
    scheduler_config: dict


def read_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape, without reading the weights of a ``.safetensors`` file."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise SingleFileError(f"{path}: not a readable .safetensors file ({exc})") from None
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001
        raise SingleFileError(f"{path}: not a readable .ckpt (torch) file ({str(exc).splitlines()[0]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def identify(path: str | Path) -> Identified:
    """Family and architecture of a single-file checkpoint; :class:`SingleFileError` if unknown."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SingleFileError(f"{path}: no such file")
    shapes = read_shapes(path)
    if SDXL_TEXT_2 in shapes and SDXL_TEXT in shapes:
        family, widths = "sdxl", (shapes[SDXL_TEXT][0], shapes[SDXL_TEXT_2][0])
    elif SD15_TEXT in shapes:
        family, widths = "sd15", (shapes[SD15_TEXT][0],)
    else:
        if "cond_stage_model.model.ln_final.weight" in shapes:
            what = "an SD 2.x checkpoint (OpenCLIP-H text encoder): not supported"
        elif SDXL_TEXT_2.replace("embedders.1", "embedders.0") in shapes:
            what = "an SDXL refiner (one OpenCLIP encoder): not supported, use SDXL base"
        elif any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in shapes):
            what = "an LDM-layout file without a known text encoder (a UNet- or VAE-only file?)"
        elif any(k.startswith(("lora_", "lora_unet_")) or ".lora" in k for k in shapes):
            what = "a LoRA, not a model (give it to `lowmem-nablagfn eval` / export instead)"
        else:
            what = f"no Stable Diffusion keys (first keys: {sorted(shapes)[:3]})"
        raise SingleFileError(f"cannot identify {path}: {what}. pretrained.model accepts single files "
                              f"of SD 1.x and SDXL base in the A1111 / ComfyUI layout, diffusers "
                              f"directories and hub ids")
    if UNET_IN not in shapes:
        raise SingleFileError(f"cannot identify {path}: {family} text encoder(s) but no UNet "
                              f"({UNET_IN} is missing)")
    for marker, what in UNSUPPORTED_MARKERS.items():
        if marker in shapes:
            raise SingleFileError(f"{path} carries the {marker!r} marker key: {what}; not supported. The trainer "
                                  f"follows SD's DDPM schedule with epsilon or v-prediction: use such a model")
    from ..diffusion import SD_SCHEDULER_CONFIG

    scheduler_config = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction" if V_PRED in shapes else "epsilon"}
    unet_in = shapes[UNET_IN]
    for name in CANDIDATES[family]:
        cfgs = BUILTIN_CONFIGS[name]()
        want = (cfgs["text"]["hidden_size"],) + ((cfgs["text_2"]["hidden_size"],) if family == "sdxl" else ())
        if (unet_in[0] == cfgs["unet"]["block_out_channels"][0] and unet_in[1] == cfgs["unet"]["in_channels"]
                and widths == want):
            return Identified(family, name, cfgs, scheduler_config)
    raise SingleFileError(f"cannot identify {path}: a {family} checkpoint, but its UNet input "
                          f"{unet_in} / text widths {widths} match no shipped configuration "
                          f"({', '.join(CANDIDATES[family])}); inpainting and other variants are not supported")


def write_config_dir(ident: Identified, root: Path) -> Path:
    """A diffusers-layout folder of configs only (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder[_2]/``, ``scheduler/``): what ``from_single_file(config=…)`` reads."""
    import diffusers
    from transformers import CLIPTextConfig

    sdxl = ident.family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    if sdxl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    files = {"model_index.json": index,
             "unet/config.json": {"_class_name": "UNet2DConditionModel", **ident.configs["unet"]},
             "vae/config.json": {"_class_name": "AutoencoderKL", **ident.configs["vae"]},
             "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", **ident.scheduler_config}}
    for name, obj in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(obj, indent=1, default=list))
    texts = [("text_encoder", "text", "CLIPTextModel")]
    if sdxl:
        texts.append(("text_encoder_2", "text_2", "CLIPTextModelWithProjection"))
    for folder, key, arch in texts:
        config = CLIPTextConfig(**ident.configs[key])
        config.architectures = [arch]
        config.save_pretrained(str(root / folder))
    return root


def load_single_file(path: str | Path) -> SDParts:
    """:class:`~lowmem_nablagfn.models.SDParts` of a single-file SD 1.x / SDXL checkpoint, offline."""
    import logging

    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path).expanduser()
    ident = identify(path)
    sdxl = ident.family == "sdxl"
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!") if sdxl else None
    extra = ({"tokenizer_2": tokenizer_2, "add_watermarker": False} if sdxl else
             {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    level, bars = logging.getLogger("diffusers").level, dlog.is_progress_bar_enabled()
    with tempfile.TemporaryDirectory() as tmp:
        write_config_dir(ident, Path(tmp))
        try:
            logging.getLogger("diffusers").setLevel(logging.ERROR)
            dlog.disable_progress_bar()
            pipe = cls.from_single_file(str(path), config=tmp, local_files_only=True, tokenizer=tokenizer,
                                        scheduler=DDIMScheduler.from_config(ident.scheduler_config), **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise SingleFileError(f"{path} looks like {ident.family} ({ident.architecture} shapes) but "
                                  f"diffusers could not convert it: {str(exc).splitlines()[0]}") from exc
        finally:
            logging.getLogger("diffusers").setLevel(level)
            if bars:
                dlog.enable_progress_bar()
    return SDParts(pipe.unet, pipe.vae, pipe.text_encoder, tokenizer, dict(ident.scheduler_config),
                   pipe.text_encoder_2 if sdxl else None, tokenizer_2)
