"""Which weights train: the peft LoRA adapter on the UNet, the reference policy (the same UNet
with its adapter off), and the frozen parts (no gradients, cast, eval mode)."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
from torch import nn


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


TARGET_HINT = ("name Linear or Conv2d layers by their full or trailing dotted name, e.g. the attention "
               "projections to_q, to_k, to_v, to_out.0 (the default) or the feed-forward ff.net.0.proj, ff.net.2")


def target_problem(unet: nn.Module, target_modules: List[str]) -> Optional[str]:
    """Why ``model.lora.target_modules`` cannot adapt ``unet`` (entries that name no module, by peft's
    own matching rule), or None.  Cheap on a ``meta``-device UNet: the CLI checks before any weight loads."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in target_modules
               if not any(check_target_module_exists(LoraConfig(target_modules=[t]), name) for name in names)]
    if not missing:
        return None
    return (f"model.lora.target_modules={list(target_modules)}: no module of the UNet matches "
            f"{', '.join(map(repr, missing))}; {TARGET_HINT}")


def add_lora(unet: nn.Module, rank: int, target_modules: List[str], init: str = "gaussian",
             seed: int = 0) -> List[nn.Parameter]:
    """Attach a peft LoRA adapter (alpha = rank) and return its parameters, cast to fp32."""
    from peft import LoraConfig

    problem = target_problem(unet, target_modules)
    if problem is not None:
        raise ValueError(problem)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules),
                                        init_lora_weights=True if init == "default" else init))
        except ValueError as exc:  # e.g. a norm layer: peft adapts Linear / Conv / Embedding layers only
            raise ValueError(f"model.lora.target_modules={list(target_modules)}: {str(exc).splitlines()[0]}; "
                             f"{TARGET_HINT}") from None
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no LoRA parameter was created: model.lora.target_modules={target_modules}; {TARGET_HINT}")
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
