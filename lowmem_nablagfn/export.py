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

SD 3.x (a transformer LoRA, diffusers keys ``transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight``):
ComfyUI reads the diffusers file as it is, and the kohya-style file under the ``lora_transformer_``
prefix that its key map gives SD 3 LoRAs (``comfy/lora.py``, ``model_lora_keys_unet``: each diffusers
module path of ``comfy/utils.py``'s ``mmdit_to_diffusers`` with ``_`` for ``.``, the names OneTrainer
writes), e.g. ``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight``.

The base model (kohya's ``ss_base_model_version``: ``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``, what A1111
shows a LoRA with) comes from the run's ``config.json``; a loose file is judged by the width of its
cross-attention inputs (768, 1024, 2048).  Exporting never changes the model: ``--alpha`` rescales the
up-weights by old / new α, so ``(α / r) · up @ down`` stays what was trained.  The file is written
beside ``--out`` and renamed, with the trainer's permissions (:func:`~lowmem_nablagfn.checkpoint.usual_modes`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from .checkpoint import usual_modes
from .dtypes import STORAGE_DTYPES, to_dtype
from .targets import load_lora_file, resolve_target

FORMATS = ("kohya", "diffusers")
#: The kohya-style prefix of an SD 3 transformer LoRA's modules (ComfyUI's key map; see the module doc).
SD3_PREFIX = "lora_transformer_"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


# ----------------------------------------------------------------------------- formats

def is_kohya(state: Dict[str, Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", SD3_PREFIX)) for k in state)


def _adapter_alpha(metadata: Optional[dict]) -> Optional[float]:
    """The denoiser's ``lora_alpha`` from diffusers' adapter metadata (``{"unet.lora_alpha": …}``, SD 3:
    ``transformer.lora_alpha``), if written."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return None
    keys = ("unet.lora_alpha", "transformer.lora_alpha", "lora_alpha")
    alpha = next((meta[k] for k in keys if k in meta), None) if isinstance(meta, dict) else None
    return None if alpha is None else float(alpha)


def diffusers_to_kohya(state: Dict[str, Tensor], trained_alpha: Optional[float] = None) -> Dict[str, Tensor]:
    """Diffusers-format LoRA state dict (``unet.….lora.down.weight``) -> kohya format, the same model
    (another α: :func:`set_alpha`).

    Args:
        state: keys prefixed by their component (``unet.``, ``text_encoder.``).
        trained_alpha: the ``lora_alpha`` it was trained with; None = each module's rank
            (``lora_alpha = rank``, α / r = 1).
    """
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    peft: Dict[str, Tensor] = {}
    for component in COMPONENTS:
        sub = {k[len(component) + 1:]: v for k, v in state.items() if k.startswith(component + ".")}
        if sub:
            peft.update({f"{component}.{k}": v for k, v in convert_unet_state_dict_to_peft(sub).items()})
    unknown = [k for k in state if k.split(".", 1)[0] not in COMPONENTS]
    if unknown or not peft:
        raise ValueError(f"not a diffusers-format LoRA of a Stable Diffusion pipeline: keys like "
                         f"{(unknown or list(state))[:2]}")
    out = {("lora_" + k if k.startswith("transformer_") else k): v  # diffusers names no SD 3 prefix
           for k, v in convert_state_dict_to_kohya(peft).items()}
    for key in [k for k in out if k.endswith(".alpha")]:
        rank = out[key.replace(".alpha", ".lora_down.weight")].shape[0]
        out[key] = torch.tensor(float(rank if trained_alpha is None else trained_alpha))
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


class BaseModel(NamedTuple):
    """The model a LoRA belongs to, as kohya's metadata and block names need it."""

    version: str  # ss_base_model_version: sd_v1 | sd_v2 | sdxl_base_v1-0
    sdxl_layers_per_block: Optional[int]  # the UNet's layers_per_block when SDXL (its kohya names), else None


_SDXL, _SD2, _SD1 = "sdxl_base_v1-0", "sd_v2", "sd_v1"
#: A loose file's base model by the width of its cross-attention inputs (SDXL base: layers_per_block 2).
_BY_WIDTH = {2048: BaseModel(_SDXL, 2), 1024: BaseModel(_SD2, None), 768: BaseModel(_SD1, None)}
#: The down (A) weight of a cross-attention key projection in diffusers, peft and kohya naming.
_CROSS_ATTENTION_DOWN = re.compile(r"attn2[._]to_k\.(lora\.down|lora_A|lora_down)\.weight$")


def _unet_config(config_file: Optional[Path]) -> Optional[dict]:
    """The UNet config of the model the run's ``config.json`` names, or None when it cannot be found."""
    if config_file is None:
        return None
    try:
        from .models import unet_config_of

        return unet_config_of(json.loads(Path(config_file).read_text())["pretrained"]["model"])
    except (KeyError, ValueError, OSError, TypeError):
        return None


def base_model(config_file: Optional[Path], state: Dict[str, Tensor]) -> Optional[BaseModel]:
    """The base model of a LoRA: from the UNet config of the run's ``config.json``, else (a loose file)
    from the width of its cross-attention inputs; None when neither tells.

    Args:
        config_file: the run's resolved ``config.json``, or None.
        state: the LoRA, any naming (diffusers, peft, kohya); only the cross-attention ``to_k`` down
            weights ``(r, cross_attention_dim)`` are read.
    """
    if any(k.startswith(("transformer.", SD3_PREFIX)) for k in state):
        return None  # SD 3: kohya's metadata names no SD 3 base model that ComfyUI reads
    unet = _unet_config(config_file)
    if unet is not None:
        if unet.get("addition_embed_type") == "text_time":
            return BaseModel(_SDXL, int(unet["layers_per_block"]))
        return BaseModel(_SD2 if unet.get("cross_attention_dim") == 1024 else _SD1, None)
    widths = {v.shape[-1] for k, v in state.items() if _CROSS_ATTENTION_DOWN.search(k) and v.ndim == 2}
    return _BY_WIDTH.get(widths.pop()) if len(widths) == 1 else None


def set_alpha(state: Dict[str, Tensor], alpha: float) -> Dict[str, Tensor]:
    """A kohya-format LoRA with every module's α set to ``alpha`` and its up-weights rescaled by
    old α / ``alpha``, so that the update ``(α / r) · up @ down`` — the model — is unchanged.

    Args:
        state: kohya format; a module without an ``.alpha`` has α = r (kohya's default).
        alpha: the new α, positive and finite.
    """
    out = dict(state)
    for key in [k for k in state if k.endswith(".lora_down.weight")]:
        module = key[: -len(".lora_down.weight")]
        rank = state[key].shape[0]
        old = float(state[f"{module}.alpha"]) if f"{module}.alpha" in state else float(rank)
        out[f"{module}.lora_up.weight"] = state[f"{module}.lora_up.weight"].float() * (old / alpha)
        out[f"{module}.alpha"] = torch.tensor(float(alpha))
    return out


def _check_alpha(alpha: Optional[float], fmt: str) -> None:
    if alpha is None:
        return
    if fmt != "kohya":
        raise ValueError(f"--alpha {alpha} applies to --format kohya only (the diffusers format keeps the "
                         f"trained lora_alpha); leave --alpha out or export with --format kohya")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"--alpha {alpha}: the kohya alpha must be a positive finite number (the up-weights "
                         f"are rescaled by old / new alpha, so any such value gives the same LoRA); e.g. "
                         f"--alpha 1, or leave it out for alpha = rank")


def _write_beside(out: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``out``, give it the trainer's permissions
    (:func:`usual_modes`; safetensors writes 0600) and rename it to ``out``: an interrupted export
    leaves no half-written file, and an earlier file at ``out`` stays until the new one is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".tmp-{out.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        usual_modes(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_lora(source: str, out: str | Path, fmt: str = "kohya", dtype: str = "fp32",
                alpha: Optional[float] = None) -> Path:
    """Write the LoRA of ``source`` (see :func:`resolve_target`) to ``out`` in ``fmt``; the model it
    gives is the trained one whatever the options.  Everything is checked and converted before
    anything is written (bad input: ``ValueError`` / ``FileNotFoundError`` naming it).

    Args:
        fmt: ``kohya`` (A1111 / ComfyUI) or ``diffusers`` (``load_lora_weights``).
        dtype: storage of the weights: ``fp32`` (lossless), ``fp16`` (the usual A1111 size), ``bf16``.
        alpha: kohya α of every module (up-weights rescaled to match); default the trained α.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_alpha(alpha, fmt)
    storage = to_dtype(dtype, STORAGE_DTYPES)
    target = resolve_target(source)
    if target.lora_file is None:
        raise ValueError("the base model has no LoRA to export; give a run, checkpoint or LoRA path")
    out = Path(out).expanduser()
    if out.exists() and os.path.samefile(out, target.lora_file):
        raise ValueError(f"--out {out} is the source LoRA {target.lora_file} itself: exporting onto it would "
                         f"replace it; give another --out")
    try:
        state, metadata = load_lora_file(target.lora_file)
    except (SafetensorError, OSError) as exc:
        reason = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        raise ValueError(f"{target.lora_file} is not a readable safetensors file ({reason}): damaged or "
                         f"cut short? export another checkpoint of the run (checkpoints/epoch-N)") from None
    if fmt == "diffusers":
        if is_kohya(state):
            raise ValueError(f"{target.lora_file} is already in kohya format; load_lora_weights reads it "
                             f"as it is")
        if dtype == "fp32" and all(v.dtype == torch.float32 for v in state.values()):
            _write_beside(out, lambda tmp: shutil.copyfile(target.lora_file, tmp))
        else:
            converted = {k: v.to(storage).contiguous() for k, v in state.items()}
            _write_beside(out, lambda tmp: save_file(converted, str(tmp), metadata=metadata or {"format": "pt"}))
        return out
    base = base_model(target.config_file, state)
    if is_kohya(state):
        kohya = state  # names as they are
    else:
        kohya = diffusers_to_kohya(state, _adapter_alpha(metadata))
        if base is not None and base.sdxl_layers_per_block is not None:
            kohya = kohya_to_sgm_names(kohya, base.sdxl_layers_per_block)
    if alpha is not None:
        kohya = set_alpha(kohya, alpha)
    ranks = sorted({v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")})
    alphas = sorted({float(v) for k, v in kohya.items() if k.endswith(".alpha")})
    kohya = {k: (v.float() if k.endswith(".alpha") else v.to(storage)).contiguous()
             for k, v in kohya.items()}
    meta = {"format": "pt", "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(alphas[0]) if len(alphas) == 1 else "Dynamic",
            "ss_training_comment": "lowmem-nablagfn (residual nabla-DB) LoRA"}
    if any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
           for k in kohya):  # SDXL's block names, also of a kohya file from elsewhere
        base = BaseModel(_SDXL, None)
    if base is not None:
        meta["ss_base_model_version"] = base.version
        meta["ss_v2"] = str(base.version == _SD2)  # what A1111 reads to tell SD 2.x
    _write_beside(out, lambda tmp: save_file(kohya, str(tmp), metadata=meta))
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
                   help="kohya alpha of every module, the up-weights rescaled so the LoRA does the same "
                        "(default: the trained alpha, the rank: scale alpha/rank = 1); --format kohya only")


def run(args: argparse.Namespace) -> int:
    from .checks import check_export

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
