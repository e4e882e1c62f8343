"""Test helper: write SD parts as ONE file in the original A1111 / ComfyUI (LDM / SGM) layout — the
inverse of diffusers' single-file conversion, for any block count and ``layers_per_block`` (the
tiny models).  Only what the tests need: UNet, VAE, CLIP text encoder(s), OpenCLIP text encoder."""
import re

import torch

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for a, b in RESNET:
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    raise KeyError(rest)


def unet_to_original(state: dict, config) -> dict:
    n_layers = config["layers_per_block"]
    up_has_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, v in state.items():
        new = None
        for a, b in UNET_TOP.items():
            if key.startswith(a + "."):
                new = b + key[len(a):]
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
        if m:
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                new = f"input_blocks.{1 + i * (n_layers + 1) + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + i * (n_layers + 1) + j}.1.{rest}"
            else:
                new = f"input_blocks.{(i + 1) * (n_layers + 1)}.0.op.{rest[len('conv.'):]}"
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                new = f"output_blocks.{i * (n_layers + 1) + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * (n_layers + 1) + j}.1.{rest}"
            else:
                new = f"output_blocks.{i * (n_layers + 1) + n_layers}.{2 if up_has_attn[i] else 1}.{rest}"
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        if new is None:
            raise KeyError(key)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_original(state: dict, config) -> dict:
    n = len(config["block_out_channels"])
    out = {}
    for key, v in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.block.{m.group(2)}.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
                new = new.replace(a, b)
            if v.ndim == 2:  # linear -> 1x1 conv, as the original stores it
                v = v[:, :, None, None]
        out["first_stage_model." + new] = v
    return out


def openclip_to_original(state: dict, prefix: str) -> dict:
    out, qkv = {}, {}
    names = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
             (".self_attn.", ".attn."), ("text_model.final_layer_norm.", "ln_final."),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight")]
    for key, v in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = v.t().contiguous()
            continue
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        new = key
        for a, b in names:
            new = new.replace(a, b)
        out[prefix + new] = v
    for (layer, kind), parts in qkv.items():
        base = layer.replace("text_model.encoder.layers.", "transformer.resblocks.")
        out[f"{prefix}{base}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_original(parts) -> dict:
    """One state dict in the original layout of SD 1.x (``parts.is_sdxl`` False) or SDXL base."""
    state = {**unet_to_original(parts.unet.state_dict(), parts.unet.config),
             **vae_to_original(parts.vae.state_dict(), parts.vae.config)}
    # transformers 5 names CLIPTextModel's tensors without the ``text_model.`` of the original files
    te = {(k if k.startswith("text_model.") else "text_model." + k): v
          for k, v in parts.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if not parts.is_sdxl:
        state.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
        return state
    state.update({"conditioner.embedders.0.transformer." + k: v for k, v in te.items()})
    state.update(openclip_to_original(parts.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return state
