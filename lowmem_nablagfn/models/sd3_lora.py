"""LoRA on the SD 3 transformer (MMDiT): which layers, and the LoRA file diffusers' SD 3 pipeline reads.

The adapter itself is :func:`~lowmem_nablagfn.models.lora.add_lora` (peft, ``lora_alpha = rank``),
the same as for the UNet; only the target layers and the file's component prefix differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from torch import Tensor, nn

#: The joint-attention projections of both MMDiT streams (``SD3Transformer2DModel``'s
#: ``transformer_blocks.{i}.attn``: ``JointAttnProcessor2_0``).
#:
#: MMDiT has no cross-attention: each block projects the image tokens (``to_q/k/v``) and the text
#: tokens (``add_q/k/v_proj``) with their own weights, attends over their concatenation, and projects
#: each stream's output back (``to_out.0`` for the image, ``to_add_out`` for the text; the last
#: block has none, its text stream ending there).  This attention is the only place where the prompt
#: acts on the image, so adapting both streams' projections lets the LoRA change how the prompt steers
#: the image and how the text tokens update with it.  Left out: SD 3.5 Medium's second, image-only
#: self-attention (``attn2``, blocks 0-12), the MLPs and the adaLN modulation — parameters that do not
#: touch the text-image interaction.  It is also the set Flow-GRPO trains on SD 3.5 Medium and the
#: default of diffusers' ``train_dreambooth_lora_sd3.py``, so rank and parameter counts compare with
#: published runs.  The ``attn.`` prefix keeps peft's suffix match off ``attn2.to_q`` etc.  (The last
#: block's ``add_q_proj`` is adapted too but inert: its text queries feed no output, so its LoRA gets
#: zero gradient and stays at its initial update, zero.)
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def sd3_lora_state_dict(transformer: nn.Module) -> Dict[str, Tensor]:
    """The adapter's weights by peft name (``transformer_blocks.0.attn.to_q.lora_A.weight`` (r, in),
    ``….lora_B.weight`` (out, r)), detached, float32, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def write_sd3_lora(state: Dict[str, Tensor], directory: str | Path) -> Path:
    """``state`` (:func:`sd3_lora_state_dict`'s names) as diffusers' SD 3 LoRA file,
    ``pytorch_lora_weights.safetensors`` with keys ``transformer.transformer_blocks.{i}.attn.….lora_A/B.weight``:
    what ``StableDiffusion3Pipeline.load_lora_weights`` reads and ComfyUI maps as it is (its "regular
    diffusers sd3 lora format"; α absent = scale 1 = this project's ``lora_alpha / rank``)."""
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=state, safe_serialization=True)
    return Path(directory) / "pytorch_lora_weights.safetensors"


def save_sd3_lora(transformer: nn.Module, directory: str | Path) -> Path:
    """The transformer's LoRA in diffusers' SD 3 format (:func:`write_sd3_lora`)."""
    return write_sd3_lora(sd3_lora_state_dict(transformer), directory)
