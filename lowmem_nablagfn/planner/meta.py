"""The configuration's models on the ``meta`` device: exact weight bytes, no memory, no download.

:func:`build_meta` builds the denoiser (UNet, or SD 3.x's transformer) with its LoRA adapter, the VAE,
the text encoder(s) (none for SD 3.x: the prompt table replaces them), the flow model
and the reward model with the trainer's helpers (frozen parts cast to ``training.mixed_precision``);
:func:`static_sizes` reads the resident bytes and the trainable numels off them; :func:`arch_key` is
everything the traced activations depend on (its hash names the cached and shipped profiles).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..config import Config
from ..dtypes import DTYPES

#: Version of the probes (:mod:`.trace`): part of every architecture key, so bumping it retraces.
PROBE_VERSION = 3  # 3: checkpoint_vae checkpoints the decoder per layer (models.checkpointing)

def _clean(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
            if not k.startswith("_") and k not in ("sample_size",)}


def sd_configs(model: str, revision: Optional[str] = None) -> Tuple[dict, dict, dict, str]:
    """(unet, vae, text-encoder) configs of ``pretrained.model`` without loading weights (SDXL's
    second text encoder: :func:`model_configs`)."""
    c, source = model_configs(model, revision)
    return c["unet"], c["vae"], c["text"], source


def model_configs(model: str, revision: Optional[str] = None) -> Tuple[dict, str]:
    """Component configs of ``pretrained.model`` (``unet``, ``vae``, ``text`` and, for SDXL,
    ``text_2``) without loading weights, and a description of where they came from.

    Built-in names use their configs; a single-file checkpoint the architecture it is identified
    as; a local diffusers directory or a cached hub repo its JSON files; an uncached hub id falls
    back to SDXL base's architecture when its name says ``xl``, else to SD 1.5's (with a note).
    """
    from ..models import BUILTIN_CONFIGS, SINGLE_FILE_SUFFIXES, builtin_configs
    from ..models.sd3 import SD3_BUILTIN_CONFIGS, sd3_builtin_configs

    if model in SD3_BUILTIN_CONFIGS:
        return sd3_builtin_configs(model), model
    if model in BUILTIN_CONFIGS:
        return builtin_configs(model), model
    sd3 = _sd3_configs(model, revision)
    if sd3 is not None:
        return sd3
    local = Path(model).expanduser()
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES and local.is_file():
        from ..models import identify

        ident = identify(local)
        return ident.configs, f"{model} ({ident.architecture} architecture)"
    files = {}
    sdxl = (local / "text_encoder_2" / "config.json").is_file()
    if not local.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            sdxl = isinstance(try_to_load_from_cache(model, "text_encoder_2/config.json", revision=revision), str)
        except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
            pass
    for part in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if sdxl else ()):
        files[part] = _component_config(model, part, revision)
        if files[part] is None:
            name = "sdxl-random" if "xl" in model.lower() else "sd15-random"
            what = "SDXL base" if name == "sdxl-random" else "SD 1.5"
            return builtin_configs(name), f"{model} (not found locally: {what} architecture assumed)"
    out = {"unet": files["unet"], "vae": files["vae"], "text": files["text_encoder"]}
    if sdxl:
        out["text_2"] = files["text_encoder_2"]
    return out, model


def _sd3_configs(model: str, revision: Optional[str]) -> Optional[Tuple[dict, str]]:
    """An SD 3.x model's ``transformer`` and ``vae`` configs (the text encoders are never resident: the
    prompt table replaces them), or None for another family.  A local directory or cached hub snapshot
    is read; an uncached hub id whose name says ``stable-diffusion-3`` is SD 3.5 Medium's architecture."""
    from ..config.loading import is_sd3_family
    from ..models.sd3 import sd3_builtin_configs

    if not is_sd3_family(model, revision):
        return None
    files = {part: _component_config(model, part, revision) for part in ("transformer", "vae")}
    if None in files.values():
        return sd3_builtin_configs("sd35m-random"), f"{model} (not found locally: SD 3.5 Medium architecture assumed)"
    return files, model


def _component_config(model: str, part: str, revision: Optional[str]) -> Optional[dict]:
    """``part/config.json`` of a local diffusers directory or a cached hub snapshot; None when neither has it."""
    path = Path(model).expanduser() / part / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model, f"{part}/config.json", revision=revision)
            path = Path(hit) if isinstance(hit, str) else None
        except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
            path = None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


@dataclass
class Models:
    """The configuration's models (meta or fake tensors) and what the planner needs of them."""

    denoiser: nn.Module
    """The network LoRA adapts: the UNet (SD 1.x / SDXL) or the MMDiT transformer (SD 3.x)."""
    vae: nn.Module
    text_encoder: Optional[nn.Module]
    """None for SD 3.x: its prompts come from the prompt table, no text encoder is resident."""
    flow_model: Optional[nn.Module]
    reward: nn.Module
    lora_params: List[nn.Parameter]
    latent_shape: Tuple[int, int, int]
    text_shape: Tuple[int, int]
    source: str
    text_encoder_2: Optional[nn.Module] = None  # SDXL's OpenCLIP bigG (CLIPTextModelWithProjection)
    pooled_dim: int = 0
    """SD 3.x: width of the pooled prompt embedding (SD 3.5: 2048; SDXL's is read off its encoder)."""
    prompt_rows: int = 0
    """SD 3.x: rows of the run's prompt table (its prompts and the CFG row), held in host memory."""
    family: str = "unet"
    """The model family's name (:attr:`~lowmem_nablagfn.models.family.UNetFamily.name`, ``SD3Family.name``)."""

    @property
    def is_sd3(self) -> bool:
        return self.family == "sd3"

    @property
    def text_encoders(self) -> List[nn.Module]:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]


def build_meta(cfg: Config) -> Models:
    """Build the models of ``cfg`` on the meta device with the trainer's own helpers
    (:func:`~lowmem_nablagfn.models.instantiate`, :func:`~lowmem_nablagfn.models.prepare_for_training`,
    ``build_reward``): exact parameter counts and dtypes, no memory."""
    from ..models import instantiate, prepare_for_training
    from ..rewards import build_reward, weight_free

    configs, source = model_configs(cfg.pretrained.model, cfg.pretrained.revision)
    vae_json = Path(cfg.pretrained.vae or "").expanduser() / "config.json"
    if cfg.pretrained.vae and vae_json.is_file():  # pretrained.vae (e.g. an fp16-fix VAE: not upcast)
        configs = dict(configs, vae=json.loads(vae_json.read_text()))
    rcfg = weight_free(copy.deepcopy(cfg.reward))  # the architecture of the real weights, without the files
    sd3 = "transformer" in configs
    with torch.device("meta"), quiet():
        parts = _instantiate_sd3(cfg, configs) if sd3 else instantiate(configs)
        trainable = prepare_for_training(cfg, parts)  # what the trainer's set-up adds: one function
        lora_params, flow, latent_shape = trainable.lora_params, trainable.flow_model, trainable.latent_shape
        reward = build_reward(rcfg, "meta")
    if sd3:  # no text encoder: the prompt table's rows, (77 + T5 tokens, joint width) and pooled
        from ..models.family import family_of, run_prompts

        return Models(parts.denoiser, parts.vae, None, flow, reward, lora_params, latent_shape,
                      (parts.prompt_length, parts.prompt_embed_dim), source,
                      pooled_dim=parts.transformer_config["pooled_projection_dim"],
                      prompt_rows=len(run_prompts(cfg.prompts.set)) + 1, family=family_of(parts).name)
    text_shape = (parts.text_encoder.config.max_position_embeddings, parts.prompt_embed_dim)
    return Models(parts.denoiser, parts.vae, parts.text_encoder, flow, reward, lora_params, latent_shape, text_shape,
                  source, text_encoder_2=parts.text_encoder_2)


def _instantiate_sd3(cfg: Config, configs: dict):
    """The transformer and VAE of an SD 3.x model (what a run keeps: :func:`~lowmem_nablagfn.models.load_run_parts`)."""
    from ..models.sd3 import MODEL_PARTS, TextOptions, instantiate_sd3

    return instantiate_sd3(configs, MODEL_PARTS, text_options=TextOptions(cfg.pretrained.max_sequence_length,
                                                                          cfg.pretrained.t5))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def nbytes(module: Optional[nn.Module]) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def static_sizes(cfg: Config, m: Models) -> dict:
    """Bytes of the weights and the trainable parameters' numels (for gradients and optimiser state)."""
    lora_ids = {id(p) for p in m.lora_params}
    unet_frozen = sum(p.numel() * p.element_size() for p in m.denoiser.parameters() if id(p) not in lora_ids)
    unet_frozen += sum(b.numel() * b.element_size() for b in m.denoiser.buffers())
    trainable = [p.numel() for p in m.lora_params]
    if m.flow_model is not None:
        trainable += [p.numel() for p in m.flow_model.parameters()]
    # on an accelerator, what the memory plan keeps in host memory is not on the device (the VAE
    # encoder: training only decodes; offloaded text encoders are a knob, counted by predict)
    from ..models import vae_encoder_modules

    vae_host = 0 if cfg.device == "cpu" else sum(nbytes(x) for x in vae_encoder_modules(m.vae))
    text_itemsize = (next(m.text_encoder.parameters()).element_size() if m.text_encoder is not None
                     else DTYPES[cfg.training.mixed_precision].itemsize)  # SD 3.x: the prompt table's dtype
    # one row's conditioning; SD 3.x adds its pooled embedding (SDXL's pooled row and time ids, 2.6 kB,
    # are left out as they always were, so that its shipped predictions stay as they are)
    text_row = (m.text_shape[0] * m.text_shape[1] + m.pooled_dim) * text_itemsize
    return {
        "unet": unet_frozen, "lora": sum(p.numel() * 4 for p in m.lora_params),
        "vae": nbytes(m.vae) - vae_host,
        "text_encoder": sum(nbytes(t) for t in m.text_encoders), "flow": nbytes(m.flow_model),
        "reward": nbytes(m.reward),
        "trainable_numels": trainable, "latent_shape": list(m.latent_shape), "text_shape": list(m.text_shape),
        "text_itemsize": text_itemsize, "text_row": text_row,
        # SD 3.x: the run's prompt table in host memory (the device's own on the CPU)
        "prompt_table": m.prompt_rows * text_row,
        "reward_has_blocks": hasattr(m.reward, "set_checkpointing"),
    }


def arch_key(cfg: Config, m: Models) -> dict:
    """Everything the traced activations depend on (not the memory knobs, not the batch sizes)."""
    key = {
        "version": PROBE_VERSION, "unet": _clean(m.denoiser.config), "vae": _clean(m.vae.config),
        # SD 3.x: no text encoder; the conditioning's shape (77 + T5 tokens, width, pooled width)
        "text": m.text_encoder.config.hidden_size if m.text_encoder is not None else [*m.text_shape, m.pooled_dim],
        # bf16 and fp16 trace to the same bytes: the key holds the width, not the name
        "frozen_itemsize": torch.empty((), dtype=DTYPES[cfg.training.mixed_precision]).element_size(),
        "resolution": cfg.sampling.resolution, "lora": [cfg.model.lora.rank, sorted(cfg.model.lora.target_modules)],
        "flow": list(cfg.model.flow_block_widths),
        "reward": [cfg.reward.name, type(m.reward).__name__, sum(p.numel() for p in m.reward.parameters()),
                   cfg.reward.weight_dtype],
    }
    if cfg.reward.mix:  # a mixture: its components in order (their weights do not change the activations)
        key["reward"].append(list(cfg.reward.mix))
    if m.is_sd3:  # the family, and the VAE's own dtype
        key["family"] = "sd3"
        key["vae_itemsize"] = next(m.vae.parameters()).element_size()
    if m.text_encoder_2 is not None:  # SDXL only, so that SD 1.x keys (and the shipped hashes) stay as they were
        key["text_2"] = m.text_encoder_2.config.hidden_size
        key["vae_itemsize"] = next(m.vae.parameters()).element_size()  # upcast under fp16
    return key


def key_hash(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

