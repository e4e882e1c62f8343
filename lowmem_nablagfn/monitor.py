"""Watching for reward hacking: rewards that are not trained on, scored on held-out prompts during training.

A policy trained on one reward can raise it by exploiting that reward's blind spots while the images
get worse by every other measure.  With ``monitor.rewards`` set (e.g. train on ``aesthetic``, watch
``pickscore`` and ``imagereward``), every ``monitor.every`` epochs the current policy samples a small
held-out set — the first ``monitor.num_prompts`` prompts of the ``eval`` split of ``prompts.set``,
``monitor.images_per_prompt`` images each, at the same seeds every time, without a graph — and
``metrics.jsonl`` gets, for that epoch:

* ``monitor/reward``: the trained reward on those images (the same images as the watched ones, so
  the comparison is like for like, and fixed seeds keep it steady from one evaluation to the next);
* ``monitor/<name>``: each watched reward's mean on them;
* ``monitor/diversity``: the ``eval`` command's diversity (mean pairwise ``1 − cos`` between the
  embeddings of a prompt's images: the trained reward's image tower, else 32-px pixels).

:func:`detect` (a pure function of those rows) warns when a watched reward or the diversity fell at
each of the last ``monitor.patience`` evaluations while ``monitor/reward`` rose over them; with
``monitor.stop`` the run then stops (checkpoint and LoRA saved, ``monitor/stopped`` logged, exit
code 1).  The history is ``metrics.jsonl`` itself, which a resume cuts back to the checkpoint's
epoch: nothing extra is checkpointed.

Memory: the watched rewards are built on first use and kept in host memory; each is moved to the
device only while it scores the held-out images (kept on the host between rewards) and moved back,
so the device holds at most one of them at a time (:mod:`lowmem_nablagfn.planner.monitor` predicts it).
Sampling draws from its own generators, so a run trains exactly as it would without the monitor.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PREFIX = "monitor/"
TRAINED = "monitor/reward"
DIVERSITY = "monitor/diversity"
STOPPED = "monitor/stopped"
#: ``monitor/alarm/<name>`` = 1 at the evaluation that raised an alarm for ``monitor/<name>``.
ALARM = "monitor/alarm/"


# ----------------------------------------------------------------------------- the detector (pure)

@dataclass(frozen=True)
class Alarm:
    """A watched series that fell at each of the last ``patience`` evaluations while the trained reward rose."""

    epoch: int
    key: str
    """The metric (``monitor/<name>`` or ``monitor/diversity``)."""
    watched: Tuple[float, float]
    """Its value at the start and at the end of the window."""
    trained: Tuple[float, float]
    """``monitor/reward`` at the start and at the end of the window."""
    patience: int

    def line(self) -> str:
        name = self.key[len(PREFIX):]
        what = "diversity" if self.key == DIVERSITY else f"monitored {name}"
        (a, b), (c, d) = self.watched, self.trained
        return (f"lowmem-nablagfn: warning: epoch {self.epoch}: {what} fell for {self.patience} evaluations in a row "
                f"({a:.4g} → {b:.4g}) while the training reward rose ({c:.4g} → {d:.4g}): the policy may be "
                f"hacking the reward")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def watched_keys(rows: Sequence[dict]) -> List[str]:
    """The watched series of monitor rows, in first-seen order."""
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k.startswith(PREFIX) and k not in (TRAINED, STOPPED)
                 and not k.startswith(ALARM) and k not in keys]
    return keys


def _falling(history: Sequence[dict], patience: int) -> Dict[str, Alarm]:
    """{key: alarm} of the watched series that fell at each of the last ``patience`` evaluations of
    ``history`` while ``monitor/reward`` ended that window higher than it began."""
    window = list(history)[-(patience + 1):]
    if len(window) < patience + 1:
        return {}
    trained = [r.get(TRAINED) for r in window]
    if not all(_finite(v) for v in trained) or not trained[-1] > trained[0]:
        return {}
    out = {}
    for key in watched_keys(window):
        values = [r.get(key) for r in window]
        if all(_finite(v) for v in values) and all(b < a for a, b in zip(values, values[1:])):
            out[key] = Alarm(int(window[-1]["epoch"]), key, (values[0], values[-1]), (trained[0], trained[-1]),
                             patience)
    return out


def detect(history: Sequence[dict], patience: int) -> List[Alarm]:
    """The alarms raised at the last evaluation of ``history``.

    Args:
        history: the monitor's rows in epoch order, one per evaluation (``epoch``, ``monitor/reward``
            and the watched ``monitor/*`` values).
        patience: K.  A watched series is in alarm when it fell strictly at each of the last K
            evaluations (K + 1 values) while ``monitor/reward`` ended that window higher than it began
            (a net rise: the trained reward is allowed its noise).  An alarm is raised when a series
            enters that state, not again while it stays there (one warning per episode).
    """
    before = _falling(history[:-1], patience)
    return [alarm for key, alarm in _falling(history, patience).items() if key not in before]


def history_of(rows: Sequence[dict]) -> List[dict]:
    """The evaluations among ``metrics.jsonl`` rows: each row's epoch and ``monitor/*`` values."""
    return [{"epoch": r["epoch"], **{k: v for k, v in r.items() if k.startswith(PREFIX)}}
            for r in rows if TRAINED in r]


def due(every: int, epoch: int) -> bool:
    """Whether the monitor evaluates after ``epoch`` (the lagged loop's epoch -1, the base model, is one)."""
    return (epoch + 1) % every == 0


def stopped(run_dir: Path) -> bool:
    """Whether the run's last logged epoch was stopped by the monitor (``monitor.stop``)."""
    from .metrics_log import read_metrics

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    return bool(rows and rows[-1].get(STOPPED))


# ----------------------------------------------------------------------------- the watched rewards

def reward_config(cfg, name: str):
    """The :class:`~lowmem_nablagfn.config.RewardConfig` of watched reward ``name``: its
    ``monitor.checkpoints`` / ``monitor.backbones`` entry (else that reward's default), the run's
    ``reward.weight_dtype`` for the packaged reward models, the official preprocessing."""
    from .config import RewardConfig
    from .rewards import EXTERNAL

    mon = cfg.monitor
    return RewardConfig(name=name, checkpoint=mon.checkpoints.get(name), backbone=mon.backbones.get(name),
                        weight_dtype=cfg.reward.weight_dtype if name in EXTERNAL else "fp32")


def held_out_prompts(cfg) -> List[str]:
    """The first ``monitor.num_prompts`` prompts of the ``eval`` split of ``prompts.set`` (a set without
    a split gives its first prompts, which training samples too)."""
    from .rewards.prompts import load_prompts

    return load_prompts(cfg.prompts.set, "eval")[:cfg.monitor.num_prompts]


def batch_seed(seed: int, index: int) -> int:
    """The noise seed of held-out batch ``index``: the same at every evaluation."""
    return (seed * 1_000_003 + index * 10_007 + 4_099) % (2**62)


class Monitor:
    """The monitor of a run (:func:`~lowmem_nablagfn.loop.setup`'s components ``c``); a no-op when
    ``monitor.rewards`` is empty.  Call it after each epoch: ``metrics, stop = monitor(epoch)``.

    Rank 0 samples and scores (as it draws the sample grids); every rank gets the same ``stop``."""

    def __init__(self, c):
        from . import distributed as dist

        self.c, self.cfg = c, c.cfg.monitor
        self.rewards: Dict[str, object] = {}  # built on first use, kept in host memory
        self.history: List[dict] = []
        self.embed = None
        if self.cfg.rewards and dist.is_main():  # a resumed run: metrics.jsonl is cut back to its checkpoint
            from .metrics_log import read_metrics

            self.history = history_of(read_metrics(c.run_dir / "metrics.jsonl"))

    def __call__(self, epoch: int) -> Tuple[Dict[str, float], bool]:
        from . import distributed as dist

        if not self.cfg.rewards or not due(self.cfg.every, epoch):
            return {}, False
        metrics, stop = {}, False
        if dist.is_main():
            t0 = time.perf_counter()
            metrics = self.evaluate()
            self.history.append({"epoch": epoch, **metrics})
            metrics["time/monitor_s"] = time.perf_counter() - t0
            alarms = detect(self.history, self.cfg.patience)
            for alarm in alarms:
                print(alarm.line(), file=sys.stderr, flush=True)
                metrics[ALARM + alarm.key[len(PREFIX):]] = 1.0  # the report and TensorBoard show it
            stop = bool(alarms) and self.cfg.stop and epoch >= 0
            if stop:
                metrics[STOPPED] = 1.0
                print(f"lowmem-nablagfn: monitor.stop=true: stopping after epoch {epoch}: its checkpoint and lora/ are "
                      f"written, exit code 1; to go on regardless, rerun the command with --resume monitor.stop=false",
                      file=sys.stderr, flush=True)
        return metrics, dist.any_rank(stop)

    def _reward(self, name: str):
        if name not in self.rewards:
            from .rewards import build_reward

            self.rewards[name] = build_reward(reward_config(self.c.cfg, name), "cpu")
        return self.rewards[name]

    def evaluate(self) -> Dict[str, float]:
        """Sample the held-out set with the current policy and score it: ``{monitor/...: value}``."""
        import torch

        from . import memtrack
        from .image_metrics import diversity_embedder, mean_pairwise_cosine_distance
        from .images import decode_latents
        from .loop import encode, policy_eps_fn
        from .sampling import sample

        c, mon = self.c, self.cfg
        if self.embed is None:
            self.embed = diversity_embedder(c.reward_model, None, c.device)[0]
        prompts = held_out_prompts(c.cfg)
        items = [(i, p) for i, p in enumerate(prompts) for _ in range(mon.images_per_prompt)]
        size = c.cfg.sampling.batch_size
        batches = [items[b:b + size] for b in range(0, len(items), size)]
        images, trained, embeddings = [], [], []
        with torch.no_grad(), memtrack.phase("monitor"):
            for b, chunk in enumerate(batches):
                texts = [p for _, p in chunk]
                gen = torch.Generator().manual_seed(batch_seed(c.cfg.seed, b))
                traj = sample(policy_eps_fn(c), c.sched, encode(c, texts), c.latent_shape, gen,
                              keep=torch.zeros(len(chunk), 0, dtype=torch.long), prompts=texts, device=c.device)
                x = decode_latents(c.parts.vae, traj.final_latents)
                trained.append(c.reward_model(x, texts).float().cpu())
                embeddings.append(self.embed(x).float().cpu())
                images.append(x.cpu())  # on the host while the watched rewards take turns on the device
            out = {TRAINED: float(torch.cat(trained).mean()),
                   DIVERSITY: mean_pairwise_cosine_distance(torch.cat(embeddings), [i for i, _ in items])}
            for name in mon.rewards:
                out[PREFIX + name] = self._score(self._reward(name), images, batches)
        return out

    def _score(self, model, images: List, batches: List) -> float:
        """Mean of ``model`` over the held-out images, with ``model`` on the device only meanwhile."""
        import torch

        from . import memtrack

        device = self.c.device
        try:
            with memtrack.phase("monitor_reward"):
                model.to(device)
                scores = [model(x.to(device), [p for _, p in chunk]).float().cpu() for x, chunk in zip(images, batches)]
        finally:
            model.to("cpu")
        return float(torch.cat(scores).mean())


# ----------------------------------------------------------------------------- the report's figure and line

def draw(fig, title: str, data: Dict[str, tuple]) -> None:
    """The report's monitor figure on ``fig`` (matplotlib): one panel per watched series, with the trained
    reward on the same held-out images on a second axis, a red line at each alarm of that series and a
    black one where ``monitor.stop`` stopped the run.  ``data``: {``monitor/...`` key: (epochs, values)}."""
    keys = watched_keys([{k: None for k in data}])
    cols = min(len(keys), 3) or 1
    fig.set_size_inches(3.4 * cols, 2.9 * math.ceil(len(keys) / cols) + 0.4)
    fig.subplots_adjust(left=0.09, right=0.9, top=0.78, bottom=0.14, wspace=0.75, hspace=0.6)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(len(keys) / cols), cols, i + 1)
        ax.plot(*data[key], color="C1", marker=".", label=key[len(PREFIX):])
        ax.set_title(key[len(PREFIX):], fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if TRAINED in data:
            twin = ax.twinx()
            twin.plot(*data[TRAINED], color="C0", linestyle="--", label="trained reward")
            twin.tick_params(labelsize=7, colors="C0")
        for epoch in data.get(ALARM + key[len(PREFIX):], ((), ()))[0]:
            ax.axvline(epoch, color="red", alpha=0.6)
        for epoch in data.get(STOPPED, ((), ()))[0]:
            ax.axvline(epoch, color="black", linestyle=":")
    fig.suptitle(f"{title}\nwatched (orange) · trained reward (blue, right axis) · red: warning", fontsize=9)


def warnings_text(rows: Sequence[dict]) -> Optional[str]:
    """The alarms of ``metrics.jsonl`` rows, one ``epoch E: names`` per evaluation that raised any
    (``none``); None when the run had no monitor."""
    if not any(TRAINED in r for r in rows):
        return None
    found = [f"epoch {r['epoch']}: " + ", ".join(k[len(ALARM):] for k in r if k.startswith(ALARM))
             for r in rows if any(k.startswith(ALARM) for k in r)]
    stop = [r["epoch"] for r in rows if r.get(STOPPED)]
    return ("; ".join(found) or "none") + (f" (stopped after epoch {stop[-1]}: monitor.stop)" if stop else "")
