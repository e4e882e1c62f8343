"""The tiny models' "latent preview" decoder: its colours follow the latents, so a colour reward's
effect is visible at a glance (the default job; ``tiny-sd3`` too)."""
from __future__ import annotations

import torch
from torch import nn

# The tiny decoder's colours (rows: latent channels; columns: R, G, B): brightness, cyan-red,
# magenta-green, blue-yellow (opponent colours: a colour reward has one clear direction per channel).
# Signs: with the default seed the untrained samples come out cool (green, cyan, blue), so the
# redness reward's effect reads at a glance.
LATENT_RGB = ((0.35, 0.35, 0.35), (-0.5, 0.25, 0.25), (0.25, -0.5, 0.25), (-0.25, -0.25, 0.5))


@torch.no_grad()
def preview_decoder_(vae: nn.Module, gain: float = 1.0) -> nn.Module:
    """Set an ``AutoencoderKL`` decoder (in place) to a smooth "latent preview": pixel = ``gain ·
    LATENT_RGB^T u``, where ``u_j`` is latent channel ``j`` upsampled (nearest, then a [1 2 1]² blur
    per stage) and divided by its root mean square over the image.

    Why: a random decoder's last GroupNorm removes each image's mean colour, so a colour reward
    barely moves and its samples stay coloured noise.  Here every residual branch and the mid-block
    attention output are zero (identity blocks), ``conv_in`` writes ``(+z_j, -z_j)`` into the two
    channels of one group of the final GroupNorm (mean 0 by construction, so only the RMS is
    divided out) and ``conv_out`` reads ``SiLU(a) - SiLU(-a) = a``.  Only the first four latent
    channels are coloured (``tiny-sd3``'s other 12 are not shown); needs two channels per group in
    the last GroupNorm and a group per coloured channel (the ``tiny`` / ``tiny-sd3`` VAEs: 16
    channels, 8 groups).  A VAE without ``post_quant_conv`` (SD 3's) has none to set.
    """
    dec, c = vae.decoder, vae.config.latent_channels
    shown = min(c, len(LATENT_RGB))
    norm = dec.conv_norm_out
    if norm.num_channels != 2 * norm.num_groups or norm.num_groups < shown:
        raise ValueError(f"preview_decoder_ needs 2 channels per group in the decoder's last GroupNorm and a "
                         f"group per coloured latent channel; got {norm.num_channels}/{norm.num_groups} for {shown}")
    post = getattr(vae, "post_quant_conv", None)
    for conv in (post, dec.conv_in, dec.conv_out):
        if conv is not None:
            conv.weight.zero_()
            conv.bias.zero_()
    if post is not None:
        post.weight[:, :, 0, 0] = torch.eye(c)
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = blur[:, None] * blur[None, :] / 16
    for m in dec.modules():
        kind = type(m).__name__
        if kind == "ResnetBlock2D":  # residual branch off: the block is its shortcut
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
            if m.conv_shortcut is not None:
                w = m.conv_shortcut.weight
                w.zero_()
                m.conv_shortcut.bias.zero_()
                n = min(w.shape[:2])
                w[:n, :n, 0, 0] = torch.eye(n)
        elif kind == "Attention":
            m.to_out[0].weight.zero_()
            m.to_out[0].bias.zero_()
        elif kind == "Upsample2D" and m.conv is not None:
            m.conv.weight.zero_()
            m.conv.bias.zero_()
            for i in range(m.conv.weight.shape[0]):
                m.conv.weight[i, i] = blur
    for j in range(shown):
        dec.conv_in.weight[2 * j, j, 1, 1] = 1.0
        dec.conv_in.weight[2 * j + 1, j, 1, 1] = -1.0
        dec.conv_out.weight[:, 2 * j, 1, 1] = gain * torch.tensor(LATENT_RGB[j])
        dec.conv_out.weight[:, 2 * j + 1, 1, 1] = -gain * torch.tensor(LATENT_RGB[j])
    return vae
