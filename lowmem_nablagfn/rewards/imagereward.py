"""ImageReward v1.0 (Xu et al. 2023): BLIP ViT-L/16 + BERT with cross-attention + score head.

    R(x, c) = (head(BERT(tokens(c), cross-attending to ViT(preprocess(x)))[CLS]) - μ) / σ,
    μ = 0.16717362830052426, σ = 1.0333394966054072

This is the official differentiable scorer ``ImageReward.score_gard`` (the one the official
∇-GFlowNet code calls), written on maintained libraries because the ``image-reward`` package pins
old dependencies (transformers <= 4.55, timm 0.6, ...):

* image tower: timm ``VisionTransformer`` (ViT-L/16, 224 px, LayerNorm eps 1e-6, qkv bias, all
  tokens after the final norm).  BLIP's ``vit.py`` is timm's ViT, so its parameter names are timm's;
* text tower: transformers ``BlipTextModel`` (BLIP's ``med.py`` ported, names unchanged), whose
  cross-attention keys/values read ``encoder_hidden_size`` = 1024-d image tokens.  transformers'
  ``BertModel(add_cross_attention=True)`` cannot be used: its cross-attention projections take
  ``hidden_size`` (768) inputs.  ``config.is_decoder=True`` only creates the cross-attention
  layers; the forward runs with ``is_decoder=False`` (bidirectional self-attention), as BLIP's
  ``mode='multimodal'``;
* head: the ``ScoreMLP`` of the aesthetic predictor on the 768-d [CLS] feature.

Official names (``ImageReward.pt``, a plain state dict) -> ours, see :func:`from_official`:
``blip.visual_encoder.*`` -> ``visual.*`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), ``blip.text_encoder.*``
-> ``text.*`` (``embeddings.{word_embeddings,position_embeddings,LayerNorm}``,
``encoder.layer.N.{attention,crossattention}.{self.{query,key,value},output.{dense,LayerNorm}}``,
``encoder.layer.N.{intermediate.dense,output.dense,output.LayerNorm}``), ``mlp.layers.*`` ->
``mlp.layers.*``; ``blip.vision_proj.*``, ``blip.text_proj.*`` (unused by the score) and the
``position_ids`` buffer are dropped.  Verified here only against BLIP's / ImageReward's source
(names and shapes at full size, see ``tests/test_rewards.py``), not against the real file.

Tokenizer: bert-base-uncased plus BLIP's ``[DEC]`` and ``[ENC]`` tokens (30524 ids), ``max_length``
35, padding to it, truncation — as ``ImageReward.score`` (the official ∇-GFlowNet code pads to 512
instead: the same score for prompts of at most 35 tokens, since padding is masked; set
``reward.max_length = 512`` to reproduce it on longer prompts).
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .aesthetic import ScoreMLP, quiet_transformers
from .loading import (MissingCheckpointError, arch_size, hub_offline, load_exact, load_state_dict, random_size,
                      resolve_file, resolve_folder, seeded)
from .preprocess import ImageTransform
from .towers import TowerReward

IR_REPO = "THUDM/ImageReward"
IR_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
HOW = (f"Download {IR_FILE} and {MED_CONFIG_FILE} from the hub repo {IR_REPO} "
       f"(`hf download {IR_REPO} {IR_FILE} {MED_CONFIG_FILE} --local-dir DIR`) "
       f"and pass reward.checkpoint=DIR/{IR_FILE}.")
HOW_TOKENIZER = (f"Pass reward.backbone=TOK, a local copy of the {DEFAULT_TOKENIZER} tokenizer "
                 f"(`hf download {DEFAULT_TOKENIZER} vocab.txt tokenizer_config.json --local-dir TOK`), "
                 "or run online without HF_HUB_OFFLINE.")

#: BLIP ViT-L/16 (``create_vit('large', 224)``) and a reduced one, as timm VisionTransformer kwargs.
VISION_CONFIGS = {
    "full": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "reduced": dict(img_size=224, patch_size=32, embed_dim=64, depth=2, num_heads=4),
}
#: BLIP's med_config.json (BERT-base with cross-attention), used when no med_config.json is found.
MED_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "vocab_size": 30524, "max_position_embeddings": 512, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
              "pad_token_id": 0}
MED_CONFIG_REDUCED = {**MED_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4}
#: Official keys that the score does not use.
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
PREFIXES = (("blip.visual_encoder.", "visual."), ("blip.text_encoder.", "text."), ("mlp.", "mlp."))


def create_vision(size: str = "full") -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**VISION_CONFIGS[size], mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="",
                             class_token=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))


def create_text(med_config: Dict, encoder_width: int) -> nn.Module:
    from transformers import BlipTextConfig, BlipTextModel

    keys = set(MED_CONFIG) - {"initializer_range"}
    config = BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config},
                            initializer_range=med_config.get("initializer_range", 0.02),
                            encoder_hidden_size=encoder_width, is_decoder=True)
    return BlipTextModel(config, add_pooling_layer=False)


def fallback_tokenizer():
    """A WordPiece tokenizer over characters (no download): for random weights only."""
    from transformers import BertTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"-()&/")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    return add_blip_tokens(BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}))


def add_blip_tokens(tokenizer):
    """BLIP's ``init_tokenizer``: ``[DEC]`` as bos, ``[ENC]`` as an extra special token."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_tokenizer(spec: Optional[str]):
    from transformers import BertTokenizer

    folder = resolve_folder(spec or DEFAULT_TOKENIZER, ["vocab.txt", "*.json"], ["vocab.txt", "tokenizer.json"],
                            HOW_TOKENIZER)
    with quiet_transformers():
        return add_blip_tokens(BertTokenizer.from_pretrained(folder))


class ImageReward(TowerReward):
    """ImageReward of (image, prompt) pairs; towers: ``visual`` (ViT), ``text`` (BERT), ``mlp``."""

    prompt_free = False

    def __init__(self, visual: nn.Module, text: nn.Module, mlp: ScoreMLP, tokenizer,
                 max_length: int = MAX_LENGTH, transform: Optional[ImageTransform] = None):
        super().__init__()
        if len(tokenizer) > text.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text tower {text.config.vocab_size}")
        self.visual = visual
        self.text = text
        self.mlp = mlp
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.transform = transform or ImageTransform(size=visual.patch_embed.img_size[0], fit="crop")
        self._token_cache: Dict[Tuple[int, str], Tuple[Tensor, Tensor]] = {}

    def blocks(self) -> List[nn.Module]:
        return list(self.visual.blocks) + list(self.text.encoder.layer)

    def tokens(self, prompts: Sequence[str], device: torch.device) -> Tuple[Tensor, Tensor]:
        """(B, max_length) input ids and attention mask, tokenised once per prompt."""
        n = self.max_length
        todo = list(dict.fromkeys(p for p in prompts if (n, p) not in self._token_cache))
        if todo:
            enc = self.tokenizer(todo, padding="max_length", truncation=True, max_length=n, return_tensors="pt")
            self._token_cache.update(zip(((n, p) for p in todo), zip(enc["input_ids"], enc["attention_mask"])))
        ids, mask = zip(*(self._token_cache[n, p] for p in prompts))
        return torch.stack(ids).to(device), torch.stack(mask).to(device)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        image_embeds = self.visual(self.transform(images))  # (B, 1 + patches, 1024)
        ids, mask = self.tokens(prompts, images.device)
        # Every image token is attended to (the official all-ones encoder mask == no mask).
        hidden = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                           return_dict=True).last_hidden_state
        return ((self.mlp(hidden[:, 0]) - REWARD_MEAN) / REWARD_STD).squeeze(1)

    def official_state_dict(self) -> Dict[str, Tensor]:
        """The state dict under ``ImageReward.pt``'s names (used parameters only)."""
        return to_official(self.state_dict())


def from_official(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``ImageReward.pt`` names -> :class:`ImageReward` names (unused keys dropped, unknown ones warned)."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(UNUSED):
            continue
        for official, ours in PREFIXES:
            if key.startswith(official):
                out[ours + key[len(official):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        warnings.warn(f"ImageReward checkpoint: ignoring {len(unknown)} unknown keys {unknown[:5]}")
    return out


def to_official(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of :func:`from_official` (for exporting / testing the mapping)."""
    out = {}
    for key, value in state.items():
        for official, ours in PREFIXES:
            if key.startswith(ours):
                out[official + key[len(ours):]] = value
                break
        else:
            raise KeyError(f"{key!r} has no official name")
    return out


def _find_med_config(checkpoint: Path, spec: Optional[str]) -> Dict:
    """med_config.json beside the checkpoint (or on the hub beside a hub checkpoint), else MED_CONFIG."""
    local = checkpoint.with_name(MED_CONFIG_FILE)
    if not local.is_file() and (spec is None or not Path(spec).expanduser().exists()):
        try:
            from huggingface_hub import hf_hub_download

            repo = IR_REPO if spec is None else "/".join(spec.strip("/").split("/")[:2])
            local = Path(hf_hub_download(repo, MED_CONFIG_FILE, local_files_only=hub_offline()))
        except Exception:  # the built-in copy has the same values
            pass
    return {**MED_CONFIG, **json.loads(local.read_text())} if local.is_file() else dict(MED_CONFIG)


def build(cfg, size: Optional[str] = None) -> ImageReward:
    """ImageReward v1.0 of a :class:`~lowmem_nablagfn.config.RewardConfig` (fp32 weights, frozen, eval mode).

    Args:
        cfg: ``checkpoint`` = ``ImageReward.pt`` (a file, a folder holding it, or ``owner/repo/file``;
            default the hub file ``THUDM/ImageReward/ImageReward.pt``) | ``random`` | ``random:reduced``;
            ``backbone`` = bert-base-uncased tokenizer folder or hub id (optional for random weights).
        size: architecture (``full`` | ``reduced``); from ``cfg.checkpoint`` by default.
    """
    size = arch_size(cfg.checkpoint, size)
    med = MED_CONFIG if size == "full" else MED_CONFIG_REDUCED
    if random_size(cfg.checkpoint):
        tokenizer = load_tokenizer(cfg.backbone) if cfg.backbone else fallback_tokenizer()
        with seeded(0):
            visual = create_vision(size)
            text = create_text(med, visual.embed_dim)
            mlp = ScoreMLP(med["hidden_size"])
        return ImageReward(visual, text, mlp, tokenizer).eval().requires_grad_(False)
    spec = cfg.checkpoint
    if spec is not None and Path(spec).expanduser().is_dir():
        spec = str(Path(spec).expanduser() / IR_FILE)
    path = resolve_file(spec, f"{IR_REPO}/{IR_FILE}", HOW)
    if size == "full":
        med = _find_med_config(path, spec)
    tokenizer = load_tokenizer(cfg.backbone)
    if size == "full" and len(tokenizer) != med["vocab_size"]:
        raise ValueError(f"tokenizer {cfg.backbone or DEFAULT_TOKENIZER!r} has {len(tokenizer)} tokens with [DEC] "
                         f"and [ENC], ImageReward's text tower {med['vocab_size']}: it must be bert-base-uncased. "
                         f"{HOW_TOKENIZER}")
    visual = create_vision(size)
    text = create_text(med, visual.embed_dim)
    model = ImageReward(visual, text, ScoreMLP(med["hidden_size"]), tokenizer)
    load_exact(model, from_official(load_state_dict(path)), str(path))
    return model.eval().requires_grad_(False)


__all__ = ["ImageReward", "MissingCheckpointError", "build", "from_official", "to_official"]
