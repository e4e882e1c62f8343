"""LoRA on the SD 3 transformer (lowmem_nablagfn/models/sd3_lora.py): the joint attention of both MMDiT
streams is adapted (not SD 3.5's image-only attn2), the diffusers file is what
StableDiffusion3Pipeline.load_lora_weights reads (same transformer output), and the exported kohya-style
file has the names ComfyUI's SD 3 key map accepts, with the trained update."""
import re

import pytest
import torch

from lowmem_nablagfn.export import export_lora
from lowmem_nablagfn.models.lora import add_lora, reference_policy
from lowmem_nablagfn.models.sd3 import build_random_sd3, sd3_pipeline
from lowmem_nablagfn.models.sd3_lora import SD3_LORA_TARGETS, save_sd3_lora
from lowmem_nablagfn.targets import load_lora_file

RANK = 4
#: what each SD 3 attention module is called in diffusers (SD3Transformer2DModel, JointAttnProcessor2_0)
JOINT = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def comfyui_sd3_lora_modules(num_blocks: int) -> dict:
    """LoRA module names ComfyUI accepts for an SD 3 model -> the module of its own MMDiT they patch.

    Derived from ComfyUI's code (comfy/utils.py ``mmdit_to_diffusers`` and comfy/lora.py
    ``model_lora_keys_unet``, SD 3 branch): per block ``transformer_blocks.{i}``, the diffusers weights
    ``attn.to_q/k/v`` are slices of ``joint_blocks.{i}.x_block.attn.qkv``, ``attn.add_q/k/v_proj`` of
    ``context_block.attn.qkv``, ``attn2.to_q/k/v`` of ``x_block.attn2.qkv`` (SD 3.5's dual attention);
    ``attn.to_out.0`` is ``x_block.attn.proj``, ``attn.to_add_out`` ``context_block.attn.proj``,
    ``attn2.to_out.0`` ``x_block.attn2.proj``.  For each such diffusers module path ``m`` the LoRA key
    map holds ``transformer.{m}`` (diffusers), ``base_model.model.{m}``, ``lora_transformer_{m with _}``
    (OneTrainer) and ``lycoris_{m with _}``; ``load_lora`` then reads ``{name}.lora_up.weight`` /
    ``.lora_down.weight`` (or ``.lora_B.weight`` / ``.lora_A.weight``) and an optional ``{name}.alpha``."""
    out = {}
    for i in range(num_blocks):
        to = f"joint_blocks.{i}"
        mmdit = {"attn.to_q": "x_block.attn.qkv[q]", "attn.to_k": "x_block.attn.qkv[k]",
                 "attn.to_v": "x_block.attn.qkv[v]", "attn.add_q_proj": "context_block.attn.qkv[q]",
                 "attn.add_k_proj": "context_block.attn.qkv[k]", "attn.add_v_proj": "context_block.attn.qkv[v]",
                 "attn2.to_q": "x_block.attn2.qkv[q]", "attn2.to_k": "x_block.attn2.qkv[k]",
                 "attn2.to_v": "x_block.attn2.qkv[v]", "attn.to_out.0": "x_block.attn.proj",
                 "attn.to_add_out": "context_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj",
                 "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
        for diffusers, comfy in mmdit.items():
            m = f"transformer_blocks.{i}.{diffusers}"
            for name in (f"transformer.{m}", f"base_model.model.{m}", "lora_transformer_" + m.replace(".", "_"),
                         "lycoris_" + m.replace(".", "_")):
                out[name] = f"diffusion_model.{to}.{comfy}"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-sd3's transformer with a LoRA whose up-weights are random (as after training), saved."""
    parts = build_random_sd3("tiny-sd3", seed=0, parts=("transformer",))
    add_lora(parts.transformer, RANK, list(SD3_LORA_TARGETS), "gaussian", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in parts.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    root = tmp_path_factory.mktemp("sd3-lora")
    return parts.transformer, save_sd3_lora(parts.transformer, root)


def _output(transformer):
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 9, 96, generator=gen)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([999.0, 300.0]), encoder_hidden_states=context,
                           pooled_projections=torch.randn(2, 80, generator=gen)).sample


def test_targets_are_the_joint_attention_of_both_streams(trained):
    transformer, _ = trained
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    blocks = len(transformer.transformer_blocks)
    want = {f"transformer_blocks.{i}.attn.{m}" for i in range(blocks) for m in JOINT}
    want.discard(f"transformer_blocks.{blocks - 1}.attn.to_add_out")  # the last block's text stream ends there
    assert adapted == want
    assert transformer.transformer_blocks[0].attn2 is not None  # present, but not adapted


def test_diffusers_file_loads_in_stable_diffusion_3_pipeline(trained):
    """StableDiffusion3Pipeline.load_lora_weights on a fresh copy of the base model gives the trained
    transformer's output; the reference policy (adapter off) is the base model's."""
    transformer, path = trained
    state, _ = load_lora_file(path)
    assert all(k.startswith("transformer.transformer_blocks.") for k in state) and len(state) == 2 * (2 * 8 - 1)
    pipe = sd3_pipeline(build_random_sd3("tiny-sd3", seed=0, parts=("transformer",)))
    base = _output(pipe.transformer)
    pipe.load_lora_weights(str(path.parent))
    torch.testing.assert_close(_output(pipe.transformer), _output(transformer), rtol=1e-5, atol=1e-5)
    with reference_policy(transformer):
        torch.testing.assert_close(_output(transformer), base, rtol=1e-5, atol=1e-5)
    assert float((_output(transformer) - base).abs().max()) > 0.05  # the LoRA does something


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exported_names_are_comfyuis_and_the_update_is_the_trained_one(trained, tmp_path, fmt):
    """Every module of the exported file is one ComfyUI's SD 3 key map accepts, with its up, down (and,
    kohya-style, alpha) tensors, and ``(α / r) up @ down`` is the trained adapter's update of that layer."""
    transformer, path = trained
    state, _ = load_lora_file(export_lora(str(path), tmp_path / "x.safetensors", fmt))
    accepted = comfyui_sd3_lora_modules(len(transformer.transformer_blocks))
    up, down = (".lora_up.weight", ".lora_down.weight") if fmt == "kohya" else (".lora_B.weight", ".lora_A.weight")
    modules = {re.sub(r"\.(lora_up|lora_down|lora_A|lora_B)\.weight$|\.alpha$", "", k) for k in state}
    assert modules <= accepted.keys(), sorted(modules - accepted.keys())[:3]
    assert len(modules) == 2 * 8 - 1 and len(state) == len(modules) * (3 if fmt == "kohya" else 2)
    peft_modules = dict(transformer.named_modules())
    for name in modules:
        m = name.replace("lora_transformer_", "").replace("transformer.", "", 1)
        path_ = next(p for p in peft_modules if p.replace(".", "_") == m.replace(".", "_") and hasattr(peft_modules[p], "lora_A"))
        layer = peft_modules[path_]
        trained_update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        alpha = float(state[f"{name}.alpha"]) if fmt == "kohya" else RANK  # absent: ComfyUI's scale 1
        update = alpha / RANK * state[name + up].float() @ state[name + down].float()
        torch.testing.assert_close(update, trained_update.detach(), rtol=1e-5, atol=1e-6)
    if fmt == "kohya":
        assert "lora_transformer_transformer_blocks_0_attn_to_add_out" in modules
