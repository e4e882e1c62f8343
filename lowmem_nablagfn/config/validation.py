"""Checking a configuration: :func:`validate` reports every bad value at once, each with its reason
and a fix, before any model is built."""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .schema import BUILTIN_MODELS, SD3_BUILTIN_MODELS, SINGLE_FILE_SUFFIXES, Config, ConfigError


def norm_groups(block_widths: Sequence[int]) -> int:
    """GroupNorm groups of every block of the flow model: 32, or the smallest width when below 32."""
    return min(32, min(block_widths))


def block_widths_problem(block_widths: Sequence[int]) -> Optional[str]:
    """Why ``model.flow_block_widths`` cannot build a flow model (one line with the fix), or None."""
    widths = list(block_widths)
    if not widths or any(w <= 0 or w % 8 for w in widths):
        return f"model.flow_block_widths={widths} must be positive multiples of 8 (e.g. [64, 128, 256, 256])"
    groups = norm_groups(widths)
    bad = [w for w in widths if w % groups]
    if bad:
        return (f"model.flow_block_widths={widths}: {bad} not divisible by {groups}, the GroupNorm groups of "
                f"every block (32, or the smallest width when below 32); use multiples of 32 (e.g. [64, 128, "
                f"256, 256]) or multiples of the smallest width (e.g. [16, 32])")
    return None


def _is_local_path(name: str) -> bool:
    """A hub id is ``owner/name``; anything else (or an existing path) is a local directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


#: What a local diffusers model directory holds (what models.load_sd reads, SDXL's second encoder aside).
DIFFUSERS_PARTS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                   "scheduler/scheduler_config.json")
#: The same for SD 3.x (models.sd3.load_sd3: a transformer instead of the UNet; T5 only with pretrained.t5).
SD3_DIFFUSERS_PARTS = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                       "tokenizer", "scheduler/scheduler_config.json")


def is_sd3_index(index: dict) -> bool:
    """Whether a pipeline's ``model_index.json`` is an SD 3.x one (``StableDiffusion3Pipeline``)."""
    return str(index.get("_class_name", "")).startswith("StableDiffusion3")


def is_sd3_model(name: str, revision: Optional[str] = None) -> Optional[bool]:
    """Whether ``pretrained.model`` is SD 3.x, from what is known without loading anything: the built-in
    names, a single file (never), a local directory's or a cached hub snapshot's ``model_index.json``.
    None: unknown here (an uncached hub id; loading asks the hub, :func:`~lowmem_nablagfn.models.is_sd3`)."""
    import json

    if name in BUILTIN_MODELS or Path(name).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return name in SD3_BUILTIN_MODELS
    try:
        if _is_local_path(name):
            index = Path(name).expanduser() / "model_index.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            index = Path(try_to_load_from_cache(name, "model_index.json", revision=revision))  # TypeError: not cached
        return is_sd3_index(json.loads(index.read_text()))
    except (OSError, ValueError, TypeError):  # no index (yet), or a malformed id / file: "not known here"
        return None


def is_plain_name(name: str) -> bool:
    """A directory name that stays inside its parent: not empty, not ``.``/``..``, no path separator."""
    import os

    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    return name not in ("", ".", "..") and not any(sep in name for sep in separators)


def _nonfinite_floats(node, prefix: str = "") -> List[str]:
    """Dotted names of the float values (lists included) of a config tree that are inf or nan."""
    import math

    out = []
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            out += _nonfinite_floats(value, f"{prefix}{f.name}.")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                out.append(f"{prefix}{f.name}={v}")
                break
    return out


def monitor_problems(cfg: Config) -> List[str]:
    """What makes ``monitor.*`` unusable (one line each, with the fix); [] when it is fine or off."""
    from ..rewards import known_reward, reward_names
    from ..rewards.custom import check as check_custom
    from ..rewards.custom import is_custom
    from ..rewards.mixture import MIX

    mon, errors = cfg.monitor, []
    for name in ("every", "patience", "num_prompts"):
        value = getattr(mon, name)
        if value < 1:
            errors.append(f"monitor.{name}={value} must be a positive integer")
    if mon.images_per_prompt < 2:
        errors.append(f"monitor.images_per_prompt={mon.images_per_prompt} must be >= 2: the diversity it reports "
                      f"compares the images of one prompt")
    seen, trained = set(), {cfg.reward.name, *(getattr(cfg.reward, "mix", None) or {})}  # a mixture's parts too
    for name in mon.rewards:
        if name in trained or name == MIX:
            errors.append(f"monitor.rewards lists {name!r}, the reward being trained: the monitor watches rewards "
                          f"that are not trained on (the trained one is reported anyway, as monitor/reward); remove it")
        elif name in seen:
            errors.append(f"monitor.rewards lists {name!r} twice; give each reward once")
        elif is_custom(name):
            from .schema import RewardConfig

            side = max(cfg.sampling.resolution, 8)
            errors += [f"monitor.rewards: {e}" for e in check_custom(RewardConfig(name=name), side)]
        elif not known_reward(name):
            errors.append(f"monitor.rewards lists {name!r}, an unknown reward; choose from "
                          f"{', '.join(reward_names())}, or your own as path/to/my_reward.py:build")
        seen.add(name)
    for key in ("checkpoints", "backbones"):
        for name in getattr(mon, key):
            if name not in mon.rewards:
                errors.append(f"monitor.{key} names {name!r}, which monitor.rewards does not list; add it there "
                              f"or remove it")
            elif name.startswith("builtin:") or is_custom(name):
                errors.append(f"monitor.{key}.{name}: {name} loads no weights of ours; remove it")
    return errors


class Problems(list):
    """The problems found so far, one line each (the value, why, the fix)."""

    def need(self, ok: bool, msg: str) -> None:
        """Add ``msg`` unless ``ok``."""
        if not ok:
            self.append(msg)


def value_problems(cfg: Config) -> List[str]:
    """Every field on its own: ranges, known choices, finite numbers."""
    errors = Problems()
    need = errors.need

    s, t, m, mem = cfg.sampling, cfg.training, cfg.model, cfg.memory
    for name in _nonfinite_floats(cfg):
        errors.append(f"{name} is not finite; give a finite number (no inf or nan anywhere in the configuration)")
    need(t.max_nonfinite_updates > 0,
         f"training.max_nonfinite_updates={t.max_nonfinite_updates} must be a positive integer (3: stop "
         f"after three skipped updates in a row)")
    for name, value in [("sampling.batch_size", s.batch_size),
                        ("sampling.num_batches_per_epoch", s.num_batches_per_epoch),
                        ("sampling.num_steps", s.num_steps), ("sampling.resolution", s.resolution),
                        ("training.batch_size", t.batch_size),
                        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps),
                        ("training.num_epochs", t.num_epochs), ("model.lora.rank", m.lora.rank),
                        ("logging.save_every", cfg.logging.save_every),
                        ("logging.keep_checkpoints", cfg.logging.keep_checkpoints)]:
        need(value > 0, f"{name}={value} must be a positive integer")
    for name, value in [("memory.input_grad_chunk", mem.input_grad_chunk),
                        ("memory.train_chunk", mem.train_chunk),
                        ("logging.sample_grid_seeds", cfg.logging.sample_grid_seeds)]:
        need(value >= 0, f"{name}={value} must be >= 0 (0 = off / whole batch)")
    need(0 < m.timestep_fraction <= 1,
         f"model.timestep_fraction={m.timestep_fraction} must lie in (0, 1] (0.1 for 50 DDPM steps; "
         f"0.1, 0.2 or 0.25 for 20 DPM-Solver steps)")
    need(0 <= m.pretrained_strength <= 1,
         f"model.pretrained_strength={m.pretrained_strength} must lie in [0, 1]")
    for name, value in [("model.reward_scale", m.reward_scale), ("training.learning_rate", t.learning_rate),
                        ("training.flow_learning_rate", t.flow_learning_rate),
                        ("training.adam_epsilon", t.adam_epsilon), ("sampling.eta", s.eta)]:
        need(value > 0, f"{name}={value} must be > 0")
    for name, value in [("model.unet_reg_scale", m.unet_reg_scale),
                        ("model.reverse_loss_scale", m.reverse_loss_scale),
                        ("training.adam_weight_decay", t.adam_weight_decay),
                        ("training.flow_weight_decay", t.flow_weight_decay)]:
        need(value >= 0, f"{name}={value} must be >= 0")
    for name, value in [("training.adam_beta1", t.adam_beta1), ("training.adam_beta2", t.adam_beta2)]:
        need(0 <= value < 1, f"{name}={value} must lie in [0, 1)")
    for name, value, allowed in [
        ("sampling.scheduler", s.scheduler, ("ddim", "dpm-solver", "flow-sde")),
        ("model.reward_adaptive_mode", m.reward_adaptive_mode, ("squared", "sqrt")),
        ("model.lora.init", m.lora.init, ("gaussian", "default")),
        ("training.optimizer", t.optimizer, ("adamw", "adamw8bit", "paged_adamw8bit")),
        ("training.mixed_precision", t.mixed_precision, ("bf16", "fp16", "no")),
        ("reward.weight_dtype", cfg.reward.weight_dtype, ("fp32", "bf16", "fp16")),
        ("memory.transition_dtype", mem.transition_dtype, ("fp32", "bf16")),
        ("memory.mode", mem.mode, ("optimized", "official", "naive")),
        ("memory.attention", mem.attention, ("sdpa", "xformers", "math")),
        ("distributed.backend", cfg.distributed.backend, ("ddp", "deepspeed")),
        ("prompts.split", cfg.prompts.split, ("train", "eval")),
        ("device", cfg.device, ("auto", "cpu", "cuda")),
    ]:
        need(value in allowed, f"{name}={value!r} is unknown; choose one of {', '.join(allowed)}")
    need(cfg.distributed.zero_stage in (1, 2),
         f"distributed.zero_stage={cfg.distributed.zero_stage} is not supported; use 2 (or 1). Stage 0 "
         f"is plain gradient averaging (distributed.backend=ddp); stage 3 would partition the LoRA "
         f"weights, which the frozen UNet uses outside DeepSpeed's forward")
    from ..rewards.prompts import known_prompt_set

    need(known_prompt_set(cfg.prompts.set),
         f"prompts.set={cfg.prompts.set!r} is neither a built-in set (simple_animals, "
         f"hpd_photo_painting, drawbench, imagenet) nor an existing file")
    widths_problem = block_widths_problem(m.flow_block_widths)
    need(widths_problem is None, widths_problem or "")
    need(not m.lora.target_modules == [], "model.lora.target_modules is empty; name at least one module")

    return errors


def batch_problems(cfg: Config) -> List[str]:
    """The sampling and training batches, steps and subsampling together (the row arithmetic of
    ``memory.Batches`` must be exact: every epoch a whole number of updates)."""
    from ..subsample import SubsampleError, check_blocks, num_blocks

    errors = Problems()
    need = errors.need

    s, t, m = cfg.sampling, cfg.training, cfg.model
    if s.resolution > 0:
        need(s.resolution % 8 == 0, f"sampling.resolution={s.resolution} must be a multiple of 8")

    if s.num_steps > 0 and 0 < m.timestep_fraction <= 1:
        try:
            check_blocks(s.num_steps, num_blocks(s.num_steps, m.timestep_fraction), s.low_var_subsampling)
        except SubsampleError as exc:
            errors.append(f"model.timestep_fraction / sampling.num_steps: {exc}")

    if min(s.batch_size, s.num_batches_per_epoch, t.batch_size, t.gradient_accumulation_steps) > 0:
        per_epoch = s.batch_size * s.num_batches_per_epoch
        if per_epoch % t.batch_size:
            errors.append(
                f"training.batch_size={t.batch_size} does not divide the {per_epoch} trajectories "
                f"sampled per epoch (sampling.batch_size={s.batch_size} x "
                f"num_batches_per_epoch={s.num_batches_per_epoch}); use a divisor of {per_epoch}")
        elif (per_epoch // t.batch_size) % t.gradient_accumulation_steps:
            n = per_epoch // t.batch_size
            errors.append(
                f"training.gradient_accumulation_steps={t.gradient_accumulation_steps} does not divide "
                f"the {n} training batches per epoch ({per_epoch} trajectories / batch {t.batch_size}); "
                f"use a divisor of {n}")
    return errors


def model_problems(cfg: Config) -> List[str]:
    """``pretrained.*``: a built-in name, a single file, a diffusers directory (its parts and its
    prediction type, read now) or a hub id; a VAE directory; the sampler of the model's family (SD 3.x:
    ``flow-sde``, and only there) and its text options."""
    errors = Problems()
    need = errors.need

    model, pre, s = cfg.pretrained.model, cfg.pretrained, cfg.sampling
    sd3 = is_sd3_model(model, pre.revision)
    if sd3 is not None:  # the family decides the sampler: said before any weight loads
        need(sd3 == (s.scheduler == "flow-sde"), f"sampling.scheduler={s.scheduler!r} cannot sample pretrained.model="
             f"{model!r}: " + ("an SD 3.x model (flow matching, velocity) takes sampling.scheduler=flow-sde "
                               "(sampling.eta: its noise level a > 0; Flow-GRPO: 0.7)" if sd3 else
                               "flow-sde is for SD 3.x; use sampling.scheduler=ddim or dpm-solver"))
        need(sd3 or (pre.t5 and pre.max_sequence_length == 256), f"pretrained.t5 / pretrained.max_sequence_length "
             f"set the T5 encoder of SD 3.x models; pretrained.model={model!r} has none: remove them")
    need(1 <= pre.max_sequence_length <= 512, f"pretrained.max_sequence_length={pre.max_sequence_length} must lie "
         f"in [1, 512] (T5 tokens per prompt; StableDiffusion3Pipeline's default is 256)")
    if model not in BUILTIN_MODELS and Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES:
        need(Path(model).expanduser().is_file(),
             f"pretrained.model={model!r}: no such file; give an existing single-file checkpoint "
             f"(.safetensors / .ckpt, A1111 / ComfyUI layout), a diffusers directory or a hub id")
    elif model not in BUILTIN_MODELS and _is_local_path(model):
        local = Path(model).expanduser()
        expected = SD3_DIFFUSERS_PARTS if sd3 else DIFFUSERS_PARTS
        missing = [part for part in expected if not (local / part).exists()]
        listing = ", ".join(p if p.endswith(".json") and "/" not in p else p.split("/")[0] + "/" for p in expected)
        if not local.is_dir():
            errors.append(f"pretrained.model={model!r}: no such directory; give a local diffusers model directory "
                          f"(with unet/, vae/, text_encoder/, tokenizer/), a single .safetensors/.ckpt file, a hub "
                          f"id, or one of {', '.join(BUILTIN_MODELS)}")
        elif missing:
            errors.append(f"pretrained.model={model!r} is not a diffusers model directory: it lacks "
                          f"{', '.join(missing)}; give the folder that `save_pretrained` / `hf download` wrote "
                          f"({listing}), a single "
                          f".safetensors/.ckpt file or a hub id")
    scheduler_json = Path(model).expanduser() / "scheduler" / "scheduler_config.json"
    if model not in BUILTIN_MODELS and scheduler_json.is_file():  # a local model: its prediction type now
        import json

        from ..diffusion import check_scheduler_config

        try:
            check_scheduler_config(json.loads(scheduler_json.read_text()), f"pretrained.model={model!r}")
        except ValueError as exc:
            errors.append(str(exc))
    vae = cfg.pretrained.vae
    if vae and _is_local_path(vae):
        need((Path(vae).expanduser() / "config.json").is_file(),
             f"pretrained.vae={vae!r}: no diffusers VAE directory there (config.json + weights); give "
             f"one, a hub id, or leave it unset to keep the model's own VAE")
    return errors


def reward_problems(cfg: Config) -> List[str]:
    """``reward.*``: a known, packaged, custom or mixed reward, and the options each one uses."""
    from ..rewards import known_reward, reward_names
    from ..rewards.custom import check as check_custom
    from ..rewards.custom import is_custom
    from ..rewards.loading import random_size
    from ..rewards.mixture import MIX
    from ..rewards.mixture import problems as mixture_problems

    errors = Problems()
    need = errors.need

    s = cfg.sampling
    # a mixture's components are checked there (a custom one tried on one random image too); elsewhere
    # that reward.mix / checkpoints / backbones are empty
    errors += mixture_problems(cfg.reward, s.resolution if s.resolution > 0 else 64)
    if cfg.reward.name == MIX:
        pass
    elif is_custom(cfg.reward.name):  # the user's build(): imported and tried on one random image now
        errors += check_custom(cfg.reward, s.resolution if s.resolution > 0 else 64)
    else:
        need(known_reward(cfg.reward.name),
             f"reward.name={cfg.reward.name!r} is unknown; choose one of "
             f"{', '.join(reward_names())}, or your own as reward.name=path/to/my_reward.py:build "
             f"(docs/rewards-custom.md)")
    r = cfg.reward
    if r.antialias is not None and r.name != MIX:
        need(not r.name.startswith("builtin:") and not is_custom(r.name),
             f"reward.antialias={r.antialias} has no effect on {r.name} "
             f"({'a custom reward does its own resizing' if is_custom(r.name) else 'built-in rewards do not resize'}"
             f"); remove it")
    if is_custom(r.name):
        need(r.weight_dtype == "fp32", f"reward.weight_dtype={r.weight_dtype} is for the packaged reward models "
                                       f"(fp32 math on low-precision weights); a custom reward keeps the weights "
                                       f"its build() makes: remove it and cast inside build() if you want")
        for key in ("checkpoint", "backbone"):
            need(getattr(r, key) is None, f"reward.{key}={getattr(r, key)!r} is not used by a custom reward (its "
                                          f"build() takes no arguments and loads its own weights); remove it")
    elif r.name in ("pickscore", "clipscore"):  # a mixture's components: rewards.mixture.problems
        need(r.checkpoint is None or random_size(r.checkpoint) is not None,
             f"reward.checkpoint={r.checkpoint!r}: {r.name} is one transformers CLIP folder; pass it as "
             f"reward.backbone=DIR (or a hub id), and leave reward.checkpoint unset (or random / random:reduced)")
    if r.max_length is not None:
        need(r.name in ("imagereward", MIX), f"reward.max_length={r.max_length} is only used by reward.name=imagereward "
                                      f"(the others tokenise with their own fixed context); remove it")
        need(0 < r.max_length <= 512, f"reward.max_length={r.max_length} must lie in [1, 512] "
                                      f"(BERT's positions; 35 = ImageReward.score, 512 = the official ∇-GFlowNet code)")
    return errors


def run_problems(cfg: Config) -> List[str]:
    """``logging.*`` and ``distributed.*`` with the precision and optimiser they must agree with."""
    errors = Problems()
    need = errors.need

    t = cfg.training
    need(is_plain_name(cfg.logging.run_name),
         f"logging.run_name={cfg.logging.run_name!r} is not a plain name: the run directory is "
         f"logging.output_dir/logging.run_name, and a name with a path separator, '..' or '.' (or an empty "
         f"one) would put the run, and what --overwrite deletes, outside logging.output_dir="
         f"{cfg.logging.output_dir!r}; give a name such as 'sd15_aesthetic_2', and the location as logging.output_dir")
    if t.optimizer != "adamw" and cfg.distributed.backend == "deepspeed":
        errors.append(f"training.optimizer={t.optimizer!r} cannot be partitioned by DeepSpeed ZeRO; "
                      f"use training.optimizer=adamw with distributed.backend=deepspeed, or "
                      f"distributed.backend=ddp with 8-bit AdamW")
    if t.mixed_precision == "fp16" and cfg.distributed.backend == "deepspeed":
        errors.append("training.mixed_precision=fp16 with distributed.backend=deepspeed is not supported: the "
                      "fp16 loss scaler unscales and checks the gradients before the update, which ZeRO "
                      "partitions; use distributed.backend=ddp (fp16 loss scaling) or bf16")
    if cfg.distributed.offload_optimizer and cfg.distributed.backend != "deepspeed":
        errors.append("distributed.offload_optimizer=true needs distributed.backend=deepspeed (ZeRO-Offload); "
                      "with ddp, save optimiser memory with training.optimizer=adamw8bit instead")
    if cfg.distributed.backend == "deepspeed":
        import importlib.util

        need(importlib.util.find_spec("deepspeed") is not None,
             "distributed.backend=deepspeed but deepspeed is not installed: "
             "pip install 'lowmem-nablagfn[deepspeed]', or use distributed.backend=ddp")
    return errors


def validate(cfg: Config) -> Config:
    """Check every value; raise one :class:`ConfigError` listing each problem with its fix (every
    section's problems, before any model is built)."""
    errors: List[str] = []
    for problems in (value_problems, batch_problems, model_problems, reward_problems, run_problems,
                     monitor_problems):
        errors += problems(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg
