"""The configuration tree: one dataclass per section, every field documented, presets in YAML.

Defaults are the official ``default_config.py`` settings of ALGORITHM.md ("Official defaults"),
except the model and the reward, which stay offline-friendly (``pretrained.model=tiny``,
``reward.name=builtin:redness``, ``prompts.set=simple_animals``): the paper's runs are the
``sd15_a100x8*`` presets.  Batch arithmetic, per process::

    trajectories per epoch  = sampling.batch_size * sampling.num_batches_per_epoch
    training batches/epoch  = trajectories per epoch / training.batch_size
    optimiser steps/epoch   = training batches/epoch / training.gradient_accumulation_steps
    transitions per update  = training.batch_size * accumulation * (K + 1),  K = int(T * fraction)

Overrides are dotted ``key=value`` pairs; the official README's spelling is accepted too
(``--config.model.reward_scale=1e4``), and so are its flags ``--seed`` and ``--exp_name``.
:func:`validate` reports every bad value, each with the reason and a fix, before any model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf

PRESET_DIR = Path(__file__).resolve().parent / "configs"
BUILTIN_MODELS = ("tiny", "sd15-random", "tiny-sdxl", "sdxl-random")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # as models.SINGLE_FILE_SUFFIXES (no torch import here)


class ConfigError(ValueError):
    """One or more configuration values cannot work; the message names each value and its fix."""


@dataclass
class PretrainedConfig:
    model: str = "tiny"
    """``tiny`` (random tiny SD, CPU), ``sd15-random`` (SD 1.5 shapes, random weights, for
    profiling), ``tiny-sdxl`` / ``sdxl-random`` (the same for SDXL: two text encoders, added
    conditioning; set ``sampling.resolution=1024`` for SDXL's native size, as the ``sdxl_*`` presets
    do), a local diffusers directory (SD 1.x or SDXL), a single ``.safetensors`` / ``.ckpt`` file in
    the original A1111 / ComfyUI layout (SD 1.x or SDXL base; configs ship in the package, no
    download), or a hub id (honours ``HF_HUB_OFFLINE``)."""
    revision: Optional[str] = None
    """Hub revision of ``model`` (ignored for local directories)."""
    vae: Optional[str] = None
    """A diffusers ``AutoencoderKL`` directory or hub id replacing the model's VAE, e.g. SDXL's
    fp16-fix VAE (``madebyollin/sdxl-vae-fp16-fix``), which runs in fp16 where SDXL's own VAE is
    upcast to fp32 (it overflows in fp16)."""
    seed: int = 0
    """Seed of the random weights of the built-in models (``tiny``, ``sd15-random``, ``tiny-sdxl``, ``sdxl-random``)."""


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank (``lora_alpha`` = rank, as in the official code)."""
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Attention projections of the UNet that receive an adapter."""
    init: str = "gaussian"
    """peft ``init_lora_weights``: ``gaussian`` (official) or ``default``."""


@dataclass
class ModelConfig:
    reward_scale: float = 1e3
    """β, the inverse temperature of the reward: target ∝ p_ref(x) exp(β R(x)). Official default
    1e3; the paper: 1e4 (aesthetic), 5e5 (HPSv2), 1e4 (ImageReward) — see the ``sd15_a100x8*`` presets."""
    unet_reg_scale: float = 1e3
    """λ_reg, weight of the trust-region term mean(ε^θ - ε_sampled)². Official default 1e3; the
    paper: 2e3 (aesthetic), 5e3 (HPSv2, ImageReward)."""
    reverse_loss_scale: float = 1.0
    """λ_rev, weight of the reverse ∇-DB term (forced to 0 in no-flow mode)."""
    pretrained_strength: float = 1.0
    """Multiplier of the reference policy's scores (prior strength, in [0, 1])."""
    timestep_fraction: float = 0.1
    """Fraction of the T transitions trained per trajectory: K = int(T * fraction), plus the last.
    With low-variance subsampling T must be divisible by K: 0.1 for 50 DDPM steps (K = 5); for 20
    DPM-Solver steps 0.1 (K = 2), 0.2 (K = 4), 0.25 (K = 5) or 0.5 (K = 10) — not 0.4 (K = 8)."""
    reward_adaptive_mode: str = "squared"
    """Weight of the reward score at x_s: ``squared`` (ᾱ_s) or ``sqrt`` (√ᾱ_s)."""
    no_flow: bool = False
    """Forward-only mode: no flow model, no reverse or terminal loss; less memory, less diversity."""
    flow_zero_prompt: bool = False
    """Feed zero prompt embeddings to the flow model when the reward ignores the prompt."""
    flow_block_widths: List[int] = field(default_factory=lambda: [64, 128, 256, 256])
    """Block widths of the residual log-flow UNet g_φ (1 layer per block)."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SamplingConfig:
    scheduler: str = "ddim"
    """``ddim`` (DDPM: DDIM with eta = 1) or ``dpm-solver`` (first-order SDE-DPM-Solver++)."""
    num_steps: int = 50
    """Sampling steps T (the paper: 50 for DDPM, 20 for SDE-DPM-Solver++)."""
    eta: float = 1.0
    """DDIM stochasticity; must be > 0 (scores of a deterministic step are undefined)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale w: ε = ε_u + w (ε_c - ε_u)."""
    batch_size: int = 16
    """Trajectories sampled per batch per process."""
    num_batches_per_epoch: int = 4
    """Sampling batches per epoch per process (16 x 4 = 64 trajectories per process per epoch)."""
    low_var_subsampling: bool = True
    """Draw one transition per block of steps (low variance) instead of K uniformly."""
    resolution: int = 512
    """Image side in pixels (latent side = resolution / VAE scale factor). SD 1.5: 512; SDXL: 1024
    (its native size, set by the ``sdxl_*`` presets; SDXL's time ids follow this value)."""


@dataclass
class TrainingConfig:
    num_epochs: int = 100
    """Epochs of sample -> reward -> train."""
    batch_size: int = 4
    """Trajectories per training batch per process (all their kept transitions train)."""
    gradient_accumulation_steps: int = 8
    """Training batches per optimiser step (exactly one optimiser step per update): 64 / 4 = 16
    batches per epoch, so 2 optimiser steps per epoch with the defaults."""
    on_policy: bool = False
    """Train on this epoch's samples; default False is the official one-epoch lag."""
    learning_rate: float = 1e-3
    """AdamW learning rate of the LoRA parameters."""
    flow_learning_rate: float = 1e-3
    """AdamW learning rate of the flow model."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    """The official README finds 0.95 steadier."""
    adam_weight_decay: float = 1e-4
    """Weight decay of the LoRA group."""
    flow_weight_decay: float = 1e-2
    """Weight decay of the flow-model group."""
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping, applied to the LoRA and flow groups separately (<= 0 disables)."""
    optimizer: str = "adamw"
    """``adamw`` (torch), ``adamw8bit`` or ``paged_adamw8bit`` (bitsandbytes extra)."""
    mixed_precision: str = "bf16"
    """Storage of the frozen parts: ``bf16``, ``fp16`` or ``no`` (fp32). Trained parts stay fp32.
    ``fp16`` (V100): every backward runs under a dynamic loss scale (``memory.LossScaler``),
    overflowing updates are skipped and the scale lowered."""
    allow_tf32: bool = True
    max_nonfinite_updates: int = 3
    """An update whose loss or gradient is inf/NaN is skipped (weights and optimiser state untouched,
    with a warning); this many skipped in a row stop the run with an error naming the likely causes."""


@dataclass
class RewardConfig:
    name: str = "builtin:redness"
    """``builtin:redness`` | ``builtin:brightness`` | ``builtin:saturation`` (offline, tiny runs),
    ``aesthetic``, ``hpsv2``, ``imagereward`` (rewards extra, local checkpoints)."""
    checkpoint: Optional[str] = None
    """Local path (or hub file when online) of the reward model's weights; None = the default:
    aesthetic — the LAION head ``sac+logos+ava1-l14-linearMSE.pth`` shipped inside the package;
    HPSv2 / ImageReward — the official hub files."""
    backbone: Optional[str] = None
    """Local path (or hub id) of the backbone, where the reward needs one (aesthetic: CLIP ViT-L/14)."""
    weight_dtype: str = "fp32"
    """Storage dtype of the reward weights (math is always fp32): ``fp32``, ``bf16``, ``fp16``."""
    antialias: Optional[bool] = None
    """Antialiased (PIL-like) bicubic resize to the reward's input size; None = the official
    preprocessing of that reward: aesthetic ``false`` (``F.interpolate(..., mode="bicubic")``, what
    the paper's β was tuned with), HPSv2 and ImageReward ``true`` (torchvision's resize)."""
    max_length: Optional[int] = None
    """ImageReward prompt tokens (padded, truncated); None = 35, as ``ImageReward.score`` (the
    official ∇-GFlowNet code pads to 512: the same score up to 35 tokens). Only ImageReward has it."""


@dataclass
class PromptConfig:
    set: str = "simple_animals"
    """Built-in set (``simple_animals``, ``hpd_photo_painting``, ``drawbench``, ``imagenet``) or a
    file path (one prompt a line, or a JSON list)."""
    split: str = "train"
    """``train`` or ``eval`` (held-out prompts where the set defines them)."""


@dataclass
class MemoryConfig:
    mode: str = "optimized"
    """``optimized`` (pass scheduling, chunking), ``official`` (the official code's order and
    granularity: one graph and one backward per transition slot of ``training.batch_size`` rows —
    the baseline of the benchmarks) or ``naive`` (the whole batch in one graph: the tests' gradient
    reference, not for training)."""
    attention: str = "sdpa"
    """Attention kernel of the UNet and VAE (diffusers attention processors): ``sdpa``
    (``F.scaled_dot_product_attention``; PyTorch picks flash / memory-efficient / math per card and
    dtype), ``xformers`` (``xformers.ops.memory_efficient_attention``; xformers must be installed) or
    ``math`` (SDPA forced to its math kernel: the attention matrix is materialised — for comparison)."""
    checkpoint_unet: bool = False
    """Gradient checkpointing of the UNet (LoRA and reference passes with a graph)."""
    checkpoint_vae: bool = False
    """Gradient checkpointing of the VAE decoder in reward-gradient passes."""
    checkpoint_reward: bool = False
    """Gradient checkpointing of the reward model's towers."""
    checkpoint_flow: bool = False
    """Gradient checkpointing of the flow model."""
    input_grad_chunk: int = 0
    """Rows per input-gradient pass (reward and reference scores); 0 = whole batch."""
    train_chunk: int = 0
    """Rows per parameter-gradient pass, gradients accumulated; 0 = whole batch."""
    store_only_trained: bool = True
    """Draw the trained transitions before sampling and store only those (memory ∝ K+1, not T)."""
    transition_dtype: str = "fp32"
    """Storage of the kept transitions (x_t, x_{t-1}, sampled ε): ``fp32`` (default) or ``bf16``
    (half the buffer; ~11 % relative error in s_F at the last transition, ALGORITHM.md)."""
    offload_trajectories: bool = False
    """Keep trajectory buffers in (pinned) CPU memory between sampling and training."""
    offload_text_encoder: bool = False
    """Move the text encoder off the accelerator when it is not encoding."""


@dataclass
class DistributedConfig:
    backend: str = "ddp"
    """``ddp`` (gradient all-reduce of the trainable parameters) or ``deepspeed`` (ZeRO)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage for the trainable modules: 1 (optimiser state partitioned) or 2 (and
    gradients). Stage 3 is not supported: the LoRA weights are used inside the frozen UNet, outside
    DeepSpeed's forward, where ZeRO-3 could not gather them."""
    offload_optimizer: bool = False
    """DeepSpeed: keep the AdamW state and fp32 master weights of the trainable modules in CPU memory."""


@dataclass
class LoggingConfig:
    output_dir: str = "runs"
    """Parent directory of runs."""
    run_name: str = "default"
    """Run directory name under ``output_dir`` (official flag: ``--exp_name``)."""
    save_every: int = 1
    """Write a checkpoint every this many epochs (and always at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (older ones are deleted)."""
    tensorboard: bool = True
    wandb: bool = False
    """Log to Weights & Biases too (wandb must be installed and configured)."""
    sample_grid_seeds: int = 4
    """Fixed-seed samples drawn for the grid each epoch (0 disables)."""
    quiet: bool = False
    """No progress bars (clusters)."""
    overwrite: bool = False
    """Start afresh in a run directory that already holds checkpoints: its checkpoints and outputs
    are deleted first (CLI: ``--overwrite``). Without it such a start is refused (``--resume`` continues)."""


@dataclass
class Config:
    seed: int = 0
    """Seed of the run (per-rank and per-epoch seeds derive from it)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- loading

def list_presets() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _normalise_override(arg: str) -> str:
    """Accept ``a.b=v``, ``--a.b=v``, ``config.a.b=v``, ``--config.a.b=v``, ``--seed=0``, ``--exp_name=x``."""
    arg = arg.lstrip("-")
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form key=value (e.g. model.reward_scale=1e4)")
    key, value = arg.split("=", 1)
    if key.startswith("config."):
        key = key[len("config."):]
    key = {"exp_name": "logging.run_name"}.get(key, key)
    return f"{key}={value}"


def _field_type(key: str):
    """The annotation of a dotted key's field (``str``, ``Optional[str]``, ...), or None if unknown."""
    import typing

    cls = Config
    *path, leaf = key.split(".")
    for name in path:
        cls = typing.get_type_hints(cls).get(name)
        if not is_dataclass(cls):
            return None
    return typing.get_type_hints(cls).get(leaf) if is_dataclass(cls) else None


def _is_text(tp) -> tuple:
    """(is a string field, may be None)."""
    import types
    import typing

    if tp is str:
        return True, False
    args = typing.get_args(tp)
    union = typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", typing.Union))
    return union and set(args) == {str, type(None)}, True


def _override_layer(arg: str):
    """One dotted override as a config layer.  A string field takes the text as written (YAML would
    read ``no``/``off``/``yes``/``on`` as booleans and ``null`` as None); one pair of surrounding quotes
    is dropped, and an optional string field (``reward.checkpoint``, ...) reads ``null`` as unset.
    Other fields are parsed as YAML (numbers, booleans, lists)."""
    key, value = _normalise_override(arg).split("=", 1)
    text, optional = _is_text(_field_type(key))
    if not text:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    elif optional and value == "null":
        value = None
    layer = OmegaConf.create()
    OmegaConf.update(layer, key, value, force_add=True)
    return layer


def _check_yaml_text(layer, source: str, prefix: str = "") -> None:
    """A preset's unquoted ``no``/``off``/``yes``/``on`` in a string field arrives as a YAML boolean:
    say so rather than let it become the string 'False'."""
    for name, value in layer.items() if OmegaConf.is_dict(layer) else []:
        key = f"{prefix}{name}"
        if OmegaConf.is_dict(value):
            _check_yaml_text(value, source, f"{key}.")
        elif isinstance(value, bool) and _is_text(_field_type(key))[0]:
            raise ConfigError(f"{key} in {source} is an unquoted yes/no/on/off/true/false, which YAML reads "
                              f"as a boolean, but the option is text; quote it, e.g. {name}: \"no\"")


def load_config(preset: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then a preset (name in ``lowmem_nablagfn/configs/`` or a YAML path), then dotted overrides."""
    base = OmegaConf.structured(Config)
    layers = [base]
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {preset!r} not found; available: {', '.join(list_presets())} "
                              f"(or give a path to a YAML file)")
        layers.append(OmegaConf.load(path))
        _check_yaml_text(layers[-1], str(path))
    try:
        merged = OmegaConf.merge(*layers)
        for o in overrides:  # one at a time: a bad value is reported as the user typed it
            try:
                merged = OmegaConf.merge(merged, _override_layer(o))
            except ConfigError:
                raise
            except Exception as exc:
                key, value = _normalise_override(o).split("=", 1)
                tp = _field_type(key)
                if tp is None:
                    raise
                want = {int: "an integer", float: "a number", bool: "true or false"}.get(
                    tp, str(tp).replace("typing.", "").replace("<class '", "").replace("'>", ""))
                raise ConfigError(f"bad configuration value {key}={value}: expected {want} "
                                  f"(see `lowmem-nablagfn help-config`)") from None
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf names the bad key/value; re-raise as one clear error
        key = getattr(exc, "full_key", None)
        what = str(exc).split("\n")[0]
        raise ConfigError(f"bad configuration value{f' for {key}' if key else ''}: {what} "
                          f"(see `lowmem-nablagfn help-config`)") from None
    cfg: Config = OmegaConf.to_object(merged)
    return cfg


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def field_docs(cls=Config, prefix: str = "") -> List[tuple]:
    """(dotted key, default, docstring) for every leaf field: the CLI's ``--help-config``."""
    import ast
    import inspect

    out = []
    docs = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
    except (OSError, TypeError):
        pass
    inst = cls()
    for f in fields(cls):
        value = getattr(inst, f.name)
        if is_dataclass(value):
            out += field_docs(type(value), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value, docs.get(f.name, "")))
    return out


# ----------------------------------------------------------------------------- validation

def _is_local_path(name: str) -> bool:
    """A hub id is ``owner/name``; anything else (or an existing path) is a local directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


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


def validate(cfg: Config) -> Config:
    """Check every value; raise one :class:`ConfigError` listing each problem with its fix."""
    from .rewards import known_reward, reward_names
    from .rewards.prompts import known_prompt_set
    from .subsample import SubsampleError, check_blocks, num_blocks

    errors: List[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

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
        ("sampling.scheduler", s.scheduler, ("ddim", "dpm-solver")),
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
    need(known_reward(cfg.reward.name),
         f"reward.name={cfg.reward.name!r} is unknown; choose one of "
         f"{', '.join(reward_names())}")
    need(known_prompt_set(cfg.prompts.set),
         f"prompts.set={cfg.prompts.set!r} is neither a built-in set (simple_animals, "
         f"hpd_photo_painting, drawbench, imagenet) nor an existing file")
    need(len(m.flow_block_widths) >= 1 and all(w > 0 and w % 8 == 0 for w in m.flow_block_widths),
         f"model.flow_block_widths={list(m.flow_block_widths)} must be positive multiples of 8")
    need(not m.lora.target_modules == [], "model.lora.target_modules is empty; name at least one module")

    model = cfg.pretrained.model
    if model not in BUILTIN_MODELS and Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES:
        need(Path(model).expanduser().is_file(),
             f"pretrained.model={model!r}: no such file; give an existing single-file checkpoint "
             f"(.safetensors / .ckpt, A1111 / ComfyUI layout), a diffusers directory or a hub id")
    elif model not in BUILTIN_MODELS and _is_local_path(model):
        need(Path(model).expanduser().is_dir(),
             f"pretrained.model={model!r}: no such directory; give a local diffusers model directory "
             f"(with unet/, vae/, text_encoder/, tokenizer/), a single .safetensors/.ckpt file, a hub id, "
             f"or one of {', '.join(BUILTIN_MODELS)}")
    scheduler_json = Path(model).expanduser() / "scheduler" / "scheduler_config.json"
    if model not in BUILTIN_MODELS and scheduler_json.is_file():  # a local model: its prediction type now
        import json

        from .diffusion import check_scheduler_config

        try:
            check_scheduler_config(json.loads(scheduler_json.read_text()), f"pretrained.model={model!r}")
        except ValueError as exc:
            errors.append(str(exc))
    vae = cfg.pretrained.vae
    if vae and _is_local_path(vae):
        need((Path(vae).expanduser() / "config.json").is_file(),
             f"pretrained.vae={vae!r}: no diffusers VAE directory there (config.json + weights); give "
             f"one, a hub id, or leave it unset to keep the model's own VAE")
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
    if t.optimizer != "adamw" and cfg.distributed.backend == "deepspeed":
        errors.append(f"training.optimizer={t.optimizer!r} cannot be partitioned by DeepSpeed ZeRO; "
                      f"use training.optimizer=adamw with distributed.backend=deepspeed, or "
                      f"distributed.backend=ddp with 8-bit AdamW")
    r = cfg.reward
    if r.antialias is not None:
        need(not r.name.startswith("builtin:"), f"reward.antialias={r.antialias} has no effect on {r.name} "
                                                f"(built-in rewards do not resize); remove it")
    if r.max_length is not None:
        need(r.name == "imagereward", f"reward.max_length={r.max_length} is only used by reward.name=imagereward "
                                      f"(the others tokenise with their own fixed context); remove it")
        need(0 < r.max_length <= 512, f"reward.max_length={r.max_length} must lie in [1, 512] "
                                      f"(BERT's positions; 35 = ImageReward.score, 512 = the official ∇-GFlowNet code)")
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
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg
