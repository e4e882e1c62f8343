"""The configuration tree: one dataclass per section, every field documented (the docstring under a
field is its ``help-config`` text).  Loading, overrides and presets: :mod:`.loading`; checks:
:mod:`.validation`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

#: Built-in random-weight SD 3.x models (as models.SD3_BUILTIN_CONFIGS; no torch import here).
SD3_BUILTIN_MODELS = ("tiny-sd3", "sd35m-random")
BUILTIN_MODELS = ("tiny", "sd15-random", "tiny-sdxl", "sdxl-random") + SD3_BUILTIN_MODELS
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # as models.SINGLE_FILE_SUFFIXES (no torch import here)


class ConfigError(ValueError):
    """One or more configuration values cannot work; the message names each value and its fix."""


@dataclass
class PretrainedConfig:
    model: str = "tiny"
    """``tiny`` (random tiny SD, CPU), ``sd15-random`` (SD 1.5 shapes, random weights, for
    profiling), ``tiny-sdxl`` / ``sdxl-random`` (the same for SDXL: two text encoders, added
    conditioning; set ``sampling.resolution=1024`` for SDXL's native size, as the ``sdxl_*`` presets
    do), ``tiny-sd3`` / ``sd35m-random`` (SD 3.5: tiny, and SD 3.5 Medium's shapes; with
    ``sampling.scheduler=flow-sde``), a local diffusers directory (SD 1.x, SDXL or SD 3.x), a single
    ``.safetensors`` / ``.ckpt`` file in the original A1111 / ComfyUI layout (SD 1.x or SDXL base;
    configs ship in the package, no download), or a hub id (honours ``HF_HUB_OFFLINE``)."""
    revision: Optional[str] = None
    """Hub revision of ``model`` (ignored for local directories)."""
    vae: Optional[str] = None
    """A diffusers ``AutoencoderKL`` directory or hub id replacing the model's VAE, e.g. SDXL's
    fp16-fix VAE (``madebyollin/sdxl-vae-fp16-fix``), which runs in fp16 where SDXL's own VAE is
    upcast to fp32 (it overflows in fp16)."""
    seed: int = 0
    """Seed of the random weights of the built-in models (``tiny``, ``sd15-random``, ``tiny-sdxl``, ``sdxl-random``,
    ``tiny-sd3``, ``sd35m-random``)."""
    t5: bool = True
    """SD 3.x: encode prompts with T5-XXL too.  ``false``: its part of the conditioning is zeros, as
    ``StableDiffusion3Pipeline`` without ``text_encoder_3`` (4.7 B parameters never loaded; weaker on long
    and typographic prompts).  The prompts' embeddings are computed once and cached on disk
    (``$XDG_CACHE_HOME/lowmem-nablagfn``), so no text encoder is resident while training either way."""
    max_sequence_length: int = 256
    """SD 3.x: T5 tokens per prompt (1 to 512; the pipeline's default 256): the transformer attends to
    77 + this many text tokens."""


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank (``lora_alpha`` = rank, as in the official code)."""
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Layers that receive an adapter (Linear / Conv2d, by full or trailing dotted name).  The default,
    the UNet's attention projections, stands for the model family's own: on an SD 3.x transformer the
    joint attention of both streams (``attn.to_q/k/v``, ``attn.to_out.0``, ``attn.add_q/k/v_proj``,
    ``attn.to_add_out``: models/sd3_lora.py)."""
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
    """``ddim`` (DDPM: DDIM with eta = 1) or ``dpm-solver`` (first-order SDE-DPM-Solver++) for SD 1.x /
    SDXL; ``flow-sde`` (Flow-GRPO's SDE sampler) for SD 3.x, which needs it.  Unset by the preset and
    the command line, it follows ``pretrained.model``'s family: ``flow-sde`` for SD 3.x, else ``ddim``."""
    num_steps: int = 50
    """Sampling steps T (the paper: 50 for DDPM, 20 for SDE-DPM-Solver++)."""
    eta: float = 1.0
    """DDIM stochasticity; ``flow-sde``: its noise level a (Flow-GRPO: 0.7).  Must be > 0 (scores of a
    deterministic step are undefined)."""
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
    ``aesthetic``, ``hpsv2``, ``imagereward``, ``pickscore``, ``clipscore`` (rewards extra, local checkpoints),
    or your own: ``path/to/my_reward.py:build`` / ``package.module:build`` (docs/rewards-custom.md);
    ``mix``: a weighted sum of rewards, ``reward.mix``."""
    checkpoint: Optional[str] = None
    """Local path (or hub file when online) of the reward model's weights; None = the default:
    aesthetic — the LAION head ``sac+logos+ava1-l14-linearMSE.pth`` shipped inside the package;
    HPSv2 / ImageReward — the official hub files."""
    backbone: Optional[str] = None
    """Local path (or hub id) of the backbone, where the reward needs one (aesthetic: CLIP ViT-L/14;
    ImageReward: the bert-base-uncased tokenizer), or the whole model where it is one transformers CLIP
    folder (pickscore: ``yuvalkirstain/PickScore_v1``; clipscore: ``openai/clip-vit-large-patch14``)."""
    weight_dtype: str = "fp32"
    """Storage dtype of the reward weights (math is always fp32): ``fp32``, ``bf16``, ``fp16``."""
    antialias: Optional[bool] = None
    """Antialiased (PIL-like) bicubic resize to the reward's input size; None = the official
    preprocessing of that reward: aesthetic ``false`` (``F.interpolate(..., mode="bicubic")``, what
    the paper's β was tuned with), HPSv2, ImageReward, PickScore and CLIPScore ``true`` (torchvision's
    resize / the CLIP processors' PIL resize)."""
    max_length: Optional[int] = None
    """ImageReward prompt tokens (padded, truncated); None = 35, as ``ImageReward.score`` (the
    official ∇-GFlowNet code pads to 512: the same score up to 35 tokens). Only ImageReward has it."""
    mix: Dict[str, float] = field(default_factory=dict)
    """With ``name: mix``: the trained reward is the weighted sum Σ w·R of these rewards, by name as
    ``name`` takes them, e.g. ``{aesthetic: 1.0, pickscore: 0.5}`` (weights > 0; at least two). Each
    component is logged as ``reward/<component>/mean``; weighting: docs/rewards.md#mixtures."""
    checkpoints: Dict[str, str] = field(default_factory=dict)
    """``checkpoint`` of a mixture's component, by name (e.g. ``{aesthetic: /ckpt/head.pth}``); unset:
    ``checkpoint`` (with a mixture only ``random`` / ``random:reduced``, for every packaged component),
    else that reward's default."""
    backbones: Dict[str, str] = field(default_factory=dict)
    """``backbone`` of a mixture's component, by name (e.g. ``{pickscore: /ckpt/PickScore_v1}``); unset:
    that reward's default (``backbone`` itself must stay unset with a mixture: each reward has its own)."""


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
    """Gradient checkpointing of the VAE decoder in reward-gradient passes, per layer (models.checkpointing)."""
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
    (half the buffer; ~11 % relative error in s_F at the last transition, docs/algorithm.md)."""
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
class MonitorConfig:
    """Rewards that are watched, not trained on (docs/evaluation.md, "Watching for reward hacking")."""

    rewards: List[str] = field(default_factory=list)
    """Reward names to watch, as ``reward.name`` takes them (e.g. ``[pickscore, imagereward]`` while training
    on ``aesthetic``); empty = the monitor is off. Each is kept in host memory and moved to the device
    only while it scores."""
    every: int = 5
    """Evaluate after every this many epochs (epoch E when (E + 1) % every == 0; the lagged loop's epoch
    -1, the base model, is one of them)."""
    num_prompts: int = 4
    """Held-out prompts (the first of the ``eval`` split of ``prompts.set``), the same every evaluation."""
    images_per_prompt: int = 2
    """Images per prompt, at fixed seeds (>= 2: diversity compares the images of a prompt)."""
    patience: int = 3
    """K: warn when a watched reward or the diversity fell at each of the last K evaluations while the
    training reward (on the same held-out images) rose over them."""
    stop: bool = False
    """Also stop the run at such a warning: checkpoint and LoRA saved, exit code 1."""
    checkpoints: Dict[str, str] = field(default_factory=dict)
    """``reward.checkpoint`` of a watched reward, by name (e.g. ``{imagereward: /ckpt/ImageReward.pt}``);
    unset: that reward's default."""
    backbones: Dict[str, str] = field(default_factory=dict)
    """``reward.backbone`` of a watched reward, by name (e.g. ``{pickscore: /ckpt/PickScore_v1}``);
    unset: that reward's default (the hub cache)."""


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
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
