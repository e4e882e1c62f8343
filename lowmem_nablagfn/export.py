"""Exporting a run's LoRA (found by :mod:`~lowmem_nablagfn.targets`): diffusers format (what the
trainer writes) or the kohya format read by AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI.

kohya naming (SD 1.x, diffusers module paths with ``_`` for ``.``)::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (r, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (out, r)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             ()  = α

The update is ``W += (α / r) · up @ down``.  The renaming is diffusers' own
(``convert_unet_state_dict_to_peft`` then ``convert_state_dict_to_kohya``); this module only adds
the ``alpha`` values (this project's adapters use ``lora_alpha = rank``, so α / r = 1) and the
kohya metadata.  ``StableDiffusionPipeline.load_lora_weights`` reads both formats (tested: same
latents at a fixed seed).

SDXL: kohya's sd-scripts name SDXL modules by the original (SGM) UNet's blocks, which is what
A1111 and ComfyUI expect of an SDXL LoRA, so the attention blocks are renamed
(``L`` = ``layers_per_block``, 2 for SDXL)::

    lora_unet_down_blocks_{i}_attentions_{j}_…  ->  lora_unet_input_blocks_{1 + i(L+1) + j}_1_…
    lora_unet_mid_block_attentions_0_…          ->  lora_unet_middle_block_1_…
    lora_unet_up_blocks_{i}_attentions_{j}_…    ->  lora_unet_output_blocks_{i(L+1) + j}_1_…

(e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``);
``StableDiffusionXLPipeline.load_lora_weights`` maps them back (tested: same latents).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import Tensor

from .dtypes import STORAGE_DTYPES, to_dtype
from .targets import load_lora_file, resolve_target

FORMATS = ("kohya", "diffusers")


# ----------------------------------------------------------------------------- formats

def is_kohya(state: Dict[str, Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in state)


def _adapter_alpha(metadata: Optional[dict]) -> Optional[float]:
    """The UNet's ``lora_alpha`` from diffusers' adapter metadata (``{"unet.lora_alpha": …}``), if written."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return None
    alpha = meta.get("unet.lora_alpha", meta.get("lora_alpha")) if isinstance(meta, dict) else None
    return None if alpha is None else float(alpha)


def diffusers_to_kohya(state: Dict[str, Tensor], alpha: Optional[float] = None) -> Dict[str, Tensor]:
    """Diffusers-format LoRA state dict (``unet.….lora.down.weight``) -> kohya format.

    Args:
        state: keys prefixed by their component (``unet.``, ``text_encoder.``).
        alpha: α of every module; None = each module's rank (``lora_alpha = rank``, α / r = 1).
    """
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    peft: Dict[str, Tensor] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        sub = {k[len(component) + 1:]: v for k, v in state.items() if k.startswith(component + ".")}
        if sub:
            peft.update({f"{component}.{k}": v for k, v in convert_unet_state_dict_to_peft(sub).items()})
    unknown = [k for k in state if k.split(".", 1)[0] not in ("unet", "text_encoder", "text_encoder_2")]
    if unknown or not peft:
        raise ValueError(f"not a diffusers-format LoRA of a Stable Diffusion pipeline: keys like "
                         f"{(unknown or list(state))[:2]}")
    out = convert_state_dict_to_kohya(peft)
    for key in [k for k in out if k.endswith(".alpha")]:
        rank = out[key.replace(".alpha", ".lora_down.weight")].shape[0]
        out[key] = torch.tensor(float(rank if alpha is None else alpha))
    return out


_SGM_BLOCKS = [
    (re.compile(r"^lora_unet_down_blocks_(\d+)_attentions_(\d+)_"), lambda i, j, n: f"lora_unet_input_blocks_{1 + i * (n + 1) + j}_1_"),
    (re.compile(r"^lora_unet_up_blocks_(\d+)_attentions_(\d+)_"), lambda i, j, n: f"lora_unet_output_blocks_{i * (n + 1) + j}_1_"),
]


def kohya_to_sgm_names(state: Dict[str, Tensor], layers_per_block: int = 2) -> Dict[str, Tensor]:
    """kohya names of an SDXL UNet LoRA in diffusers block naming -> the original (SGM) block naming
    that kohya's SDXL trainer writes and A1111 / ComfyUI read (attention layers; see the module doc)."""
    out = {}
    for key, value in state.items():
        new = key.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")
        for pattern, repl in _SGM_BLOCKS:
            new = pattern.sub(lambda m: repl(int(m.group(1)), int(m.group(2)), layers_per_block), new)
        if new.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")):
            raise ValueError(f"{key}: only attention-layer LoRAs have SDXL kohya names here (resnet / "
                             f"sampler layers do not); export with --format diffusers")
        out[new] = value
    return out


def sdxl_layers_per_block(config_file: Optional[Path], state: Dict[str, Tensor]) -> Optional[int]:
    """``layers_per_block`` of the UNet when the LoRA belongs to an SDXL model, else None.

    The run's ``config.json`` names the model (its UNet config tells); without one, an SDXL-wide
    cross-attention input (2048) marks SDXL base."""
    if config_file is not None:
        try:
            model = json.loads(Path(config_file).read_text())["pretrained"]["model"]
            from .models import unet_config_of

            unet = unet_config_of(model)
        except (KeyError, ValueError, OSError, TypeError):
            unet = None
        if unet is not None:
            return int(unet["layers_per_block"]) if unet.get("addition_embed_type") == "text_time" else None
    widths = {v.shape[1] for k, v in state.items() if "attn2.to_k" in k and "lora" in k and "down" in k}
    return 2 if widths == {2048} else None


def export_lora(source: str, out: str | Path, fmt: str = "kohya", dtype: str = "fp32",
                alpha: Optional[float] = None) -> Path:
    """Write the LoRA of ``source`` (see :func:`resolve_target`) to ``out`` in ``fmt``.

    Args:
        fmt: ``kohya`` (A1111 / ComfyUI) or ``diffusers`` (``load_lora_weights``).
        dtype: storage of the weights: ``fp32`` (lossless), ``fp16`` (the usual A1111 size), ``bf16``.
        alpha: kohya α of every module; default the rank (what this project trains with).
    """
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    storage = to_dtype(dtype, STORAGE_DTYPES)
    target = resolve_target(source)
    if target.lora_file is None:
        raise ValueError("the base model has no LoRA to export; give a run, checkpoint or LoRA path")
    state, metadata = load_lora_file(target.lora_file)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        if is_kohya(state):
            raise ValueError(f"{target.lora_file} is already in kohya format; load_lora_weights reads it "
                             f"as it is")
        if dtype == "fp32" and all(v.dtype == torch.float32 for v in state.values()):
            shutil.copyfile(target.lora_file, out)
            return out
        save_file({k: v.to(storage).contiguous() for k, v in state.items()}, str(out),
                  metadata=metadata or {"format": "pt"})
        return out
    if is_kohya(state):
        kohya = state
    else:
        kohya = diffusers_to_kohya(state, alpha if alpha is not None else _adapter_alpha(metadata))
        layers = sdxl_layers_per_block(target.config_file, state)
        if layers is not None:
            kohya = kohya_to_sgm_names(kohya, layers)
    ranks = sorted({v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")})
    alphas = sorted({float(v) for k, v in kohya.items() if k.endswith(".alpha")})
    kohya = {k: (v.float() if k.endswith(".alpha") else v.to(storage)).contiguous()
             for k, v in kohya.items()}
    meta = {"format": "pt", "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(alphas[0]) if len(alphas) == 1 else "Dynamic",
            "ss_training_comment": "lowmem-nablagfn (residual nabla-DB) LoRA"}
    if any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
           for k in kohya):
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    save_file(kohya, str(out), metadata=meta)
    return out


# ----------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run's LoRA (kohya format for A1111/ComfyUI, or diffusers)")
    p.add_argument("source", help="run directory, checkpoint directory, LoRA directory or LoRA file")
    p.add_argument("--format", default="kohya", choices=FORMATS, help="output format (default kohya)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", default="fp32", choices=sorted(STORAGE_DTYPES),
                   help="weight storage (fp16 halves the file; fp32 is lossless)")
    p.add_argument("--alpha", type=float, default=None,
                   help="kohya alpha of every module (default: the rank, i.e. scale alpha/rank = 1)")


def run(args: argparse.Namespace) -> int:
    from .preflight import check_export

    problems = check_export(args.out)
    if problems:
        print("\n".join(f"lowmem-nablagfn export: {p}" for p in problems), file=sys.stderr)
        return 2
    try:
        out = export_lora(args.source, args.out, args.format, args.dtype, args.alpha)
    except (FileNotFoundError, ValueError) as exc:
        print(f"lowmem-nablagfn export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}, {args.dtype})")
    return 0
