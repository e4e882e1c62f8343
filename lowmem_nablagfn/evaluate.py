"""Evaluation as in the paper: reward, diversity, prior preservation and CLIP score on held-out prompts.

``lowmem-nablagfn eval TARGET`` samples ``images_per_prompt`` images for each held-out prompt with
fixed seeds, from the finetuned policy (the LoRA of TARGET) and from the base model (the same UNet
with its adapter disabled, the same seeds), and reports per policy:

* **reward**: mean / std over all images of the run's reward (``reward.*`` of its config);
* **diversity**: mean over prompts of the mean pairwise ``1 − cos`` distance between the
  embeddings of that prompt's images — DreamSim (``--dreamsim-cache``), else the reward model's
  image tower, else 32-px pixels; the JSON names which;
* **FID vs base** (prior preservation): Fréchet distance between the Inception-v3 features of the
  finetuned and the base samples (torchmetrics), with ``--inception-weights`` or the torch hub cache;
* **CLIP score**: ``100 · max(cos(image, text), 0)`` (torchmetrics' definition) with a local
  transformers CLIP folder (``--clip``).

A metric whose weights are missing is ``null`` with a ``message`` saying which option to set and
where to get the file; nothing is downloaded.  Seeds: the (prompt, image) pairs are taken in
order, ``batch_size`` at a time, each batch from its own generator seeded by ``(seed, batch index)``,
so a result is reproducible for a given ``seed`` and ``batch_size``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .image_metrics import (INCEPTION_FILE, build_fid, clip_scorer, diversity_embedder, mean_pairwise_cosine_distance,
                            summary)
from .targets import Target, load_lora_file, resolve_target


@dataclass
class EvalSettings:
    """Options of an evaluation (the CLI's flags)."""

    images_per_prompt: int = 4
    """Images sampled per prompt (diversity needs >= 2)."""
    num_prompts: int = 0
    """Use the first this many held-out prompts; 0 = all."""
    split: str = "eval"
    """Prompt split: ``eval`` (held out) or ``train``."""
    batch_size: int = 8
    """Images per sampling batch (results depend on it through the seeds)."""
    seed: int = 0
    """Seed of the sampling noise (the same for the finetuned and the base policy)."""
    base: bool = True
    """Also sample the base model: base reward and diversity, and FID against it."""
    dreamsim_cache: Optional[str] = None
    """Folder of an unzipped DreamSim release (``dreamsim(pretrained=True, cache_dir=…)``)."""
    inception_weights: Optional[str] = None
    """torch-fidelity's Inception-v3 file for FID; default: looked up in the torch hub cache."""
    clip: Optional[str] = None
    """Local transformers CLIP folder (e.g. a download of openai/clip-vit-large-patch14) for CLIP score."""
    save_images: int = 16
    """Write a grid of this many images per policy beside the JSON (0: none)."""
    quiet: bool = False


# ----------------------------------------------------------------------------- configuration and models

def eval_config(target: Target, preset: Optional[str], overrides: Sequence[str]):
    """The run's ``config.json`` (when the target has one and no preset is given), else the preset.

    Nothing is trained, so the training subsampling is set to keep every step (always valid): an
    override such as ``sampling.num_steps=20`` then needs no matching ``model.timestep_fraction``.
    """
    from .config import load_config, validate

    source = preset or (str(target.config_file) if target.config_file else "tiny_cpu")
    cfg = load_config(source, list(overrides))
    cfg.model.timestep_fraction = 1.0
    return validate(cfg)


@dataclass
class EvalModels:
    parts: object
    sched: object
    uncond: Tensor
    latent_shape: tuple
    device: torch.device
    has_lora: bool

    def policy(self, name: str):
        """Context in which the UNet is the ``finetuned`` policy or the ``base`` model."""
        from .models import reference_policy

        return reference_policy(self.parts.denoiser) if name == "base" and self.has_lora else contextlib.nullcontext()


def load_models(cfg, lora_file: Optional[Path]) -> EvalModels:
    """SD parts in the run's storage dtype and device, with the LoRA of ``lora_file`` (fp32) attached.

    The LoRA may be in diffusers or kohya format (diffusers' loader infers rank and alpha; SD 3.x: the
    diffusers file).  SD 3.x: the prompts' embeddings come from the run's prompt table
    (:func:`~lowmem_nablagfn.models.load_run_parts`).
    """
    from .diffusion import make_schedule
    from .distributed import pick_device
    from .dtypes import to_dtype
    from .models import family_of, freeze_parts, load_run_parts

    device = pick_device(cfg.device)
    parts = load_run_parts(cfg, device, to_dtype(cfg.training.mixed_precision))
    latent_shape = freeze_parts(cfg, parts, device)  # as training freezes them
    if lora_file is not None:
        state, _ = load_lora_file(lora_file)
        family = family_of(parts)
        state, alphas = family.read_lora(parts, state)
        parts.denoiser.load_lora_adapter(state, network_alphas=alphas, prefix=family.lora_prefix,
                                         adapter_name="default")
        for name, p in parts.denoiser.named_parameters():
            if "lora_" in name:  # as in training: adapter in fp32 over a low-precision base
                p.data = p.data.to(device, torch.float32)
    sched = make_schedule(cfg.sampling.scheduler, cfg.sampling.num_steps, cfg.sampling.eta, parts.scheduler_config)
    uncond = parts.uncond(device, cfg.sampling.resolution)
    return EvalModels(parts, sched, uncond, latent_shape, device, lora_file is not None)


def batch_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 10_007 + 17) % (2**62)


@torch.no_grad()
def sample_batches(m: EvalModels, guidance_scale: float, items: List[tuple], batch_size: int, seed: int):
    """Yield (images (b, 3, H, W) in [0, 1] on the device, prompts, prompt indices) per batch."""
    from .images import decode_latents
    from .sampling import sample
    from .update import policy_eps_fn

    eps_fn = policy_eps_fn(m.parts.denoiser, m.uncond, guidance_scale, m.sched)
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        prompts = [p for _, p in chunk]
        cond = m.parts.encode(prompts, m.device, m.latent_shape[-1] * m.parts.vae_scale_factor)
        gen = torch.Generator().manual_seed(batch_seed(seed, b // batch_size))
        traj = sample(eps_fn, m.sched, cond, m.latent_shape, gen, keep=torch.zeros(len(chunk), 0, dtype=torch.long),
                      prompts=prompts, device=m.device)
        yield decode_latents(m.parts.vae, traj.final_latents), prompts, [i for i, _ in chunk]


# ----------------------------------------------------------------------------- the evaluation

def evaluate(target: str | Target, cfg, settings: Optional[EvalSettings] = None,
             fid_feature: Optional[nn.Module] = None) -> dict:
    """Evaluate a LoRA (or the base model) under ``cfg``.

    Returns the result as a dict (what the JSON holds), plus ``_previews``: {policy: images
    (n, 3, H, W) in [0, 1]} for the sample grids, which :func:`write_result` takes out.

    Args:
        target: ``base``, a run / checkpoint / LoRA directory, a LoRA file, or a resolved :class:`Target`.
        cfg: the configuration (model, sampling, reward, prompt set) — see :func:`eval_config`.
        fid_feature: optional feature module for FID instead of Inception (tests, custom metrics).
    """
    from tqdm.auto import tqdm

    from .checks import setup_errors
    from .rewards import build_reward
    from .rewards.prompts import load_prompts

    t0 = time.perf_counter()
    target = resolve_target(target) if isinstance(target, str) else target
    s = settings or EvalSettings()
    prompts = load_prompts(cfg.prompts.set, s.split)
    prompts = prompts[:s.num_prompts] if s.num_prompts > 0 else prompts
    with setup_errors(passthrough=(FileNotFoundError, ImportError)):  # the rest: one line, exit 2 (cli)
        m = load_models(cfg, target.lora_file)
        reward_model = build_reward(cfg.reward, m.device)
    embed, div_method, div_note = diversity_embedder(reward_model, s.dreamsim_cache, m.device)
    clip_score, clip_note = None, "needs a CLIP model: pass --clip DIR, a local transformers CLIP folder (e.g. " \
                                  "`hf download openai/clip-vit-large-patch14 config.json model.safetensors --local-dir DIR`)"
    if s.clip:
        clip_score, clip_note = clip_scorer(s.clip, m.device), f"CLIP from {s.clip}"
    # the LoRA's policy, and the base model with the same seeds; a base target is only "base"
    policies = (["finetuned"] + (["base"] if s.base else [])) if m.has_lora else ["base"]
    fid, fid_note = None, "needs base samples (run without --no-base)"
    if not m.has_lora:
        fid_note = "the base model itself was evaluated: FID against itself is 0 by definition"
    elif "base" in policies:
        fid, fid_note = build_fid(s.inception_weights, fid_feature, m.device)

    items = [(i, p) for i, p in enumerate(prompts) for _ in range(s.images_per_prompt)]
    bar = tqdm(total=len(policies) * math.ceil(len(items) / s.batch_size), desc="eval", disable=s.quiet,
               dynamic_ncols=True)
    per_policy: Dict[str, dict] = {}
    previews: Dict[str, Tensor] = {}
    for name in policies:
        rewards, embeddings, clips, groups, keep = [], [], [], [], []
        with m.policy(name), torch.no_grad():
            for images, batch_prompts, ids in sample_batches(m, cfg.sampling.guidance_scale, items,
                                                            s.batch_size, s.seed):
                rewards += reward_model(images, batch_prompts).tolist()
                embeddings.append(embed(images).float().cpu())
                groups += ids
                if clip_score is not None:
                    clips += clip_score(images, batch_prompts).tolist()
                if fid is not None:
                    fid.update(images, real=name == "base")
                if sum(k.shape[0] for k in keep) < s.save_images:
                    keep.append(images.cpu())
                bar.set_postfix(policy=name, reward=f"{sum(rewards) / len(rewards):.4g}")
                bar.update(1)
        if keep:
            previews[name] = torch.cat(keep)[:s.save_images]
        diversity = mean_pairwise_cosine_distance(torch.cat(embeddings), groups)
        per_prompt = []
        for i, p in enumerate(prompts):
            r = [v for v, g in zip(rewards, groups) if g == i]
            per_prompt.append({"prompt": p, "reward_mean": sum(r) / len(r)})
        per_policy[name] = {"reward": summary(rewards), "diversity": diversity,
                            "clip_score": summary(clips)["mean"] if clips else None,
                            "per_prompt": per_prompt}
    bar.close()

    fid_value = None
    if fid is not None:
        try:
            fid_value = float(fid.compute())
        except (ValueError, RuntimeError) as exc:  # e.g. fewer than 2 samples per side
            fid, fid_note = None, f"FID could not be computed: {exc}"
    div_ok = s.images_per_prompt >= 2

    def by_policy(key: str) -> dict:
        return {p: per_policy[p][key] if p in per_policy else None for p in ("finetuned", "base")}

    result = {
        "target": str(target.lora_file) if target.lora_file else "base",
        "tag": target.tag,
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "model": cfg.pretrained.model,
        "reward_name": cfg.reward.name,
        "prompts": {"set": cfg.prompts.set, "split": s.split, "count": len(prompts)},
        "sampling": {"scheduler": cfg.sampling.scheduler, "num_steps": cfg.sampling.num_steps,
                     "eta": cfg.sampling.eta, "guidance_scale": cfg.sampling.guidance_scale,
                     "resolution": cfg.sampling.resolution},
        "settings": {k: v for k, v in asdict(s).items() if k != "quiet"},
        "policies": per_policy,
        "metrics": {
            "reward": {**by_policy("reward"), "name": cfg.reward.name},
            "diversity": {**by_policy("diversity"), "method": div_method,
                          "message": div_note if div_ok else "needs --images-per-prompt >= 2"},
            "fid_vs_base": {"value": fid_value, "message": fid_note},
            "clip_score": {**by_policy("clip_score"), "message": clip_note},
        },
        "time_s": time.perf_counter() - t0,
    }
    result["_previews"] = previews  # removed by write_result
    return result


def default_output(target: Target) -> Path:
    root = target.run_dir / "eval" if target.run_dir else Path(".")
    return root / f"eval_{target.tag}.json"


def write_result(result: dict, out: Path) -> Path:
    """Write the JSON (and ``<stem>_<policy>.png`` sample grids); returns the JSON path."""
    from .checkpoint import atomic_write_text
    from .images import save_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    previews = result.pop("_previews", {})
    files = {}
    for name, images in previews.items():
        path = out.with_name(f"{out.stem}_{name}.png")
        save_grid(images, path)
        files[name] = path.name
    result["sample_grids"] = files
    atomic_write_text(out, json.dumps(result, indent=2))
    return out


def _fmt(value, std=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g} ± {std:.2g}" if std is not None else f"{value:.4g}"


def format_table(result: dict) -> str:
    """A plain-text table of the headline metrics."""
    mt = result["metrics"]
    which = [p for p in ("finetuned", "base") if result["policies"].get(p)]

    def cells(metric: dict) -> list:
        return [_fmt(metric[p]) if p in which else "-" for p in ("finetuned", "base")]

    r, d, c, f = mt["reward"], mt["diversity"], mt["clip_score"], mt["fid_vs_base"]
    reward = [_fmt(r[p]["mean"], r[p]["std"]) if p in which else "-" for p in ("finetuned", "base")]
    rows = [(f"reward ({r['name']})", *reward, "")]
    rows.append((f"diversity ({d['method']})", *cells(d), "" if d[which[0]] is not None else d["message"]))
    rows.append(("FID vs base", _fmt(f["value"]), "", "" if f["value"] is not None else f["message"]))
    rows.append(("CLIP score", *cells(c), "" if c[which[0]] is not None else c["message"]))
    head = ("metric", "finetuned", "base", "note")
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(3)]
    lines = [" | ".join(x[i].ljust(widths[i]) for i in range(3)) + " | " + x[3] for x in [head] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 4)
    return "\n".join(line.rstrip() for line in lines)


# ----------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run / checkpoint / LoRA (or the base model) on held-out prompts")
    p.add_argument("target", help="run directory, checkpoint directory, LoRA directory or file, or 'base'")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the run's configuration, e.g. sampling.num_steps=20 device=cuda")
    p.add_argument("--preset", "-p", default=None,
                   help="configuration to use instead of the run's config.json (default for 'base': tiny_cpu)")
    d = EvalSettings()
    p.add_argument("--images-per-prompt", "-n", type=int, default=d.images_per_prompt)
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help="first N held-out prompts (0: all)")
    p.add_argument("--split", default=d.split, choices=("eval", "train"))
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-base", action="store_true", help="do not sample the base model (no FID, no base column)")
    p.add_argument("--dreamsim-cache", default=None, help="unzipped DreamSim release folder (diversity)")
    p.add_argument("--inception-weights", default=None,
                   help=f"torch-fidelity Inception-v3 weights ({INCEPTION_FILE}) for FID")
    p.add_argument("--clip", default=None, help="local transformers CLIP folder for CLIP score")
    p.add_argument("--save-images", type=int, default=d.save_images, help="images per policy in the sample grids")
    p.add_argument("--out", default=None, help="JSON output (default RUN/eval/eval_<tag>.json or ./eval_<tag>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .config import ConfigError

    settings = EvalSettings(images_per_prompt=args.images_per_prompt, num_prompts=args.num_prompts,
                            split=args.split, batch_size=args.batch_size, seed=args.seed, base=not args.no_base,
                            dreamsim_cache=args.dreamsim_cache, inception_weights=args.inception_weights,
                            clip=args.clip, save_images=args.save_images, quiet=args.quiet)
    if settings.images_per_prompt < 1 or settings.batch_size < 1:
        print("lowmem-nablagfn eval: --images-per-prompt and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        target = resolve_target(args.target)
        cfg = eval_config(target, args.preset, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"lowmem-nablagfn eval: {exc}", file=sys.stderr)
        return 2
    try:
        result = evaluate(target, cfg, settings)
    except (FileNotFoundError, ImportError) as exc:  # missing weights / optional packages: say which
        print(f"lowmem-nablagfn eval: {exc}", file=sys.stderr)
        return 2
    out = write_result(result, Path(args.out) if args.out else default_output(target))
    if target.run_dir is not None:  # the run's report lists its evaluations
        from .report import refresh_report

        refresh_report(target.run_dir)
    from .distributed import pick_device
    from .memtrack import peak_memory_gb
    from .summary import eval_summary

    print(format_table(result))
    print(eval_summary(result, out, peak_memory_gb(pick_device(cfg.device))))
    return 0
