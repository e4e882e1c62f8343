"""Activation checkpointing of every part (``memory.checkpoint_*``), switched on and off in one place.

:func:`set_checkpointing` dispatches on what a part is:

* a VAE (a module with a ``decoder``): the decoder is checkpointed *per layer* (below); the encoder
  is never trained through and is left alone;
* a tower reward (:class:`~lowmem_nablagfn.rewards.towers.TowerReward`): its own ``set_checkpointing``
  (each transformer block, eval mode too);
* any other diffusers model (the UNet, the flow model): ``enable_/disable_gradient_checkpointing``;
* an open_clip model: ``set_grad_checkpointing``.

Why the VAE decoder is not left to diffusers: diffusers (0.42) checkpoints its mid block and each
*whole* up block and leaves the post-process (GroupNorm -> SiLU -> conv_out at full resolution)
outside any checkpoint.  The backward of the last up block then recomputes all its resnets at full
resolution and holds their intermediates at once, and the post-process keeps its own: for the SDXL
VAE at 1024 px (bf16) 1.6 GiB stay alive after the forward and the backward peaks at 6.1 GiB per
image (planner trace).  Here each mid-block resnet and attention, each up-block resnet and
upsampler, and the post-process are each one non-reentrant checkpoint region (never nested, each
recomputed once), so the backward holds one layer's intermediates at a time; the regions' inputs
(one activation per layer) are what the forward keeps.  Outputs and gradients are those of the
plain decoder (tests/test_vae_checkpointing.py).

The regions are installed as an instance-level ``forward`` of the decoder (the same trick as the
reward towers): the module tree and state-dict keys are untouched, ``.to()`` and ``copy.deepcopy``
carry it (deepcopy rebinds the method to the copy), and switching off deletes it, which restores
diffusers' ``Decoder.forward``.  It follows the installed diffusers' ``Decoder`` /
``UNetMidBlock2D`` / ``UpDecoderBlock2D`` forwards and refuses, with an error, a decoder built
differently rather than silently checkpointing nothing.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


def set_checkpointing(module: Optional[nn.Module], on: bool) -> None:
    """Switch activation checkpointing of ``module`` (a VAE, UNet, flow model or reward) to ``on``.

    ``None`` and modules with nothing to checkpoint (the built-in colour rewards) are left as they are.

    Raises:
        TypeError: ``on`` for a VAE whose decoder is not diffusers' ``Decoder`` structure.
    """
    if module is None:
        return
    if hasattr(module, "set_checkpointing"):  # TowerReward (rewards/towers.py)
        module.set_checkpointing(bool(on))
    elif isinstance(getattr(module, "decoder", None), nn.Module):  # a VAE: AutoencoderKL
        _set_decoder_checkpointing(module.decoder, on)
    elif hasattr(module, "enable_gradient_checkpointing"):  # diffusers UNet / flow model
        (module.enable_gradient_checkpointing if on else module.disable_gradient_checkpointing)()
    elif hasattr(module, "set_grad_checkpointing"):  # open_clip
        module.set_grad_checkpointing(bool(on))


def _set_decoder_checkpointing(decoder: nn.Module, on: bool) -> None:
    """Per-layer checkpointing of a VAE decoder on (an instance ``forward``) or off (stock forward)."""
    installed = decoder.__dict__.get("forward")
    ours = getattr(installed, "__func__", None) is _decoder_forward
    if on:
        _check_decoder(decoder)
        if installed is not None and not ours:
            raise TypeError(f"checkpoint_vae: {type(decoder).__name__}.forward is already replaced on the instance "
                            f"({installed!r}); per-layer checkpointing would drop that replacement")
    # diffusers' block-level checkpointing off in either case: on, it would nest (recompute twice);
    # off, the decoder runs as diffusers' stock forward without checkpointing
    for sub in decoder.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub.gradient_checkpointing = False
    if on:
        decoder.forward = types.MethodType(_decoder_forward, decoder)
    elif ours:
        del decoder.forward


def _check_decoder(decoder: nn.Module) -> None:
    """Raise unless ``decoder`` runs the forwards :func:`_decoder_forward` re-traces."""
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D

    def runs(module, cls) -> bool:
        return module is not None and getattr(type(module), "forward", None) is cls.forward

    problems = []
    if not runs(decoder, Decoder):
        problems.append(f"the decoder is {type(decoder).__name__}, not diffusers' Decoder")
    mid = getattr(decoder, "mid_block", None)
    if not runs(mid, UNetMidBlock2D):
        problems.append(f"its mid_block is {type(mid).__name__}, not UNetMidBlock2D")
    elif len(mid.resnets) != len(mid.attentions) + 1:
        problems.append(f"its mid_block has {len(mid.resnets)} resnets for {len(mid.attentions)} attentions")
    for i, up in enumerate(getattr(decoder, "up_blocks", None) or [None]):
        if not runs(up, UpDecoderBlock2D):
            problems.append(f"up_blocks[{i}] is {type(up).__name__}, not UpDecoderBlock2D")
    for name in ("conv_in", "conv_norm_out", "conv_act", "conv_out"):
        if not isinstance(getattr(decoder, name, None), nn.Module):
            problems.append(f"it has no {name}")
    if problems:
        raise TypeError("checkpoint_vae: per-layer decoder checkpointing follows diffusers' "
                        "Decoder(UNetMidBlock2D, UpDecoderBlock2D...); " + "; ".join(problems))


def _region(fn, *args, **kwargs) -> Tensor:
    """One checkpoint region: only ``fn``'s inputs are kept; ``fn`` is recomputed once in backward."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _post_process(decoder: nn.Module, sample: Tensor, latent_embeds: Optional[Tensor]) -> Tensor:
    """``Decoder.forward``'s post-process: norm -> act -> conv_out (one region)."""
    if latent_embeds is None:
        sample = decoder.conv_norm_out(sample)
    else:
        sample = decoder.conv_norm_out(sample, latent_embeds)
    return decoder.conv_out(decoder.conv_act(sample))


def _decoder_forward(self: nn.Module, sample: Tensor, latent_embeds: Optional[Tensor] = None) -> Tensor:
    """diffusers' ``Decoder.forward`` (0.42) with ``UNetMidBlock2D.forward`` and
    ``UpDecoderBlock2D.forward`` inlined, each layer its own checkpoint region when gradients are on."""
    if not torch.is_grad_enabled():
        return type(self).forward(self, sample, latent_embeds)
    sample = self.conv_in(sample)
    mid = self.mid_block
    sample = _region(mid.resnets[0], sample, latent_embeds)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            sample = _region(attn, sample, temb=latent_embeds)
        sample = _region(resnet, sample, latent_embeds)
    for up_block in self.up_blocks:
        for resnet in up_block.resnets:
            sample = _region(resnet, sample, latent_embeds)
        for upsampler in up_block.upsamplers or ():
            sample = _region(upsampler, sample)
    return _region(_post_process, self, sample, latent_embeds)


__all__ = ["set_checkpointing"]
