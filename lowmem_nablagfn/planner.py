"""Predict the peak memory of a training configuration phase by phase — no GPU needed — and propose
the fastest configuration that fits a card.

How a prediction is made
------------------------
1. **Exact bytes** — the configuration's models are built on the ``meta`` device (no memory, a few
   seconds even for SD 1.5): UNet with its LoRA adapter, VAE, text encoder, flow model, reward model,
   frozen parts cast to ``training.mixed_precision``, reward weights to ``reward.weight_dtype``.  Weights,
   gradients (fp32, trainable parameters), optimiser state (AdamW: 8 bytes per trainable parameter;
   8-bit AdamW: 2 bytes for tensors of >= 4096 elements, 8 below, as bitsandbytes does) and the stored
   trajectories follow from parameter counts, dtypes and the batch arithmetic.
2. **Traced activations** — the models are materialised as ``FakeTensor``s (shapes and dtypes, no
   data, no compute) and each pass runs *at the configuration's resolution* under a
   :class:`~lowmem_nablagfn.memtrack.LiveBytes` tracker, which sums the storages every aten op
   returns (saved activations, temporaries, gradients).  Tracing costs the same at any size (a full SD 1.5
   UNet forward + backward traces in ~10 s on a CPU), so nothing is extrapolated in resolution.  Each
   probe runs at 1 and 2 rows; activations are linear in rows (a constant plus a per-row slope), which
   gives any chunk size.  Probes, per checkpointing flag: the policy UNet with ``x̂0`` (the first link of
   a reward-gradient chain), the VAE decoder, the reward model (forward, retained backward, backward),
   the reference pass (:func:`~lowmem_nablagfn.memory.reference_scores`), the training pass
   (:func:`~lowmem_nablagfn.memory.train_pass`), the sampler's no-grad UNet, the final reward, the text
   encoder; the naive schedule is traced whole.  Results are cached per architecture (JSON under
   ``~/.cache/lowmem_nablagfn/planner``; SD 1.5 at 512 px ships in ``planner_profiles/``).
3. **Composition** — the phases of :mod:`lowmem_nablagfn.memory`'s schedule.  A reward-gradient pass
   keeps the UNet graph while the VAE and the reward run, so its peak is the largest of
   ``Pf_U``, ``F_U + Pf_V``, ``F_U + F_V + max(Pf_R, Pb_R)``, ``F_U + Pb_V``, ``Pb_U`` (``F``: bytes a
   forward leaves alive, ``Pf``/``Pb``: forward/backward peaks).  Each phase adds what stays resident:
   weights, optimiser state, gradients, stored trajectories, the batch's rows.
4. **GPU-only memory** (a configuration with ``device`` other than ``cpu``): what the CPU trace cannot
   see is added as allowances — cuDNN convolution workspaces and the fused-attention backward's
   scratch per phase (:data:`CUDNN_WORKSPACE_GIB`, :data:`ATTN_SCRATCH_BYTES`) — and the attention
   passes are traced with the kernel the card and dtype get (:func:`sdpa_kernel`; the math kernel's
   attention matrices are materialised in the trace, with a warning).  ``Prediction.peak`` is then the
   predicted ``max_memory_allocated``; ``reserved_gib`` adds allocator fragmentation
   (:data:`FRAGMENTATION` with ``expandable_segments:True``, which the launchers set), and a card fits
   when ``reserved + CUDA context (per card class) + MIN_SLACK_GIB <= card memory``.  Every GPU constant
   is an estimate until ``benchmarks/gpu_validate.py`` has measured it (its source is noted beside it).

The proposal
------------
Candidates keep the objective and everything that changes the update's numbers, and vary the exact
memory knobs; the first tier with a fitting candidate wins, the fastest inside it by the estimated
cost (traced FLOPs, checkpoint recomputation included, plus a per-call overhead that favours large
chunks and batches):

1. checkpointing flags, ``memory.input_grad_chunk``, ``memory.train_chunk``, ``training.batch_size``
   (with ``gradient_accumulation_steps`` raised to keep the trajectories per update) and
   ``sampling.batch_size`` (with ``num_batches_per_epoch`` raised);
2. + ``memory.offload_text_encoder`` and ``memory.offload_trajectories``;
3. + 8-bit AdamW (changes optimiser numerics slightly);
4. + ``model.no_flow`` (changes the objective: the last resort).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import Config, list_presets, load_config, to_dict
from torch.utils._python_dispatch import TorchDispatchMode

from .memtrack import GiB, LiveBytes
from .models import vae_encoder_modules

PROBE_VERSION = 2
SHIPPED = Path(__file__).resolve().parent / "planner_profiles"

#: Memory a program can allocate on each card (GiB, as ``torch.cuda.get_device_properties`` reports).
CARDS: Dict[str, float] = {
    "A100-80": 79.2, "L40-48": 44.4, "V100-32": 31.7, "RTX4090-24": 23.6, "V100-16": 15.8,
    "12GB": 11.7, "8GB": 7.7,
}
#: Compute capability of each card class of :data:`CARDS` (the SDPA kernel depends on it); the
#: generic 12 / 8 GB cards are taken as consumer Ampere (RTX 3060 12 GB, RTX 3070 8 GB).
CARD_CAPABILITY: Dict[str, Tuple[int, int]] = {
    "A100-80": (8, 0), "L40-48": (8, 9), "V100-32": (7, 0), "RTX4090-24": (8, 9), "V100-16": (7, 0),
    "12GB": (8, 6), "8GB": (8, 6),
}
#: Assumed when neither a card name nor a CUDA device says otherwise.
DEFAULT_CAPABILITY = (8, 0)

# GPU-only memory the CPU trace cannot see.  Every constant below is an ESTIMATE, to be calibrated on
# a GPU with benchmarks/gpu_validate.py (which prints predicted vs measured max_memory_allocated /
# max_memory_reserved per configuration); until then they are deliberately on the safe side.
#: Allocator rounding and segment fragmentation: ``max_memory_reserved`` / ``max_memory_allocated``
#: - 1.  With ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (set by every launcher in launch/)
#: segments grow in place instead of leaving holes (PyTorch docs, "CUDA memory management"); without
#: it the caching allocator's block splitting leaves more.  Estimates, to be calibrated.
FRAGMENTATION = 0.05
FRAGMENTATION_FIXED_SEGMENTS = 0.15
#: CUDA context + cuBLAS/cuDNN handles and their loaded kernels, outside PyTorch's allocator (hence
#: outside max_memory_reserved, inside the card's total), by compute-capability major.  The issue's
#: "often 0.6-1 GiB with cuBLAS/cuDNN"; estimates, to be calibrated (nvidia-smi used - reserved).
CONTEXT_GIB_BY_MAJOR = {7: 0.6, 8: 0.8, 9: 1.0}
CONTEXT_GIB = 0.8
#: cuDNN convolution workspace: PyTorch allocates it through the caching allocator, so it counts in
#: max_memory_allocated but not in the CPU trace.  Per phase, for the UNet/VAE convolutions with a
#: backward (``grad``) and without (``nograd``).  Estimates, to be calibrated (the VAE decoder's
#: backward at 512 px is the suspect).
CUDNN_WORKSPACE_GIB = {"grad": 0.5, "nograd": 0.25}
#: Flash / memory-efficient attention backward scratch (fp32 ``dq`` accumulator and ``delta`` of the
#: largest attention layer), bytes per row per latent pixel per channel: 2 (CFG) x 4 (fp32).
#: Estimate from the kernels' documented buffers (PyTorch ``sdp_utils``, xformers cutlass backward).
ATTN_SCRATCH_BYTES = 8
#: A proposal fits a card only if at least this much is left after peak x (1 + fragmentation) + context.
MIN_SLACK_GIB = 0.5


def fragmentation_default() -> float:
    """:data:`FRAGMENTATION` when this process's allocator uses expandable segments (the launchers'
    setting) or when planning for another machine; :data:`FRAGMENTATION_FIXED_SEGMENTS` in a CUDA
    process started without it."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:True" in conf or not torch.cuda.is_available():
        return FRAGMENTATION
    return FRAGMENTATION_FIXED_SEGMENTS


def card_context_gib(capability: Optional[Tuple[int, int]]) -> float:
    return CONTEXT_GIB_BY_MAJOR.get(capability[0], CONTEXT_GIB) if capability else CONTEXT_GIB


def sdpa_kernel(dtype: torch.dtype, capability: Tuple[int, int], head_dim: int) -> str:
    """The kernel ``F.scaled_dot_product_attention`` picks on CUDA (PyTorch 2.x,
    ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``): ``flash`` for fp16/bf16 on sm80 and
    newer with a head dimension <= 256 (multiple of 8); else ``mem_efficient`` on sm50 and newer for
    fp32/fp16, and bf16 only from sm80; else ``math`` (the attention matrix is materialised)."""
    sm = capability[0] * 10 + capability[1]
    half = dtype in (torch.float16, torch.bfloat16)
    if half and sm >= 80 and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    if sm >= 50 and (dtype != torch.bfloat16 or sm >= 80):
        return "mem_efficient"
    return "math"


def attention_kernels(cfg: Config, models: "Models", capability: Tuple[int, int]) -> Dict[str, str]:
    """Attention kernel of the UNet, VAE and flow model under ``memory.attention`` on this card.

    ``math`` forces the math kernel everywhere; ``xformers`` counts as ``mem_efficient`` (its kernels
    keep the same buffers; none exists for bf16 before sm80, where it is reported as ``math``)."""
    frozen = DTYPES[cfg.training.mixed_precision]
    unet_cfg, vae_cfg = models.unet.config, models.vae.config
    # with ``num_attention_heads`` unset, diffusers reads ``attention_head_dim`` as the number of heads
    heads = getattr(unet_cfg, "num_attention_heads", None) or unet_cfg.attention_head_dim
    widths = list(unet_cfg.block_out_channels)
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    unet_head_dim = max(c // h for c, h in zip(widths, heads))
    # the VAE's mid-block attention: one head over all channels
    parts = {"unet": (frozen, unet_head_dim), "vae": (frozen, vae_cfg.block_out_channels[-1])}
    if models.flow_model is not None and not cfg.model.no_flow:
        parts["flow"] = (torch.float32, 8)
    out = {}
    for name, (dtype, head_dim) in parts.items():
        if cfg.memory.attention == "math":
            out[name] = "math"
        else:
            k = sdpa_kernel(dtype, capability, head_dim)
            out[name] = "mem_efficient" if cfg.memory.attention == "xformers" and k == "flash" else k
    return out

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
REWARD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_vram(text: str) -> float:
    """``24GB``, ``24GiB``, ``24`` (GiB), ``24000MB``, or a card name of :data:`CARDS` -> GiB."""
    if text in CARDS:
        return CARDS[text]
    for name, gib in CARDS.items():
        if text.lower().replace("-", "").replace("_", "") == name.lower().replace("-", ""):
            return gib
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; give e.g. 24GB, 16000MB or a card "
                         f"name ({', '.join(CARDS)})")
    value, unit = float(m.group(1)), (m.group(2) or "gb")
    return value / 1024 if unit.startswith("m") else value


# ----------------------------------------------------------------------------- architecture

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
    from .models import BUILTIN_CONFIGS, SINGLE_FILE_SUFFIXES

    if model in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[model](), model
    local = Path(model).expanduser()
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES and local.is_file():
        from .single_file import identify

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
            return BUILTIN_CONFIGS[name](), f"{model} (not found locally: {what} architecture assumed)"
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
    """Build the models of ``cfg`` on the meta device, as :func:`~lowmem_nablagfn.trainer.setup` does."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models import add_lora, build_flow_model, freeze, vae_dtype
    from .rewards import build_reward
    from .rewards.loading import random_size

    configs, source = model_configs(cfg.pretrained.model, cfg.pretrained.revision)
    vae_json = Path(cfg.pretrained.vae or "").expanduser() / "config.json"
    if cfg.pretrained.vae and vae_json.is_file():  # pretrained.vae (e.g. an fp16-fix VAE: not upcast)
        configs = dict(configs, vae=json.loads(vae_json.read_text()))
    unet_cfg, vae_cfg, text_cfg, text_2_cfg = configs["unet"], configs["vae"], configs["text"], configs.get("text_2")
    frozen = DTYPES[cfg.training.mixed_precision]
    rcfg = copy.deepcopy(cfg.reward)
    if not rcfg.name.startswith("builtin:") and random_size(rcfg.checkpoint) is None:
        rcfg.checkpoint = "random"  # the architecture of the real weights, without the files
    with torch.device("meta"), _quiet():
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.items()
                                                       if not k.startswith("_")}))
        text_encoder_2 = None if text_2_cfg is None else CLIPTextModelWithProjection(
            CLIPTextConfig(**{k: v for k, v in text_2_cfg.items() if not k.startswith("_")}))
        texts = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
        for module in (unet, vae, *texts):  # SDXL's VAE is upcast under fp16, as trainer.setup does
            freeze(module, None, vae_dtype(vae.config, text_encoder_2 is not None, frozen) if module is vae else frozen)
        lora = cfg.model.lora
        lora_params = add_lora(unet, lora.rank, lora.target_modules, lora.init, cfg.seed)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        size = cfg.sampling.resolution // scale
        latent_shape = (unet.config.in_channels, size, size)
        flow = None
        if not cfg.model.no_flow:
            flow = build_flow_model(latent_shape[0], size, sum(t.config.hidden_size for t in texts),
                                    list(cfg.model.flow_block_widths), cfg.seed).train()
        reward = build_reward(rcfg, "meta")
    text_shape = (text_encoder.config.max_position_embeddings, sum(t.config.hidden_size for t in texts))
    return Models(unet, vae, text_encoder, flow, reward, lora_params, latent_shape, text_shape, source,
                  text_encoder_2=text_encoder_2)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


def _nbytes(module: Optional[nn.Module]) -> int:
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
    return {
        "unet": unet_frozen, "lora": sum(p.numel() * 4 for p in m.lora_params),
        # on an accelerator the trainer keeps the VAE encoder in host memory (it only decodes)
        "vae": _nbytes(m.vae) - (0 if cfg.device == "cpu" else sum(_nbytes(e) for e in vae_encoder_modules(m.vae))),
        "text_encoder": sum(_nbytes(t) for t in m.text_encoders), "flow": _nbytes(m.flow_model),
        "reward": _nbytes(m.reward),
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
    if m.text_encoder_2 is not None:  # SDXL only, so that SD 1.x keys (and the shipped hashes) stay as they were
        key["text_2"] = m.text_encoder_2.config.hidden_size
        key["vae_itemsize"] = next(m.vae.parameters()).element_size()  # upcast under fp16
    return key


def key_hash(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- tracing

def _fakeify(module: Optional[nn.Module], mode) -> None:
    """Replace meta parameters/buffers by fake CPU tensors of the same shape, dtype and flag."""
    if module is None:
        return
    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                         requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _set_checkpointing(module: Optional[nn.Module], on: bool) -> None:
    if module is None:
        return
    if hasattr(module, "set_checkpointing"):
        module.set_checkpointing(on)
    elif hasattr(module, "enable_gradient_checkpointing"):
        (module.enable_gradient_checkpointing if on else module.disable_gradient_checkpointing)()


class FlopCount(TorchDispatchMode):
    """FLOPs of the aten ops that ``torch.utils.flop_counter`` knows (matmuls, convolutions,
    attention), without ``FlopCounterMode``'s module hooks (which reject ``autograd.grad`` on leaves)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


class _Meter:
    """Marks of one probe: bytes above the probe's baseline, FLOPs since the last mark."""

    def __init__(self, mem: LiveBytes, flops):
        self.mem, self.fc = mem, flops
        self.base = mem.current
        self.f0 = flops.get_total_flops()
        mem.reset_peak()
        self.out: Dict[str, float] = {}

    def peak(self, name: str) -> None:
        self.out[name] = max(0, self.mem.peak - self.base)
        self.mem.reset_peak()

    def now(self, name: str) -> None:
        self.out[name] = max(0, self.mem.current - self.base)

    def flops(self, name: str) -> None:
        f = self.fc.get_total_flops()
        self.out[name] = float(f - self.f0)
        self.f0 = f


class Tracer:
    """The configuration's models on fake tensors, and the probes of :mod:`planner`'s composition."""

    def __init__(self, cfg: Config, models: Models):
        from torch._subclasses.fake_tensor import FakeTensorMode

        from .diffusion import make_schedule
        from .sampling import cfg_eps_fn

        self.cfg, self.m = cfg, models
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        for module in (models.unet, models.vae, *models.text_encoders, models.flow_model, models.reward):
            _fakeify(module, self.mode)
        self.lora = [p for n, p in models.unet.named_parameters() if "lora_" in n]
        self.sched = make_schedule(cfg.sampling.scheduler, cfg.sampling.num_steps, cfg.sampling.eta)
        self.te_dtype = next(models.text_encoder.parameters()).dtype
        with self.mode:
            self.uncond = self._cond(1)
        self.eps_fn = cfg_eps_fn(models.unet, self.uncond, cfg.sampling.guidance_scale)

    # -- helpers (called inside the fake mode)
    def _latents(self, r: int, grad: bool = False) -> Tensor:
        return torch.randn(r, *self.m.latent_shape, requires_grad=grad)

    def _cond(self, r: int):
        """Prompt conditioning of ``r`` rows (SDXL: a ``Conditioning`` with pooled embeddings and time ids)."""
        from .sampling import Conditioning, sdxl_time_ids

        embeds = torch.randn(r, *self.m.text_shape, dtype=self.te_dtype)
        te2 = self.m.text_encoder_2
        if te2 is None:
            return embeds
        pooled = torch.randn(r, te2.config.projection_dim, dtype=self.te_dtype)
        return Conditioning(embeds, pooled, sdxl_time_ids(r, self.cfg.sampling.resolution, dtype=self.te_dtype))

    def _decode(self, z: Tensor) -> Tensor:
        """What :func:`~lowmem_nablagfn.trainer.make_latent_reward` does before the reward model."""
        vae = self.m.vae
        images = vae.decode((z / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def _rows(self, r: int):
        from .memory import Rows

        return Rows(self._latents(r), self._latents(r), self._latents(r),
                    torch.zeros(r, dtype=torch.long), self._cond(r), [""] * r,
                    torch.zeros(r, dtype=torch.bool))

    def _ctx(self, residual: bool):
        from .memory import ObjectiveSettings, UpdateContext

        m = self.cfg.model
        return UpdateContext(eps_fn=self.eps_fn, unet=self.m.unet,
                             flow_model=self.m.flow_model if residual else None,
                             latent_reward=lambda x0, prompts: self.m.reward(self._decode(x0), prompts),
                             sched=self.sched,
                             settings=ObjectiveSettings(m.reward_scale, m.reverse_loss_scale, m.unet_reg_scale,
                                                        m.pretrained_strength, m.reward_adaptive_mode,
                                                        m.flow_zero_prompt))

    def _grad_chain(self, meter: _Meter, fn, x: Tensor) -> None:
        """Forward with a graph, retained backward, backward: Pf, F, Pbr, Pb and their FLOPs."""
        y = fn(x)
        meter.peak("Pf")
        meter.now("F")
        meter.flops("flops_f")
        g = torch.ones_like(y)
        torch.autograd.grad(y, x, g, retain_graph=True)
        meter.peak("Pbr")
        meter.f0 = meter.fc.get_total_flops()  # the retained backward is a measurement, not work
        torch.autograd.grad(y, x, g)
        meter.peak("Pb")
        meter.flops("flops_b")

    # -- probes: each returns {quantity: bytes or flops}
    def probe(self, name: str, flags: dict, r: int) -> Dict[str, float]:
        from .sampling import as_conditioning

        _set_checkpointing(self.m.unet, flags.get("unet", False))
        _set_checkpointing(self.m.vae, flags.get("vae", False))
        _set_checkpointing(self.m.reward, flags.get("reward", False))
        _set_checkpointing(self.m.flow_model, flags.get("flow", False))
        # the math SDPA kernel materialises the attention matrices (traced); flash / memory-efficient
        # kernels keep what the CPU's fused kernel keeps (output and log-sum-exp)
        from .models import set_attention_backend

        set_attention_backend((self.m.unet, self.m.vae), "math" if flags.get("math") else "sdpa")
        set_attention_backend((self.m.flow_model,), "math" if flags.get("math_flow") else "sdpa")
        with self.mode, _quiet(), LiveBytes() as mem, FlopCount() as fc:
            # known up front, so that views of weights (a linear layer's ``t()``) count as nothing new
            mem.register_modules(self.m.unet, self.m.vae, *self.m.text_encoders, self.m.flow_model, self.m.reward)
            mem.register(as_conditioning(self.uncond).tensors())
            return getattr(self, f"_probe_{name}")(mem, fc, r)

    def _probe_unet_chain(self, mem, fc, r):
        from .diffusion import pred_x0

        t = torch.full((r,), 500, dtype=torch.long)
        cond, alpha = self._cond(r), torch.full((r, 1, 1, 1), 0.5)
        x = self._latents(r, grad=True)
        meter = _Meter(mem, fc)
        self._grad_chain(meter, lambda v: pred_x0(v, self.eps_fn(v, t, cond), alpha), x)
        return meter.out

    def _probe_vae(self, mem, fc, r):
        z = self._latents(r, grad=True)
        meter = _Meter(mem, fc)
        self._grad_chain(meter, self._decode, z)
        return meter.out

    def _probe_reward(self, mem, fc, r):
        side = self.cfg.sampling.resolution
        images = torch.rand(r, 3, side, side, requires_grad=True)
        meter = _Meter(mem, fc)
        self._grad_chain(meter, lambda v: self.m.reward(v, [""] * r), images)
        return meter.out

    def _nograd(self, mem, fc, fn, x) -> Dict[str, float]:
        meter = _Meter(mem, fc)
        with torch.no_grad():
            y = fn(x)
        meter.peak("Pi")
        meter.now("Out")
        meter.flops("flops_f")
        del y
        return meter.out

    def _probe_unet_sample(self, mem, fc, r):
        t, cond = torch.full((r,), 500, dtype=torch.long), self._cond(r)
        return self._nograd(mem, fc, lambda v: self.eps_fn(v, t, cond), self._latents(r))

    def _probe_vae_nograd(self, mem, fc, r):
        return self._nograd(mem, fc, self._decode, self._latents(r))

    def _probe_reward_nograd(self, mem, fc, r):
        side = self.cfg.sampling.resolution
        return self._nograd(mem, fc, lambda v: self.m.reward(v, [""] * r), torch.rand(r, 3, side, side))

    def _probe_encode(self, mem, fc, r):
        ids = torch.zeros(r, self.m.text_shape[0], dtype=torch.long)
        if self.m.text_encoder_2 is None:
            return self._nograd(mem, fc, lambda v: self.m.text_encoder(v)[0], ids)
        return self._nograd(mem, fc, lambda v: torch.cat(  # SDXL: both encoders' penultimate states
            [t(v, output_hidden_states=True).hidden_states[-2] for t in self.m.text_encoders], -1), ids)

    def _probe_reference(self, mem, fc, r, need_reverse=True):
        from .memory import reference_scores

        rows = self._rows(r)
        meter = _Meter(mem, fc)
        out = reference_scores(self._ctx(need_reverse), rows, need_reverse)
        meter.peak("P")
        meter.flops("flops")
        del out
        return meter.out

    def _probe_reference_nograd(self, mem, fc, r):
        return self._probe_reference(mem, fc, r, need_reverse=False)

    def _with_grads(self, residual: bool):
        params = list(self.lora) + (list(self.m.flow_model.parameters()) if residual else [])
        for p in params:
            p.grad = torch.zeros_like(p)
        return params

    def _probe_train(self, mem, fc, r, residual=True):
        from .memory import train_pass

        params = self._with_grads(residual)
        rows = self._rows(r)
        ins = [self._latents(r) for _ in range(4)]
        meter = _Meter(mem, fc)
        train_pass(self._ctx(residual), rows, ins[0], ins[1] if residual else None, ins[2],
                   ins[3] if residual else None, float(r), 1.0, 1.0)
        meter.peak("P")
        meter.flops("flops")
        for p in params:
            p.grad = None
        return meter.out

    def _probe_train_nof(self, mem, fc, r):
        return self._probe_train(mem, fc, r, residual=False)

    def _naive(self, mem, fc, r, residual):
        """The whole naive schedule, phase by phase (memory.py's phase marks)."""
        from . import memtrack
        from .memory import Rows, _naive

        params = self._with_grads(residual)
        rows = self._rows(r)
        rows = Rows(rows.x, rows.x_next, rows.eps_sampled, rows.step_index, rows.cond, rows.prompts,
                    torch.arange(r) == 0)  # one last transition, as in every batch
        base = mem.current
        rec = memtrack.Recorder(torch.device("cpu"), mem)
        memtrack._ACTIVE = rec
        try:
            f0 = fc.get_total_flops()
            _naive(self._ctx(residual), rows, float(r), 1.0, 1.0)
            flops = fc.get_total_flops() - f0
        finally:
            memtrack._ACTIVE = None
        for p in params:
            p.grad = None
        out = {name: max(0, s.peak_bytes - base) for name, s in rec.phases.items()}
        out["flops"] = float(flops)
        return out

    def _probe_naive(self, mem, fc, r):
        return self._naive(mem, fc, r, residual=True)

    def _probe_naive_nof(self, mem, fc, r):
        return self._naive(mem, fc, r, residual=False)


# ----------------------------------------------------------------------------- profiles (cached probes)

def cache_dir() -> Path:
    return Path(os.environ.get("LOWMEM_NABLAGFN_CACHE", Path.home() / ".cache" / "lowmem_nablagfn")) / "planner"


class MissingProbe(LookupError):
    """A probe is not in the cached profile and tracing was not allowed."""


class Profile:
    """Probe results of one architecture (``arch_key``), traced on demand, cached on disk.

    Args:
        cfg: any configuration of the architecture (memory knobs and batch sizes do not matter).
        verbose: report each probe traced (to stderr).
        cache: read and write the cache directory (the shipped profiles are read either way).
        allow_trace: trace missing probes (else raise :class:`MissingProbe`).
    """

    def __init__(self, cfg: Config, verbose: bool = False, cache: bool = True, allow_trace: bool = True):
        self.cfg = cfg
        self.models = build_meta(cfg)
        self.key = arch_key(cfg, self.models)
        self.static = static_sizes(cfg, self.models)
        self.hash = key_hash(self.key)
        self.verbose, self.cache, self.allow_trace = verbose, cache, allow_trace
        self._memo: Dict[tuple, Dict[str, float]] = {}
        self.path = cache_dir() / f"{self.hash}.json"
        self.data: Dict[str, Dict[str, float]] = {}
        for path in (SHIPPED / f"{self.hash}.json", self.path):
            if path.is_file() and (cache or path.parent == SHIPPED):
                stored = json.loads(path.read_text())
                if stored.get("key") == json.loads(json.dumps(self.key, default=str)):
                    self.data.update(stored["probes"])
        self._tracer: Optional[Tracer] = None

    @property
    def source(self) -> str:
        return self.models.source

    def _trace(self, name: str, flags: dict, r: int) -> Dict[str, float]:
        if self._tracer is None:
            self._tracer = Tracer(self.cfg, self.models)
        if self.verbose:
            import sys
            import time

            t0 = time.perf_counter()
            out = self._tracer.probe(name, flags, r)
            print(f"  traced {name} {flags} rows={r}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            return out
        return self._tracer.probe(name, flags, r)

    def get(self, name: str, flags: Optional[dict] = None, rows: float = 1.0) -> Dict[str, float]:
        """Every quantity of probe ``name`` at ``rows`` (linear in rows through the 1- and 2-row traces)."""
        flags = {k: bool(v) for k, v in sorted((flags or {}).items())}
        tag = name + "".join(f"|{k}" for k, v in flags.items() if v)
        memo = (tag, float(rows))
        if memo in self._memo:
            return self._memo[memo]
        points = []
        for r in (1, 2):
            k = f"{tag}|r={r}"
            if k not in self.data:
                if not self.allow_trace:
                    raise MissingProbe(k)
                self.data[k] = self._trace(name, flags, r)
                self.save()
            points.append(self.data[k])
        out = {q: max(0.0, points[0][q] + (points[1][q] - points[0][q]) * (rows - 1)) for q in points[0]}
        self._memo[memo] = out
        return out

    def save(self, path: Optional[Path] = None) -> Path:
        path = path or self.path
        if not self.cache and path == self.path:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one job may write at once
        tmp.write_text(json.dumps({"key": self.key, "probes": self.data}, indent=1, sort_keys=True, default=str))
        tmp.replace(path)
        return path


# ----------------------------------------------------------------------------- prediction

@dataclass
class Prediction:
    """Predicted peak bytes of each phase of a configuration (on the training device, per process)."""

    phases: Dict[str, float]
    resident: Dict[str, float]
    """What stays allocated through the training phases: weights (text encoder included, also when
    offloaded: see ``text_encoder``), optimiser state, gradients, trajectories, the batch's rows."""
    tflop_per_update: float
    """Estimated work of one optimiser update incl. its share of sampling (TFLOP + per-call overhead)."""
    capability: Tuple[int, int] = DEFAULT_CAPABILITY
    """The card's compute capability the prediction assumes (attention kernel, CUDA context)."""
    kernels: Dict[str, str] = field(default_factory=dict)
    """Attention kernel per model (``flash`` / ``mem_efficient`` / ``math``) on that card."""
    allowances: Dict[str, float] = field(default_factory=dict)
    """GPU-only bytes included in each phase (cuDNN workspace + attention scratch; 0 on the CPU)."""
    notes: List[str] = field(default_factory=list)
    """Warnings (e.g. the math attention kernel would run)."""

    @property
    def peak(self) -> float:
        """Predicted ``max_memory_allocated`` (bytes)."""
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def reserved_gib(self, fragmentation: Optional[float] = None) -> float:
        """Predicted ``max_memory_reserved`` (GiB): the peak plus allocator fragmentation."""
        frag = fragmentation_default() if fragmentation is None else fragmentation
        return self.peak / GiB * (1 + frag)

    def required_gib(self, fragmentation: Optional[float] = None, context_gib: Optional[float] = None,
                     slack_gib: float = MIN_SLACK_GIB) -> float:
        """Card memory needed: reserved + CUDA context (outside the allocator) + the minimum slack."""
        ctx = card_context_gib(self.capability) if context_gib is None else context_gib
        return self.reserved_gib(fragmentation) + ctx + slack_gib

    def fits(self, vram_gib: float, fragmentation: Optional[float] = None,
             context_gib: Optional[float] = None) -> bool:
        return self.required_gib(fragmentation, context_gib) <= vram_gib


def kept_per_trajectory(cfg: Config) -> int:
    from .subsample import num_blocks

    t = cfg.sampling.num_steps
    return min(num_blocks(t, cfg.model.timestep_fraction) + 1, t)


def optimizer_state_bytes(cfg: Config, numels: Sequence[int]) -> float:
    if cfg.training.optimizer == "adamw":
        return 8.0 * sum(numels)
    # bitsandbytes: 8-bit states (1 byte each, 2 states) + fp32 absmax per 2048-block for tensors of
    # >= 4096 elements (min_8bit_size); 32-bit states below
    return sum(2 * n + 8 * math.ceil(n / 2048) if n >= 4096 else 8 * n for n in numels)


# Relative cost of a pass call beyond its FLOPs: a one-row call runs far from a GPU's peak throughput.
CALL_OVERHEAD = 0.3


def default_capability(cfg: Config) -> Tuple[int, int]:
    """This process's CUDA device when ``cfg`` runs on it, else :data:`DEFAULT_CAPABILITY`."""
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0)))
    return DEFAULT_CAPABILITY


def predict(cfg: Config, profile: Profile, capability: Optional[Tuple[int, int]] = None) -> Prediction:
    """Phase-by-phase peak bytes of ``cfg`` (same architecture as ``profile``) on a card of this
    compute ``capability`` (default: :func:`default_capability`).

    On the CPU (``device=cpu``) the phases are what the live-bytes tracker measures; on a GPU they
    add the cuDNN workspace and attention scratch allowances, and the attention passes are traced
    with the kernel the card and dtype get (the math kernel's attention matrices included)."""
    st, mem, s, t = profile.static, cfg.memory, cfg.sampling, cfg.training
    residual = not cfg.model.no_flow
    capability = tuple(capability or default_capability(cfg))
    gpu = cfg.device != "cpu"
    kernels = attention_kernels(cfg, profile.models, capability) if gpu else {}
    math_u = {"math": True} if kernels.get("unet") == "math" or kernels.get("vae") == "math" else {}
    math_f = {"math_flow": True} if kernels.get("flow") == "math" else {}
    c, h, w = st["latent_shape"]
    latent = c * h * w
    text = st["text_shape"][0] * st["text_shape"][1] * st["text_itemsize"]
    from .sampling import TRANSITION_DTYPES

    storage = torch.empty((), dtype=TRANSITION_DTYPES[mem.transition_dtype]).element_size()  # kept transitions
    kept = kept_per_trajectory(cfg)
    numels = list(st["trainable_numels"])
    if not residual:
        numels = numels[:len(profile.models.lora_params)]

    # resident bytes
    weights = st["unet"] + st["lora"] + st["vae"] + st["reward"] + (st["flow"] if residual else 0)
    text_encoder = 0 if mem.offload_text_encoder else st["text_encoder"]
    opt = optimizer_state_bytes(cfg, numels)
    grads = 4.0 * sum(numels)
    per_traj = kept * 3 * latent * storage + text + latent * 4 + kept * 8 + 4
    n_epoch = s.batch_size * s.num_batches_per_epoch
    lag = 1 if t.on_policy else 2  # the official loop trains on last epoch's samples while holding new ones
    if mem.offload_trajectories:
        traj_train, traj_sample = 0.0, s.batch_size * per_traj
    else:
        traj_train, traj_sample = lag * n_epoch * per_traj, lag * n_epoch * per_traj
    if not mem.store_only_trained:  # all T steps of the sampling batch are stored, then gathered
        traj_sample += s.batch_size * s.num_steps * 3 * latent * storage
    base = weights + text_encoder + opt

    # sampling, encode, final reward (no graph)
    b = s.batch_size
    loop = 5 * b * latent * 4
    phases = {}
    phases["encode"] = base + traj_sample + (st["text_encoder"] - text_encoder) + profile.get("encode", rows=b)["Pi"]
    phases["sampling"] = base + traj_sample + loop + profile.get("unet_sample", math_u, rows=b)["Pi"]
    vae_ng, rew_ng = profile.get("vae_nograd", math_u, rows=b), profile.get("reward_nograd", rows=b)
    phases["final_reward"] = base + traj_sample + max(vae_ng["Pi"], vae_ng["Out"] + rew_ng["Pi"])

    # one training batch: R rows (K+1 per trajectory), chunks of the input-gradient and training passes
    rows = t.batch_size * kept
    live = rows - t.batch_size  # rows with a UNet call at x_{t-1} and a reward gradient at x_t
    ci = min(mem.input_grad_chunk or rows, rows)
    ct = min(mem.train_chunk or rows, rows)
    batch = t.batch_size * per_traj + rows * (3 * latent * 4 + text) + 4 * rows * latent * 4
    train_base = base + grads + traj_train + batch
    flags_u = {"unet": mem.checkpoint_unet, **math_u}
    if mem.mode in ("naive", "official"):
        # official: the naive passes on one transition slot (B rows) at a time, K+1 graphs in turn
        graph_rows, graphs = (t.batch_size, kept) if mem.mode == "official" else (rows, 1)
        ci = ct = graph_rows
        naive_flags = {"unet": mem.checkpoint_unet, "vae": mem.checkpoint_vae,
                       "reward": mem.checkpoint_reward and st["reward_has_blocks"],
                       "flow": residual and mem.checkpoint_flow, **math_u, **(math_f if residual else {})}
        probe = "naive" if residual else "naive_nof"
        n = profile.get(probe, naive_flags, rows=graph_rows)
        for name in ("reference", "policy", "reward_grad_next", "reward_grad_cur", "train"):
            if name in n:
                phases[name] = train_base + n[name]
        train_flops = graphs * (n["flops"] + CALL_OVERHEAD * profile.get(probe, naive_flags, rows=1)["flops"])
    else:
        flags_v = {"vae": mem.checkpoint_vae, **math_u}
        flags_r = {"reward": mem.checkpoint_reward and st["reward_has_blocks"]}

        def chain(unet_rows: float, rows_: float) -> float:
            """Peak of one reward-gradient chunk: UNet graph alive while the VAE and reward run."""
            u = profile.get("unet_chain", flags_u, rows=unet_rows) if unet_rows > 0 else None
            v, rw = profile.get("vae", flags_v, rows=rows_), profile.get("reward", flags_r, rows=rows_)
            fu = u["F"] if u else 0.0
            return max(u["Pf"] if u else 0.0, fu + v["Pf"], fu + v["F"] + max(rw["Pf"], rw["Pb"]),
                       fu + v["Pb"], u["Pb"] if u else 0.0)

        # at x_{t-1} the last transitions skip the UNet (x̂0 = x_{t-1}); x_t only needs the others
        phases["reward_grad_next"] = train_base + chain(min(ci, live), ci)
        if residual and live > 0:
            phases["reward_grad_cur"] = train_base + chain(min(ci, live), min(ci, live))
        ref = profile.get("reference" if residual else "reference_nograd", flags_u if residual else math_u, rows=ci)
        phases["reference"] = train_base + ref["P"]
        tr_flags = dict(flags_u, flow=mem.checkpoint_flow, **math_f) if residual else flags_u
        tr = profile.get("train" if residual else "train_nof", tr_flags, rows=ct)
        phases["train"] = train_base + tr["P"]

        def work(probe, flags, n, chunk, keys):
            if n <= 0:
                return 0.0
            calls = math.ceil(n / chunk)
            one = profile.get(probe, flags, rows=1)
            full = profile.get(probe, flags, rows=n / calls)
            return calls * sum(full[k] + CALL_OVERHEAD * one[k] for k in keys)

        grad_keys = ("flops_f", "flops_b")
        train_flops = (work("unet_chain", flags_u, live, ci, grad_keys)
                       + work("vae", flags_v, rows, ci, grad_keys) + work("reward", flags_r, rows, ci, grad_keys)
                       + work("reference" if residual else "reference_nograd", flags_u if residual else math_u,
                              rows, ci, ("flops",))
                       + work("train" if residual else "train_nof", tr_flags, rows, ct, ("flops",)))
        if residual:
            train_flops += (work("unet_chain", flags_u, live, ci, grad_keys)
                            + work("vae", flags_v, live, ci, grad_keys) + work("reward", flags_r, live, ci, grad_keys))
    phases["optimizer"] = base + grads + traj_train + 2.0 * 4 * sum(numels)

    # GPU-only memory (allowances; see the constants): cuDNN workspaces, attention backward scratch
    allowances = {name: 0.0 for name in phases}
    notes = []
    if gpu:
        scratch = ATTN_SCRATCH_BYTES * h * w * max(profile.models.unet.config.block_out_channels[0],
                                                   profile.models.vae.config.block_out_channels[-1])
        for name in phases:
            if name in ("reward_grad_next", "reward_grad_cur", "reference", "policy"):
                allowances[name] = CUDNN_WORKSPACE_GIB["grad"] * GiB + scratch * ci
            elif name == "train":
                allowances[name] = CUDNN_WORKSPACE_GIB["grad"] * GiB + scratch * ct
            elif name in ("sampling", "final_reward"):
                allowances[name] = CUDNN_WORKSPACE_GIB["nograd"] * GiB
            phases[name] += allowances[name]
        math_parts = [k for k, v in kernels.items() if v == "math"]
        if math_parts:
            why = ("memory.attention=math" if mem.attention == "math" else
                   f"{t.mixed_precision} attention on a sm{capability[0]}{capability[1]} card has neither a flash "
                   f"nor a memory-efficient kernel (bf16 needs sm80+; use training.mixed_precision=fp16)")
            notes.append(f"attention of the {', '.join(math_parts)} runs on the math SDPA kernel ({why}): "
                         f"the attention matrices are materialised (included in the prediction)")

    # work of one update: its training batches plus its share of the epoch's sampling
    updates_per_epoch = max(1, n_epoch // (t.batch_size * t.gradient_accumulation_steps))
    sample_call = profile.get("unet_sample", rows=b)["flops_f"] + CALL_OVERHEAD * profile.get("unet_sample", rows=1)["flops_f"]
    sample_flops = s.num_batches_per_epoch * s.num_steps * sample_call
    tflop = (t.gradient_accumulation_steps * train_flops + sample_flops / updates_per_epoch) / 1e12
    resident = {"weights": weights + st["text_encoder"], "text_encoder": st["text_encoder"],
                "optimizer_state": opt, "gradients": grads, "trajectories": traj_train, "batch_rows": batch}
    return Prediction(phases, resident, tflop, capability, kernels, allowances, notes)


# ----------------------------------------------------------------------------- proposals

KNOBS = ("memory.checkpoint_unet", "memory.checkpoint_vae", "memory.checkpoint_reward", "memory.checkpoint_flow",
         "memory.input_grad_chunk", "memory.train_chunk", "training.batch_size",
         "training.gradient_accumulation_steps", "sampling.batch_size", "sampling.num_batches_per_epoch",
         "memory.offload_text_encoder", "memory.offload_trajectories", "training.optimizer", "model.no_flow",
         "memory.mode")


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, key: str, value) -> None:
    *path, last = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def overrides(base: Config, cand: Config) -> List[str]:
    """The dotted ``key=value`` overrides that turn ``base`` into ``cand``."""
    out = []
    for key in KNOBS:
        a, b = _get(base, key), _get(cand, key)
        if a != b:
            out.append(f"{key}={str(b).lower() if isinstance(b, bool) else b}")
    return out


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _chunks(rows: int) -> List[int]:
    sizes = [0] + [c for c in (1, 2, 3, 4, 6, 8, 12, 16) if c < rows]
    return sizes


def candidates(cfg: Config, st: dict, tier: int) -> Iterator[Config]:
    """Configurations of one tier (see the module docstring), all computing the same update."""
    t, s = cfg.training, cfg.sampling
    per_update = t.batch_size * t.gradient_accumulation_steps
    per_epoch = s.batch_size * s.num_batches_per_epoch
    mem, training, model = replace(cfg.memory, mode="optimized"), cfg.training, cfg.model
    if tier >= 2:
        mem = replace(mem, offload_text_encoder=True, offload_trajectories=True)
    if tier >= 3 and training.optimizer == "adamw" and cfg.distributed.backend == "ddp":
        training = replace(training, optimizer="adamw8bit")
    if tier >= 4:
        model = replace(model, no_flow=True)
    residual = not model.no_flow
    kept = kept_per_trajectory(cfg)
    flag_sets = list(itertools.product((False, True), (False, True),
                                       (False, True) if st["reward_has_blocks"] else (False,),
                                       (False, True) if residual else (False,)))
    batches = [b for b in _divisors(t.batch_size) if per_update % b == 0 and per_epoch % b == 0]
    for (cu, cv, cr, cf), b, sb in itertools.product(flag_sets, batches, _divisors(s.batch_size)):
        rows = b * kept
        tr = replace(training, batch_size=b, gradient_accumulation_steps=per_update // b)
        sa = replace(s, batch_size=sb, num_batches_per_epoch=per_epoch // sb)
        for ci, ct in itertools.product(_chunks(rows), _chunks(rows)):
            m = replace(mem, checkpoint_unet=cu, checkpoint_vae=cv, checkpoint_reward=cr, checkpoint_flow=cf,
                        input_grad_chunk=ci, train_chunk=ct)
            yield replace(cfg, memory=m, training=tr, sampling=sa, model=model)


@dataclass
class Proposal:
    config: Config
    prediction: Prediction
    overrides: List[str]
    tier: int


def _evaluated(cfg: Config, profile: Profile, tier: int,
               capability: Optional[Tuple[int, int]] = None) -> List[Tuple[tuple, Config, Prediction]]:
    """Every distinct candidate of a tier with its prediction and rank (memoised on the profile).

    Cards whose attention runs on the math kernel in the same models share the bytes and the work
    (only the CUDA context differs, which :func:`propose` adds), so they share the evaluation."""
    math_parts = ()
    if cfg.device != "cpu":
        kernels = attention_kernels(cfg, profile.models, tuple(capability or default_capability(cfg)))
        math_parts = tuple(sorted(k for k, v in kernels.items() if v == "math"))
    key = (json.dumps(to_dict(cfg), sort_keys=True, default=str), tier, math_parts)
    memo = profile.__dict__.setdefault("_evaluated", {})
    if key not in memo:
        out, seen = [], set()
        for cand in candidates(cfg, profile.static, tier):
            ov = tuple(overrides(cfg, cand))
            if ov in seen:
                continue
            seen.add(ov)
            pred = predict(cand, profile, capability)
            # estimates within 1 % are ties: then the larger training and sampling batches win
            rank = (round(math.log(max(pred.tflop_per_update, 1e-9)) / math.log(1.01)),
                    -cand.training.batch_size, -cand.sampling.batch_size, len(ov), ov)
            out.append((rank, cand, pred))
        out.sort(key=lambda item: item[0])
        memo[key] = out
    return memo[key]


def propose(cfg: Config, profile: Profile, vram_gib: float, fragmentation: Optional[float] = None,
            context_gib: Optional[float] = None,
            capability: Optional[Tuple[int, int]] = None) -> Optional[Proposal]:
    """The fastest configuration that fits ``vram_gib`` with :data:`MIN_SLACK_GIB` to spare, from
    the first tier with one; None if none fits."""
    cap = tuple(capability or default_capability(cfg))
    ctx = card_context_gib(cap) if context_gib is None else context_gib
    for tier in (1, 2, 3, 4):
        if tier == 4 and cfg.model.no_flow:
            break
        for rank, cand, pred in _evaluated(cfg, profile, tier, cap):
            if pred.fits(vram_gib, fragmentation, ctx):
                return Proposal(cand, predict(cand, profile, cap), overrides(cfg, cand), tier)
    return None


# ----------------------------------------------------------------------------- reports

PHASE_ORDER = ("encode", "sampling", "final_reward", "reward_grad_next", "reward_grad_cur", "reference",
               "policy", "train", "optimizer")


def phase_table(pred: Prediction, measured: Optional[Dict[str, float]] = None) -> str:
    head = "| phase | predicted peak (GiB) |" + (" measured (GiB) | error |" if measured else "")
    lines = [head, "| --- | ---: |" + (" ---: | ---: |" if measured else "")]
    for name in PHASE_ORDER:
        if name not in pred.phases:
            continue
        row = f"| {name} | {pred.phases[name] / GiB:.3f} |"
        if measured:
            got = measured.get(name)
            row += (f" {got / GiB:.3f} | {pred.phases[name] / got - 1:+.1%} |" if got else " – | – |")
        lines.append(row)
    return "\n".join(lines)


def describe(cfg: Config, profile: Profile, vram_gib: Optional[float] = None,
             fragmentation: Optional[float] = None, context_gib: Optional[float] = None,
             capability: Optional[Tuple[int, int]] = None) -> Tuple[str, dict]:
    """Human-readable plan of ``cfg`` (and a proposal when ``vram_gib`` is given), plus a JSON summary."""
    pred = predict(cfg, profile, capability)
    frag = fragmentation_default() if fragmentation is None else fragmentation
    ctx = card_context_gib(pred.capability) if context_gib is None else context_gib
    kernels = ", ".join(f"{k} {v}" for k, v in pred.kernels.items())
    out = [f"model: {profile.source}, {cfg.sampling.resolution} px, {cfg.training.mixed_precision}, "
           f"reward {cfg.reward.name}; {'no-flow' if cfg.model.no_flow else 'residual'}, "
           f"memory.mode={cfg.memory.mode}, memory.attention={cfg.memory.attention}"
           + (f" (sm{pred.capability[0]}{pred.capability[1]}: {kernels})" if kernels else ""),
           "", phase_table(pred), "",
           "resident: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in pred.resident.items()),
           f"predicted peak (max_memory_allocated): {pred.peak / GiB:.2f} GiB in {pred.peak_phase}"
           + (f", of which {pred.allowances[pred.peak_phase] / GiB:.2f} GiB cuDNN workspace and attention "
              f"scratch allowances" if pred.allowances.get(pred.peak_phase) else "")
           + f"; reserved (+{frag:.0%} fragmentation): {pred.reserved_gib(frag):.2f} GiB; needs with the "
           f"CUDA context ({ctx} GiB) and the minimum slack ({MIN_SLACK_GIB} GiB): "
           f"{pred.required_gib(frag, ctx):.2f} GiB; estimated work {pred.tflop_per_update:.1f} TFLOP per update"]
    out += [f"warning: {n}" for n in pred.notes]
    summary = {"phases_gib": {k: v / GiB for k, v in pred.phases.items()}, "peak_gib": pred.peak / GiB,
               "peak_phase": pred.peak_phase, "reserved_gib": pred.reserved_gib(frag),
               "required_gib": pred.required_gib(frag, ctx), "min_slack_gib": MIN_SLACK_GIB,
               "attention_kernels": pred.kernels, "notes": pred.notes,
               "tflop_per_update": pred.tflop_per_update}
    if vram_gib is not None:
        fits = pred.fits(vram_gib, frag, ctx)
        prop = propose(cfg, profile, vram_gib, frag, ctx, capability)
        summary.update(vram_gib=vram_gib, fits=fits)
        out.append(f"card: {vram_gib:.1f} GiB -> {'fits' if fits else 'does NOT fit'} "
                   f"(slack {vram_gib - pred.required_gib(frag, ctx) + MIN_SLACK_GIB:.2f} GiB; "
                   f"fitting needs >= {MIN_SLACK_GIB} GiB)")
        if prop is None:
            out.append("no configuration of the searched knobs fits this card")
        elif prop.overrides and (not fits or prop.prediction.tflop_per_update < pred.tflop_per_update * 0.98):
            word = "proposed" if not fits else "faster and fits"
            out.append(f"{word} (tier {prop.tier}): {' '.join(prop.overrides)}")
            out.append(f"  predicted peak {prop.prediction.peak / GiB:.2f} GiB ({prop.prediction.peak_phase}), "
                       f"slack {vram_gib - prop.prediction.required_gib(frag, ctx) + MIN_SLACK_GIB:.2f} GiB, "
                       f"work {prop.prediction.tflop_per_update:.1f} TFLOP per update")
        if prop is not None:
            summary.update(proposal=prop.overrides, proposal_peak_gib=prop.prediction.peak / GiB,
                           proposal_tier=prop.tier)
    return "\n".join(out), summary


def check_fits(cfg: Config, vram_gib: float, verbose: bool = False) -> Optional[str]:
    """None when ``cfg`` is predicted to fit ``vram_gib``; else the refusal message with a proposal."""
    import sys

    profile = Profile(cfg, verbose=verbose)
    pred = predict(cfg, profile)
    for note in pred.notes:
        print(f"warning: {note}", file=sys.stderr)
    if pred.fits(vram_gib):
        return None
    prop = propose(cfg, profile, vram_gib)
    frag = fragmentation_default()
    msg = (f"this configuration is predicted not to fit this GPU: peak {pred.peak / GiB:.2f} GiB in "
           f"{pred.peak_phase} (+{frag:.0%} fragmentation + {card_context_gib(pred.capability)} GiB CUDA "
           f"context + {MIN_SLACK_GIB} GiB minimum slack = {pred.required_gib():.2f} GiB) > {vram_gib:.1f} GiB.")
    if prop is not None:
        msg += (f"\nProposed: add the overrides\n    {' '.join(prop.overrides)}\n"
                f"(predicted peak {prop.prediction.peak / GiB:.2f} GiB). ")
    else:
        msg += "\nNo combination of the memory options fits; use a larger GPU. "
    msg += "Run `lowmem-nablagfn plan` for details, or pass --force to train anyway."
    return msg


#: The official code's schedule and retention at the same batch sizes: the baseline of every "vs"
#: figure (planner table, benchmarks/memory.py, update_time.py, plan_targets.py, gpu_validate.py).
OFFICIAL_OVERRIDES = ["memory.mode=official", "memory.checkpoint_unet=false", "memory.checkpoint_vae=false",
                      "memory.checkpoint_reward=false", "memory.checkpoint_flow=false", "memory.input_grad_chunk=0",
                      "memory.train_chunk=0", "memory.store_only_trained=false",
                      "memory.offload_trajectories=false", "memory.offload_text_encoder=false"]


def official_baseline(cfg: Config) -> Config:
    """``cfg`` with the official code's memory schedule (:data:`OFFICIAL_OVERRIDES`)."""
    out = copy.deepcopy(cfg)
    for item in OFFICIAL_OVERRIDES:
        key, value = item.split("=")
        _set(out, key, {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value))
    return out


def table(presets: Sequence[str], cards: Dict[str, float], verbose: bool = False,
          fragmentation: Optional[float] = None, context_gib: Optional[float] = None) -> str:
    """Markdown: for each preset and card, the predicted peaks of the official schedule and of the
    preset, and the proposed settings with their estimated work per update relative to the official
    schedule's (the attention kernel and CUDA context of the card class, :data:`CARD_CAPABILITY`)."""
    lines = ["| preset | card (GiB) | official peak (GiB) | preset peak (GiB) | preset fits | proposed overrides "
             "| proposed peak (GiB) | slack (GiB) | est. work vs official |",
             "| --- | --- | ---: | ---: | :---: | --- | ---: | ---: | ---: |"]
    for name in presets:
        cfg = load_config(name)
        profile = Profile(cfg, verbose=verbose)
        for card, gib in cards.items():
            cap = CARD_CAPABILITY.get(card, DEFAULT_CAPABILITY)
            kernels = attention_kernels(cfg, profile.models, cap)
            if "math" in kernels.values() and cfg.memory.attention != "math":
                # a misconfiguration to fix, not to plan around (the math kernel's matrices are GiBs)
                lines.append(f"| {name} | {card} ({gib:g}) | – | – | – | {cfg.training.mixed_precision} attention "
                             f"has no fused kernel on sm{cap[0]}{cap[1]} (math kernel): set "
                             f"`training.mixed_precision=fp16` | – | – | – |")
                continue
            pred = predict(cfg, profile, cap)
            official = predict(official_baseline(cfg), profile, cap)
            prop = propose(cfg, profile, gib, fragmentation, context_gib, cap)
            fits = pred.fits(gib, fragmentation, context_gib)
            if prop is None:
                settings, peak, slack, work = "nothing fits", "–", "–", "–"
            else:
                settings = " ".join(f"`{o}`" for o in prop.overrides) or "as is"
                peak = f"{prop.prediction.peak / GiB:.2f}"
                slack = f"{gib - prop.prediction.required_gib(fragmentation, context_gib) + MIN_SLACK_GIB:.2f}"
                work = f"{prop.prediction.tflop_per_update / official.tflop_per_update:.2f}x"
            lines.append(f"| {name} | {card} ({gib:g}) | {official.peak / GiB:.2f} | {pred.peak / GiB:.2f} | "
                         f"{'yes' if fits else 'no'} | {settings} | {peak} | {slack} | {work} |")
    return "\n".join(lines)


def gpu_presets() -> List[str]:
    return [p for p in list_presets() if load_config(p).device != "cpu"]


__all__ = ["CARDS", "OFFICIAL_OVERRIDES", "official_baseline", "Prediction", "Profile", "Proposal", "Tracer", "build_meta", "check_fits", "describe",
           "overrides", "parse_vram", "predict", "propose", "table"]


# ----------------------------------------------------------------------------- entry points

def cuda_vram_gib() -> Optional[float]:
    """Memory of this process's CUDA device (GiB), or None without one."""
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", 0))
    return torch.cuda.get_device_properties(index).total_memory / GiB


def preflight(cfg: Config) -> Optional[str]:
    """The check ``train`` runs first: None on the CPU or when ``cfg`` is predicted to fit the GPU,
    else the refusal message (with the proposed overrides)."""
    if cfg.device == "cpu":
        return None
    vram = cuda_vram_gib()
    if vram is None:
        return None
    return check_fits(cfg, vram, verbose=True)  # an architecture traced for the first time takes minutes


def main(cfg: Config, args) -> int:
    """``lowmem-nablagfn plan`` (see :mod:`lowmem_nablagfn.cli`)."""
    frag = None if args.headroom is None else args.headroom
    if args.table:
        print(table(gpu_presets(), CARDS, verbose=args.verbose, fragmentation=frag))
        return 0
    vram = parse_vram(args.vram) if args.vram else cuda_vram_gib()
    cap = None
    if args.vram:  # a card name gives its class; a bare size keeps this machine's (or the default)
        cap = next((c for n, c in CARD_CAPABILITY.items()
                    if args.vram.lower().replace("-", "") == n.lower().replace("-", "")), None)
    text, summary = describe(cfg, Profile(cfg, verbose=args.verbose), vram, frag, capability=cap)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary.get("fits", True) else 1
