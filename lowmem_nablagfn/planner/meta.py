"""The configuration's models on the ``meta`` device: exact weight bytes, no memory, no download.

:func:`build_meta` builds the UNet with its LoRA adapter, the VAE, the text encoder(s), the flow model
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

    if model in BUILTIN_CONFIGS:
        return builtin_configs(model), model
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
        path = local / part / "config.json"
        if not path.is_file():
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(model, f"{part}/config.json", revision=revision)
                path = Path(hit) if isinstance(hit, str) else None
            except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
                path = None
        if path is None or not path.is_file():
            name = "sdxl-random" if "xl" in model.lower() else "sd15-random"
            what = "SDXL base" if name == "sdxl-random" else "SD 1.5"
            return builtin_configs(name), f"{model} (not found locally: {what} architecture assumed)"
        files[part] = json.loads(path.read_text())
    out = {"unet": files["unet"], "vae": files["vae"], "text": files["text_encoder"]}
    if sdxl:
        out["text_2"] = files["text_encoder_2"]
    return out, model


@dataclass
class Models:
    """The configuration's models (meta or fake tensors) and what the planner needs of them."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    flow_model: Optional[nn.Module]
    reward: nn.Module
    lora_params: List[nn.Parameter]
    latent_shape: Tuple[int, int, int]
    text_shape: Tuple[int, int]
    source: str
    text_encoder_2: Optional[nn.Module] = None  # SDXL's OpenCLIP bigG (CLIPTextModelWithProjection)

    @property
    def text_encoders(self) -> List[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])


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
    with torch.device("meta"), quiet():
        parts = instantiate(configs)
        trainable = prepare_for_training(cfg, parts)  # what the trainer's set-up adds: one function
        lora_params, flow, latent_shape = trainable.lora_params, trainable.flow_model, trainable.latent_shape
        reward = build_reward(rcfg, "meta")
    text_shape = (parts.text_encoder.config.max_position_embeddings, parts.prompt_embed_dim)
    return Models(parts.unet, parts.vae, parts.text_encoder, flow, reward, lora_params, latent_shape, text_shape,
                  source, text_encoder_2=parts.text_encoder_2)


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
    unet_frozen = sum(p.numel() * p.element_size() for p in m.unet.parameters() if id(p) not in lora_ids)
    unet_frozen += sum(b.numel() * b.element_size() for b in m.unet.buffers())
    trainable = [p.numel() for p in m.lora_params]
    if m.flow_model is not None:
        trainable += [p.numel() for p in m.flow_model.parameters()]
    # on an accelerator, what the memory plan keeps in host memory is not on the device (the VAE
    # encoder: training only decodes; offloaded text encoders are a knob, counted by predict)
    from ..models import vae_encoder_modules

    vae_host = 0 if cfg.device == "cpu" else sum(nbytes(x) for x in vae_encoder_modules(m.vae))
    return {
        "unet": unet_frozen, "lora": sum(p.numel() * 4 for p in m.lora_params),
        "vae": nbytes(m.vae) - vae_host,
        "text_encoder": sum(nbytes(t) for t in m.text_encoders), "flow": nbytes(m.flow_model),
        "reward": nbytes(m.reward),
        "trainable_numels": trainable, "latent_shape": list(m.latent_shape), "text_shape": list(m.text_shape),
        "text_itemsize": next(m.text_encoder.parameters()).element_size(),
        "reward_has_blocks": hasattr(m.reward, "set_checkpointing"),
    }


def arch_key(cfg: Config, m: Models) -> dict:
    """Everything the traced activations depend on (not the memory knobs, not the batch sizes)."""
    key = {
        "version": PROBE_VERSION, "unet": _clean(m.unet.config), "vae": _clean(m.vae.config),
        "text": m.text_encoder.config.hidden_size,
        # bf16 and fp16 trace to the same bytes: the key holds the width, not the name
        "frozen_itemsize": torch.empty((), dtype=DTYPES[cfg.training.mixed_precision]).element_size(),
        "resolution": cfg.sampling.resolution, "lora": [cfg.model.lora.rank, sorted(cfg.model.lora.target_modules)],
        "flow": list(cfg.model.flow_block_widths),
        "reward": [cfg.reward.name, type(m.reward).__name__, sum(p.numel() for p in m.reward.parameters()),
                   cfg.reward.weight_dtype],
    }
    if cfg.reward.mix:  # a mixture: its components in order (their weights do not change the activations)
        key["reward"].append(list(cfg.reward.mix))
    if m.text_encoder_2 is not None:  # SDXL only, so that SD 1.x keys (and the shipped hashes) stay as they were
        key["text_2"] = m.text_encoder_2.config.hidden_size
        key["vae_itemsize"] = next(m.vae.parameters()).element_size()  # upcast under fp16
    return key


def key_hash(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

