"""Prompt embeddings computed once per (model, prompt set, split, options) and kept on disk and in
host memory, so that no text encoder is resident while training.

The prompt sets are fixed lists, so their conditioning is a fixed table.  For SD 3.5 this matters:
T5-XXL alone is 4.7 B parameters (9.5 GB in bf16), more than a 24 GB card can hold beside the 2.5 B
transformer, its activations and the reward model.  The table is computed by text encoders loaded
for that purpose only (on a miss), written as one safetensors file, and read back on every later
run; the trainer then looks rows up by prompt.  Size: ``N × L × D`` in the encoders' dtype — SD 3.5
(L = 77 + 256, D = 4096) in bf16 is 2.7 MB a prompt, so 1,000 prompts take 2.7 GB of host memory.

A file is named ``<model>-<set>-<split>-<hash>.safetensors``; the hash covers the model's identity
(:func:`model_identity`: built-in configs and seed, a directory's weight files, a hub snapshot), the
options (T5 or not, its length, dtype, …) and the exact prompt list, so a changed model, option or
prompt file never reads a stale table.  Files are written beside their final name and renamed: an
interrupted run leaves none half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

FIELDS = ("prompt_embeds", "pooled_embeds", "time_ids")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lowmem-nablagfn/prompt-embeddings`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowmem-nablagfn" / "prompt-embeddings"


def model_identity(name: str, revision: Optional[str] = None, seed: int = 0) -> str:
    """A string that changes whenever the text encoders of ``pretrained.model`` may have changed.

    Built-in models: their name, component configs and seed (the weights are a function of those).
    A local directory: its resolved path and every text-encoder / tokenizer file's size and mtime.
    A hub id: the cached snapshot's commit (offline: the revision asked for)."""
    from .builtin import BUILTIN_CONFIGS
    from .sd3 import SD3_BUILTIN_CONFIGS

    tables = {**BUILTIN_CONFIGS, **SD3_BUILTIN_CONFIGS}
    if name in tables:
        configs = tables[name]()
        text = {k: v for k, v in configs.items() if k.startswith("text")}
        return f"builtin:{name}:seed={seed}:{json.dumps(text, sort_keys=True, default=list)}"
    local = Path(name).expanduser()
    if local.is_dir() or local.is_file():
        root = local if local.is_dir() else local.parent
        files = [local] if local.is_file() else sorted(
            p for sub in local.iterdir() if sub.is_dir() and sub.name.startswith(("text_encoder", "tokenizer"))
            for p in sub.rglob("*") if p.is_file())
        stats = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return f"local:{local.resolve()}:{json.dumps(stats)}"
    commit = revision or "main"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "model_index.json", revision=revision)
        if isinstance(hit, str):
            commit = Path(hit).parent.name  # …/snapshots/<commit>/model_index.json
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        pass
    return f"hub:{name}@{commit}"


@dataclass
class PromptEmbeddings:
    """The conditioning of a fixed prompt list, in host memory.

    Attributes:
        prompts: the N prompts, in order.
        table: ``Conditioning`` of N rows (SD 3: prompt embeddings (N, L, D) and pooled (N, P)).
        uncond: ``Conditioning`` of one row, the CFG row.
    """

    prompts: List[str]
    table: object
    uncond: object

    def __post_init__(self):
        self._row: Dict[str, int] = {p: i for i, p in enumerate(self.prompts)}

    def encode(self, prompts: Sequence[str], device, resolution: Optional[int] = None):
        """Rows of ``prompts`` on ``device``: the same call as the parts' ``encode``, so a loop swaps
        this in for the text encoders."""
        missing = [p for p in prompts if p not in self._row]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the cached prompt set ({len(self.prompts)} prompts); "
                           f"cache every set and split the run samples from")
        rows = torch.tensor([self._row[p] for p in prompts])
        return self.table[rows].to(device)


def _to_tensors(prefix: str, cond) -> Dict[str, Tensor]:
    return {f"{prefix}{f}": getattr(cond, f).detach().cpu().contiguous()
            for f in FIELDS if getattr(cond, f) is not None}


def _from_tensors(prefix: str, tensors: Dict[str, Tensor]):
    from ..sampling import Conditioning

    return Conditioning(*(tensors.get(f"{prefix}{f}") for f in FIELDS))


def cache_path(cache_dir: Path, identity: str, options: dict, prompts: Sequence[str], label: str) -> Path:
    """Where the table of ``prompts`` under ``identity`` / ``options`` lives (``label``: model, set, split)."""
    digest = hashlib.sha256(json.dumps([identity, options, list(prompts)], sort_keys=True).encode()).hexdigest()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80]
    return Path(cache_dir) / f"{slug}-{digest[:16]}.safetensors"


def prompt_embeddings(prompts: Sequence[str], identity: str, options: dict, make_encoder: Callable[[], object],
                      device=None, resolution: Optional[int] = None, cache_dir: Optional[Path] = None,
                      label: str = "prompts", batch_size: int = 16) -> PromptEmbeddings:
    """The table of ``prompts`` (and the empty prompt's CFG row), from the cache or computed now.

    Args:
        prompts: the fixed list (duplicates are fine: one row each).
        identity: :func:`model_identity` of the model whose text encoders compute it.
        options: whatever else changes the embeddings (JSON-able; e.g. T5 or not, length, dtype).
        make_encoder: called on a miss only: loads the text encoders and returns the model's parts
            (``encode(prompts, device, resolution)`` and ``uncond(device, resolution)``: ``SD3Parts``,
            ``SDParts``); they are released when this returns.
        device: where the encoders run (default CPU); the table is kept on the CPU.
        resolution: image size for size-conditioned models (SDXL's time ids); part of ``options``.
        cache_dir: default :func:`default_cache_dir`.
        label: readable part of the file name (model, prompt set, split).
        batch_size: prompts per text-encoder call on a miss.
    """
    from safetensors.torch import load_file, save_file

    from ..sampling import Conditioning, as_conditioning

    prompts = list(prompts)
    options = {**options, "resolution": resolution}
    path = cache_path(Path(cache_dir or default_cache_dir()), identity, options, prompts, label)
    if path.is_file():
        try:
            tensors = load_file(str(path))
            cached = PromptEmbeddings(prompts, _from_tensors("", tensors), _from_tensors("uncond.", tensors))
            if len(cached.table) == len(prompts):
                return cached
        except Exception:  # noqa: BLE001 - a damaged file is recomputed, not trusted
            pass
    parts = make_encoder()
    rows = [as_conditioning(parts.encode(prompts[i:i + batch_size], device or "cpu", resolution)).to("cpu")
            for i in range(0, len(prompts), batch_size)]
    uncond = as_conditioning(parts.uncond(device or "cpu", resolution)).to("cpu")
    result = PromptEmbeddings(prompts, Conditioning.cat(rows), uncond)
    del parts, rows  # the text encoders: released before the caller loads the denoiser
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    try:
        save_file({**_to_tensors("", result.table), **_to_tensors("uncond.", result.uncond)}, tmp,
                  metadata={"identity": identity, "options": json.dumps(options, sort_keys=True),
                            "num_prompts": str(len(prompts))})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return result
