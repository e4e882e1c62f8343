"""What a finished ``train`` or ``eval`` prints: what happened, where the results are, what to run next.

Built from the files the run already wrote (``metrics.jsonl``, ``config.json``, ``checkpoints/``) and,
for ``eval``, from its result dict, so the text says the same as the report.
"""
from __future__ import annotations

import shlex
import statistics
from pathlib import Path
from typing import List, Optional


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute; shell-quoted."""
    path = Path(path).resolve()
    try:
        text = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def _mean_std(row: dict) -> str:
    mean, std = row.get("reward/mean"), row.get("reward/std")
    if mean is None:
        return "n/a"
    return f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def train_summary(run_dir: Path, elapsed_s: Optional[float] = None) -> str:
    """The end-of-``train`` summary of ``run_dir``: reward first → last epoch (mean ± std over that
    epoch's samples), epochs, time, peak memory, where the LoRA, report, samples and checkpoints
    are, and the next commands."""
    from .report import REPORT, read_run

    run_dir = Path(run_dir)
    rows, cfg = read_run(run_dir)
    run = shown_path(run_dir)
    lines: List[str] = []
    epochs = [r for r in rows if r.get("epoch", -1) >= 0]
    head = f"Finished {len(epochs)} epoch{'s' * (len(epochs) != 1)}"
    if elapsed_s is not None:
        head += f" in {_duration(elapsed_s)}"
    times = [r["time/epoch_s"] for r in epochs if isinstance(r.get("time/epoch_s"), (int, float))]
    if times:
        head += f" ({statistics.median(times):.3g} s per epoch)"
    peaks = [r["memory/peak_gb"] for r in rows if isinstance(r.get("memory/peak_gb"), (int, float))]
    if peaks:
        device = cfg.get("device", "auto")
        kind = "max resident" if device == "cpu" else "CUDA max allocated, or max resident on CPU"
        head += f"; peak memory {max(peaks):.2f} GiB ({kind})"
    lines.append(head + ".")
    rewards = [r for r in rows if isinstance(r.get("reward/mean"), (int, float))]
    if rewards:
        name = cfg.get("reward", {}).get("name", "reward")
        first, last = rewards[0], rewards[-1]
        best = max(rewards, key=lambda r: r["reward/mean"])
        first_what = "before training" if first.get("epoch", 0) <= 0 else f"epoch {first['epoch']}"
        lines.append(f"Reward ({name}, mean ± std of each epoch's samples): {_mean_std(first)} ({first_what}) "
                     f"→ {_mean_std(last)} (epoch {last.get('epoch')}); best {best['reward/mean']:.4g} "
                     f"(epoch {best.get('epoch')}).")
    where = []
    if (run_dir / "lora").is_dir():
        where.append(("LoRA", f"{run}/lora/  (diffusers: pipe.load_lora_weights(\"{run}/lora\"))"))
    if (run_dir / REPORT).is_file():
        where.append(("report", f"{run}/{REPORT}  (curves; sample grids before → after)"))
    if (run_dir / "samples").is_dir():
        final = " final.png," if (run_dir / "samples" / "final.png").is_file() else ""
        where.append(("samples", f"{run}/samples/ ({final} one grid per epoch, the same seeds)".replace("( ", "(")))
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        where.append(("checkpoint", f"{run}/checkpoints/{name}  (continue: the same command with --resume)"))
    if where:
        width = max(len(k) for k, _ in where)
        lines += [f"  {k.ljust(width)}  {v}" for k, v in where]
    lines.append("Next:")
    lines.append(f"  lowmem-nablagfn eval {run}      # reward and diversity vs the base model, held-out prompts")
    lines.append(f"  lowmem-nablagfn export {run} --format kohya --out {run_dir.name}.safetensors"
                 f"   # for A1111 / ComfyUI")
    lines.append(f"  lowmem-nablagfn report {run}    # rewrite the report")
    return "\n".join(lines)


def eval_summary(result: dict, out: Path, peak_memory_gb: Optional[float] = None) -> str:
    """The end-of-``eval`` summary: the reward of the finetuned policy against the base model (same
    seeds), how many images, time, peak memory, where the JSON / grids / report are, what next."""
    rw = result.get("metrics", {}).get("reward", {})
    fin, base = rw.get("finetuned"), rw.get("base")

    def ms(x: Optional[dict]) -> str:
        return "n/a" if not x or x.get("mean") is None else f"{x['mean']:.4g} ± {x['std']:.2g}"

    pr, st = result.get("prompts", {}), result.get("settings", {})
    n = pr.get("count", 0) * st.get("images_per_prompt", 0)
    head = (f"Evaluated {result.get('target', '?')}: {n} image{'s' * (n != 1)} per policy "
            f"({pr.get('count', 0)} {pr.get('split', '')} prompts × {st.get('images_per_prompt', 0)})")
    if result.get("time_s") is not None:
        head += f" in {_duration(result['time_s'])}"
    if peak_memory_gb is not None:
        head += f"; peak memory {peak_memory_gb:.2f} GiB"
    lines = [head + "."]
    if fin and base:
        lines.append(f"Reward ({rw.get('name')}, mean ± std): base {ms(base)} → finetuned {ms(fin)} (same seeds).")
    elif fin or base:
        lines.append(f"Reward ({rw.get('name')}, mean ± std): {ms(fin or base)}.")
    out = Path(out)
    lines.append(f"  results  {shown_path(out)}")
    grids = result.get("sample_grids", {})
    if grids:
        lines.append("  grids    " + ", ".join(shown_path(out.with_name(g)) for g in grids.values()))
    run_dir = result.get("run_dir")
    if run_dir:
        run = shown_path(Path(run_dir))
        lines.append(f"  report   {run}/report.html  (evaluations section)")
        lines.append("Next:")
        lines.append(f"  lowmem-nablagfn export {run} --format kohya --out {Path(run_dir).name}.safetensors")
        lines.append(f"  lowmem-nablagfn report {run}")
    return "\n".join(lines)
