"""A static HTML report of a run: ``RUN/report.html``, refreshed by the trainer after each epoch.

It shows, from the files the run already writes:

* curves from ``metrics.jsonl`` (PNG, matplotlib's Agg canvas, no display): reward mean ± std and
  max (a reward mixture: also each component's mean ± std, one panel each, and its share of the
  reward gradient norm), loss terms, gradient norms (before clipping), time per epoch, peak memory,
  the reward-hacking monitor's held-out rewards beside the trained one (its warnings marked);
* the fixed-seed sample grids ``samples/epoch_*.png`` across epochs (same seeds and prompts in
  every grid, so drift and loss of diversity are visible), with the grid's prompts;
* memory and throughput figures, the evaluations in ``eval/*.json`` (``lowmem-nablagfn eval``) and
  the resolved ``config.json``.

Cheap by construction: a plot is redrawn only when its data changed, and, during training, at most
every ``min_interval`` seconds or 20 times the cost of a redraw, whichever is longer (the first and
the final call always draw; a redraw of the five plots takes ~0.5 s on a CPU core); the page
itself is a few kilobytes of text.  ``lowmem-nablagfn report RUN`` rebuilds it by hand.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .metrics_log import read_metrics
from .monitor import draw as draw_monitor, warnings_text

REPORT = "report.html"
PLOT_DIR = "report"
MAX_GRIDS = 24

#: (file stem, title, which metric keys it plots).
PLOTS: List[tuple] = [
    ("reward", "Reward of each epoch's samples", lambda k: k.startswith("reward/") and k.count("/") == 1),
    ("components", "Components of the reward mixture (mean ± std, each on its own axis)",
     lambda k: k.startswith("reward/") and k.endswith(("/mean", "/std")) and k.count("/") == 2),
    ("grad_share", "Share of the reward gradient norm per component", lambda k: k.endswith("/grad_share")),
    ("loss", "Loss terms (training batches' mean)", lambda k: k.startswith("train/") and "grad_norm" not in k),
    ("grad_norm", "Gradient norms before clipping", lambda k: "grad_norm" in k),
    ("time", "Time per epoch (s)", lambda k: k.startswith("time/")),
    ("memory", "Peak memory (GiB)", lambda k: k.startswith("memory/")),
    ("monitor", "Held-out rewards not trained on (monitor.*)", lambda k: k.startswith("monitor/")),
]


# ----------------------------------------------------------------------------- data

def read_run(run_dir: Path) -> Tuple[List[dict], dict]:
    """``(metrics rows, resolved config)`` of a run directory; an unreadable config is ``{}``."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    return rows, cfg


def series(rows: List[dict], select: Callable[[str], bool]) -> Dict[str, tuple]:
    """{metric: (epochs, values)} of the finite numeric values of the selected keys."""
    out: Dict[str, tuple] = {}
    for row in rows:
        for k, v in row.items():
            if k != "epoch" and select(k) and isinstance(v, (int, float)) and math.isfinite(v):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(row["epoch"])
                ys.append(float(v))
    return out


# ----------------------------------------------------------------------------- plots

def _draw(name: str, title: str, data: Dict[str, tuple], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    fig = Figure(figsize=(6.4, 3.4), dpi=80)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.91, bottom=0.14)  # fixed: layout engines cost ~2x
    if name == "components":  # rewards of different scales (aesthetic ~6, PickScore ~21): one panel each
        _draw_components(fig, title, data)
    elif name == "monitor":  # watched rewards beside the trained one, warnings marked
        draw_monitor(fig, title, data)
    else:
        _draw_axes(fig.add_subplot(), name, title, data)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)


def _mean_band(ax, data: Dict[str, tuple], mean_key: str, std_key: str, color: str, label: str) -> None:
    xs, mean = data[mean_key]
    ax.plot(xs, mean, label=label, color=color)
    if std_key in data and data[std_key][0] == xs:
        std = data[std_key][1]
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.2, label="± std")


def _draw_components(fig, title: str, data: Dict[str, tuple]) -> None:
    labels = sorted({k.split("/")[1] for k in data if k.endswith("/mean")})
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        _mean_band(ax, data, f"reward/{label}/mean", f"reward/{label}/std", f"C{i + 1}", label)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.subplots_adjust(top=0.8, wspace=0.35)
    fig.suptitle(title, fontsize=10)


def _draw_axes(ax, name: str, title: str, data: Dict[str, tuple]) -> None:
    if name == "reward" and "reward/mean" in data:
        _mean_band(ax, data, "reward/mean", "reward/std", "C0", "mean")
        for k in [k for k in data if k not in ("reward/mean", "reward/std")]:
            ax.plot(*data[k], linestyle="--", label=k.split("/", 1)[1])
    else:
        for k, (xs, ys) in sorted(data.items()):
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k.split("/", 1)[-1])
        values = [v for _, ys in data.values() for v in ys]
        if name in ("loss", "grad_norm") and values:
            spread = max(abs(v) for v in values) / max(min(abs(v) for v in values), 1e-30)
            if spread > 100:  # terms of very different sizes: a log axis keeps each readable
                ax.set_yscale("log" if min(values) > 0 else "symlog")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def update_plots(run_dir: Path, rows: List[dict], force: bool = False, min_interval: float = 30.0) -> List[tuple]:
    """Redraw the plots whose data changed.

    Unless ``force``, a changed plot waits until ``max(min_interval, 20 × the last redraw's cost)``
    seconds have passed since it was drawn, so plotting stays under ~5 % of a run's time.
    Returns (file relative to ``run_dir``, title) of every plot that has data.
    """
    out_dir = run_dir / PLOT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file = out_dir / ".state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    now = time.time()
    wait = max(min_interval, 20 * state.get("_cost", 0.0))
    shown, start, drawn = [], time.perf_counter(), False
    for name, title, select in PLOTS:
        data = series(rows, select)
        if not data:
            continue
        path = out_dir / f"{name}.png"
        digest = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()
        prev = state.get(name, {})
        fresh = path.is_file() and path.stat().st_size > 0
        if not fresh or (prev.get("hash") != digest and (force or now - prev.get("time", 0) >= wait)):
            _draw(name, title, data, path)
            state[name] = {"hash": digest, "time": now}
            drawn = True
        shown.append((f"{PLOT_DIR}/{name}.png", title))
    if drawn:
        state["_cost"] = time.perf_counter() - start
    state_file.write_text(json.dumps(state))
    return shown


# ----------------------------------------------------------------------------- page parts

def _table(rows: List[tuple], head: Optional[tuple] = None) -> str:
    e = html.escape
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def _num(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _summary(rows: List[dict], cfg: dict) -> str:
    """Progress, reward, memory and throughput figures."""
    if not rows:
        return "<p>No epoch logged yet.</p>"
    last = rows[-1]
    s, t = cfg.get("sampling", {}), cfg.get("training", {})
    epochs = cfg.get("training", {}).get("num_epochs")
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    med = {k: statistics.median(v) for k in ("time/epoch_s", "time/sample_s", "time/train_s")
           if (v := [r[k] for r in rows if isinstance(r.get(k), (int, float)) and r["epoch"] >= 0])}
    trajs = s.get("batch_size", 0) * s.get("num_batches_per_epoch", 0)
    done = last["epoch"] + 1
    items = [("epochs done", f"{done} of {epochs}" if epochs else str(done)),
             ("optimizer steps", str(last.get("optimizer_steps", "n/a")))]
    if rewards:
        items += [("reward mean: first → last (best)",
                   f"{_num(rewards[0])} → {_num(rewards[-1])} ({_num(max(rewards))})")]
    items += [("reward-hacking warnings (monitor.*)", w)] if (w := warnings_text(rows)) is not None else []
    peaks = [r["memory/peak_gb"] for r in rows if "memory/peak_gb" in r]
    if peaks:
        items += [("peak memory (GiB; CUDA: max allocated, CPU: max resident)", _num(max(peaks), 3))]
    if "time/epoch_s" in med:
        items += [("median epoch time (s)", _num(med["time/epoch_s"], 3))]
        if epochs:
            left = max(0, epochs - done) * med["time/epoch_s"]
            items += [("time left at that pace",
                       "done" if not left else f"{left / 3600:.2f} h" if left > 3600 else f"{left:.0f} s")]
    if "time/sample_s" in med and trajs:
        items += [("sampling throughput (trajectories/s per process)", _num(trajs / med["time/sample_s"], 3))]
    if "time/train_s" in med and trajs:
        items += [("training throughput (trajectories/s per process)", _num(trajs / med["time/train_s"], 3))]
    if t.get("batch_size"):
        items += [("trajectories per epoch per process / per training batch",
                   f"{trajs} / {t['batch_size']} (accumulation {t.get('gradient_accumulation_steps', 1)})")]
    return _table([(html.escape(k), html.escape(v)) for k, v in items])


def _grid_label(f: Path) -> str:
    if f.stem == "final":
        return "final"
    k = int(f.stem.split("_")[1])  # epoch_K: after K epochs (0: the base model)
    return "before training" if k == 0 else f"after {k} epoch{'s' * (k > 1)}"


def _figure(run_dir: Path, f: Path, label: str, cls: str = "") -> str:
    rel = html.escape(f.relative_to(run_dir).as_posix(), quote=True)
    klass = f' class="{cls}"' if cls else ""
    return (f'<figure{klass}><img src="{rel}" alt="samples, {html.escape(label, quote=True)}">'
            f'<figcaption>{html.escape(label)}</figcaption></figure>')


def _grids(run_dir: Path, cfg: dict) -> str:
    """Before / latest side by side (same seeds), then every epoch's grid — or, past ``MAX_GRIDS``,
    an even subsample (first and last included) that says so."""
    files = sorted((run_dir / "samples").glob("epoch_[0-9]*[0-9].png"))
    files = [f for f in files if f.stat().st_size > 0]
    final = run_dir / "samples" / "final.png"
    final = final if final.is_file() and final.stat().st_size > 0 else None
    if not files and final is None:
        return "<p>No sample grid yet (<code>logging.sample_grid_seeds</code> = 0 disables them).</p>"
    note = ""
    n = cfg.get("logging", {}).get("sample_grid_seeds", 0)
    try:
        from .rewards.prompts import load_prompts

        prompts = load_prompts(cfg["prompts"]["set"], cfg["prompts"]["split"])
        if n:
            cols = max(1, math.ceil(math.sqrt(n)))
            shown = [html.escape(prompts[i % len(prompts)]) for i in range(n)]
            note = (f"<p>Row-major, {cols} per row, seed 1234, the same in every grid; prompts: "
                    + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(shown)) + "</p>")
    except (KeyError, OSError, ValueError):
        pass
    out = [note]
    latest = final or (files[-1] if files else None)
    if files and latest != files[0]:  # the same seeds before training and now
        label = "latest: " + _grid_label(files[-1]) + (" (final)" if latest == final else "")
        out.append('<h3>Before and after</h3><div class="grids">'
                   + _figure(run_dir, files[0], _grid_label(files[0]), "big")
                   + _figure(run_dir, latest, label, "big") + "</div>")
    shown_files = files
    if len(files) > MAX_GRIDS:
        step = (len(files) - 1) / (MAX_GRIDS - 1)
        shown_files = [files[round(i * step)] for i in range(MAX_GRIDS)]
        out.append(f"<p>Every epoch's grid is in <code>samples/</code>; shown: {MAX_GRIDS} of {len(files)}, "
                   f"evenly spaced (one every {step:.3g} epochs), the first and the last included.</p>")
    if shown_files:
        out.append("<h3>Every epoch</h3>" if len(shown_files) == len(files) else "<h3>Across epochs</h3>")
        out.append('<div class="grids">' + "\n".join(_figure(run_dir, f, _grid_label(f)) for f in shown_files)
                   + "</div>")
    return "\n".join(out)


def _evaluations(run_dir: Path) -> str:
    found = sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []
    rows, images = [], []
    for path in found:
        try:
            r = json.loads(path.read_text())
            m = r["metrics"]
        except (OSError, ValueError, KeyError):
            continue
        rf, rb = m["reward"]["finetuned"], m["reward"].get("base")
        rows.append((html.escape(r.get("tag", path.stem)),
                     f"{_num(rf['mean'])} ± {_num(rf['std'], 2)}" if rf else "-",
                     f"{_num(rb['mean'])} ± {_num(rb['std'], 2)}" if rb else "-",
                     f"{_num(m['diversity']['finetuned'])} / {_num(m['diversity'].get('base'))} "
                     f"({html.escape(m['diversity']['method'])})",
                     _num(m["fid_vs_base"]["value"]),
                     f"{_num(m['clip_score']['finetuned'])} / {_num(m['clip_score'].get('base'))}",
                     f'<a href="eval/{html.escape(path.name, quote=True)}">{html.escape(path.name)}</a>'))
        for policy, name in sorted(r.get("sample_grids", {}).items()):
            if (path.parent / name).is_file() and (path.parent / name).stat().st_size > 0:
                rel, caption = html.escape(f"eval/{name}", quote=True), html.escape(f"{r.get('tag', '')}: {policy}")
                images.append(f'<figure><img src="{rel}" alt="{html.escape(policy)} samples">'
                              f'<figcaption>{caption}</figcaption></figure>')
    if not rows:
        return "<p>None yet: <code>lowmem-nablagfn eval RUN_DIR</code>.</p>"
    head = ("checkpoint", "reward (finetuned)", "reward (base)", "diversity finetuned / base", "FID vs base",
            "CLIP score finetuned / base", "JSON")
    return _table(rows, head) + '<div class="grids">' + "\n".join(images) + "</div>"


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.plots img{max-width:48%;margin:.3em}.grids{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0}figure img{width:160px;image-rendering:pixelated}figure.big img{width:384px}
figcaption{font-size:.85em;text-align:center}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.85em}"""


# ----------------------------------------------------------------------------- the page

def write_report(run_dir: str | Path, force: bool = False, min_interval: float = 30.0) -> Path:
    """Write ``run_dir/report.html`` (and its plots); returns its path."""
    from .checkpoint import atomic_write_text

    run_dir = Path(run_dir)
    rows, cfg = read_run(run_dir)
    plots = update_plots(run_dir, rows, force=force, min_interval=min_interval)
    e = html.escape
    name = cfg.get("logging", {}).get("run_name", run_dir.name)
    reward = cfg.get("reward", {})
    mix = ", ".join(f"{k} × {v:g}" for k, v in (reward.get("mix") or {}).items())
    what = (f"{cfg.get('pretrained', {}).get('model', '?')} · reward {reward.get('name', '?')}"
            f"{f' ({mix})' if mix else ''} · "
            f"{'no-flow' if cfg.get('model', {}).get('no_flow') else 'residual ∇-DB'}")
    plot_html = "\n".join(f'<img src="{e(src, quote=True)}" alt="{e(title, quote=True)}">' for src, title in plots)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="120">
<title>{e(name)} · lowmem-nablagfn</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{e(name)}</h1>
<p>{e(what)} · updated {e(time.strftime('%Y-%m-%d %H:%M:%S'))} · <code>{e(str(run_dir))}</code></p>
<h2>Summary</h2>
{_summary(rows, cfg)}
<h2>Curves</h2>
<div class="plots">
{plot_html or '<p>No metrics yet.</p>'}
</div>
<h2>Samples of fixed seeds across epochs</h2>
{_grids(run_dir, cfg)}
<h2>Evaluations</h2>
{_evaluations(run_dir)}
<h2>Configuration</h2>
<pre>{e(json.dumps(cfg, indent=2))}</pre>
</body>
</html>
"""
    path = run_dir / REPORT
    atomic_write_text(path, page)
    return path


def refresh_report(run_dir: str | Path, force: bool = False) -> Optional[Path]:
    """:func:`write_report` for the trainer: a failure warns and never stops training."""
    try:
        return write_report(run_dir, force=force)
    except Exception as exc:  # a report is a convenience: never lose a run to it
        warnings.warn(f"report of {run_dir} not refreshed: {type(exc).__name__}: {exc}", stacklevel=2)
        return None


# ----------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("report", help="(re)write RUN/report.html: curves, sample grids, config, evaluations")
    p.add_argument("run_dir", help="run directory")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        print(f"lowmem-nablagfn report: {run_dir} is not a directory", file=sys.stderr)
        return 2
    print(f"wrote {write_report(run_dir, force=True)}")
    return 0
