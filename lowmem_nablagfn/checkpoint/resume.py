"""Whether a run may start, resume, or must stop — decided before any model is built
(:func:`decide_start`, which writes nothing) — and the tidying of the run directory once it starts
(:func:`start_run`)."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .files import (atomic_write_text, checkpoints, epoch_of, newest_first, read_manifest, remove_stale_temporaries,
                    set_aside, verify)
from .state import ABANDONED_DIR, DAMAGED_DIR, MANIFEST, STATE_FILE, RunError

#: Config keys whose change on resume does not alter what is trained (logged, allowed). Prefixes end
#: in ".". ``memory.*`` only moves memory around (checkpointing, chunking, offloading, kernels);
#: ``monitor.*`` only watches (its sampling draws from its own generators).
HARMLESS = ("training.num_epochs", "training.max_nonfinite_updates", "logging.", "memory.", "monitor.")
#: Exceptions to :data:`HARMLESS`: the storage precision of the kept transitions changes the numbers
#: the model trains on (bf16 storage: ~11 % error in the last transition's s_F).
NOT_HARMLESS = ("memory.transition_dtype",)
#: Mappings compared whole: a reward added to or dropped from a mixture is a change (keys one side lacks
#: are not compared otherwise); under ``reward.``, so a resume refuses it.
WHOLE = ("reward.mix", "reward.checkpoints", "reward.backbones")
#: What a fresh start with ``logging.overwrite=true`` deletes from the run directory.
RUN_OUTPUTS = ("checkpoints", "lora", "samples", "tensorboard", "report", "report.html", "metrics.jsonl",
               "config.json", "eval")


def is_run(run_dir: Path) -> bool:
    """The run marker: ``config.json`` as :func:`start_run` writes it (a configuration with its
    ``logging`` and ``pretrained`` sections), or a checkpoint with a manifest."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        if isinstance(saved, dict) and isinstance(saved.get("logging"), dict) and \
                {"output_dir", "run_name"} <= saved["logging"].keys() and isinstance(saved.get("pretrained"), dict):
            return True
    except (OSError, ValueError):
        pass
    return any((c / MANIFEST).is_file() for c in checkpoints(run_dir))


def check_overwrite(run_dir: Path) -> None:
    """``logging.overwrite`` deletes :data:`RUN_OUTPUTS` only in a directory :func:`is_run` marks as a run.

    Raises:
        RunError: ``run_dir`` holds some of those names but is not a run (someone's own files).
    """
    present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if present and not is_run(run_dir):
        raise RunError(f"--overwrite (logging.overwrite=true) would delete {', '.join(present)} in {run_dir}, which is "
                       f"not a lowmem-nablagfn run (no config.json of a run, no checkpoint manifest); nothing was "
                       f"deleted. Choose another logging.run_name or logging.output_dir")


@dataclass
class RunStart:
    """What :func:`decide_start` decided.

    Attributes:
        run_dir: where this run writes.
        checkpoint: the intact checkpoint to resume from, or None (a fresh start).
        epoch: that checkpoint's epoch (None for a fresh start).
        notes: what the user should know (harmless config changes, damaged checkpoints skipped).
        damaged: checkpoints of this run newer than ``checkpoint`` that failed verification.
        abandoned: intact checkpoints of this run newer than ``checkpoint`` (a resume from an older
            one): the branch this resume leaves, set aside so that pruning and ``--resume`` never
            mistake it for this one.
        overwrite: delete the run's earlier outputs before starting.
    """

    run_dir: Path
    checkpoint: Optional[Path] = None
    epoch: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    damaged: List[Path] = field(default_factory=list)
    overwrite: bool = False
    abandoned: List[Path] = field(default_factory=list)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in WHOLE:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_configs(saved: dict, current: dict) -> tuple:
    """(refused, allowed) lists of ``key: old -> new`` between a checkpoint's config and this one.

    Keys only one side has (a field added or removed by another version) are not compared.
    """
    a, b = _flatten(saved), _flatten(current)
    refused, allowed = [], []
    for key in sorted(a.keys() & b.keys()):
        if a[key] != b[key]:
            line = f"{key}: {a[key]!r} -> {b[key]!r}"
            harmless = key not in NOT_HARMLESS and any(
                key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)
            (allowed if harmless else refused).append(line)
    return refused, allowed


def env_world_size() -> int:
    """Processes of this job as the launcher set them (before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def decide_start(cfg, resume: Optional[str] = None, world_size: Optional[int] = None) -> RunStart:
    """Decide a start or resume of ``cfg``'s run without building or writing anything.

    Args:
        resume: None (a fresh start), ``"auto"`` (the run's newest intact checkpoint), or a path (a
            checkpoint directory or a run directory).
        world_size: processes of this job (default: the launcher's ``WORLD_SIZE``, else 1).

    Raises:
        RunError: nothing to resume; checkpoints present but no ``--resume`` (and no overwrite);
            no intact checkpoint; a config change that alters what is trained; another world size.
    """
    from ..config import to_dict

    run_dir = Path(cfg.logging.output_dir) / cfg.logging.run_name
    world = world_size or env_world_size()
    overwrite = bool(getattr(cfg.logging, "overwrite", False))
    own = checkpoints(run_dir)
    if resume is None:
        if own and not overwrite:
            raise RunError(f"{run_dir} already holds checkpoints (newest: {own[-1].name}); continue that run "
                           f"with --resume, or start afresh under a new logging.run_name=NAME, or with "
                           f"--overwrite (logging.overwrite=true), which deletes its checkpoints and outputs")
        if overwrite:
            check_overwrite(run_dir)
        return RunStart(run_dir, overwrite=overwrite)
    if overwrite:
        raise RunError("--resume and --overwrite (logging.overwrite=true) contradict each other; give one")
    path = run_dir if resume == "auto" else Path(resume).expanduser()
    if (path / "checkpoints").is_dir() or resume == "auto":
        candidates, source = newest_first(path), path
        if not candidates:
            raise RunError(f"--resume: {path} has no checkpoint to resume from (the run did not reach its first "
                           f"checkpoint, or the directory is not a run); start it without --resume")
    elif (path / MANIFEST).is_file() or (path / STATE_FILE).is_file():
        candidates, source = [path], path.parent.parent
    else:
        raise RunError(f"--resume {resume}: neither a checkpoint directory (RUN/checkpoints/epoch-N) nor a run "
                       f"directory with checkpoints; give one of those, or --resume alone for this run's latest")
    same_run = source.resolve() == run_dir.resolve()
    if own and not same_run:
        raise RunError(f"{run_dir} already holds checkpoints of its own; resume {source} into a new "
                       f"logging.run_name=NAME (or into {source} itself)")
    notes, damaged, chosen = [], [], None
    for cand in candidates:
        problem = verify(cand)
        if problem is None:
            chosen = cand
            break
        notes.append(f"checkpoint {cand} is damaged ({problem}); skipped")
        damaged.append(cand)
    if chosen is None:
        raise RunError(f"--resume: no intact checkpoint in {source}: " + "; ".join(notes))
    if damaged:
        notes.append(f"resuming from {chosen.name}, the newest intact checkpoint")
    manifest = read_manifest(chosen)
    if manifest["world_size"] != world:
        raise RunError(f"checkpoint {chosen} was written by {manifest['world_size']} process(es) and this job "
                       f"has {world}: resume with {manifest['world_size']} (each rank's sample buffer and "
                       f"optimiser partitions are its own, and the batch arithmetic depends on it)")
    refused, allowed = compare_configs(manifest["config"], to_dict(cfg))
    if refused:
        raise RunError(f"the configuration differs from checkpoint {chosen}'s in what is trained:\n  - "
                       + "\n  - ".join(refused)
                       + "\nresume with the checkpoint's values (its config: manifest.json or the run's config.json), "
                         "or start a new run (logging.run_name=NAME)")
    notes += [f"changed since the checkpoint: {line}" for line in allowed]
    if not same_run:
        return RunStart(run_dir, chosen, int(manifest["epoch"]), notes)
    skipped = {p.resolve() for p in damaged}
    newer = [p for p in own if epoch_of(p) > epoch_of(chosen) and p.resolve() not in skipped]
    return RunStart(run_dir, chosen, int(manifest["epoch"]), notes, damaged, abandoned=newer)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def start_run(decision: RunStart, cfg) -> None:
    """Rank 0, after :func:`decide_start`: overwrite if asked, remove stale temporaries, set damaged
    checkpoints aside (``checkpoints/damaged/``) and those newer than the one resumed from
    (``checkpoints/abandoned/``), cut ``metrics.jsonl`` back to the resumed epoch,
    write ``config.json``, print the plan's notes."""
    from ..config import to_dict

    if not _is_main_process():
        return
    run_dir = decision.run_dir
    if decision.overwrite:
        for name in RUN_OUTPUTS:
            p = run_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        decision.notes.append(f"logging.overwrite: deleted the earlier outputs of {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    for bad in decision.damaged:
        aside = set_aside(bad, run_dir / "checkpoints" / DAMAGED_DIR)
        decision.notes.append(f"moved damaged {bad.name} to {aside}")
    if decision.abandoned:
        aside = run_dir / "checkpoints" / ABANDONED_DIR
        for newer in decision.abandoned:
            set_aside(newer, aside)
        if (run_dir / "metrics.jsonl").is_file():  # about to be cut back: that branch's curve goes with it
            set_aside(run_dir / "metrics.jsonl", aside, copy=True)
        names = ", ".join(p.name for p in decision.abandoned)
        decision.notes.append(f"resuming from {decision.checkpoint.name}, older than {names}: moved those and a copy of "
                          f"metrics.jsonl to {aside} (kept; --resume one of them with a new "
                          f"logging.run_name=NAME to continue that branch)")
    if decision.checkpoint is not None and decision.checkpoint.parent.resolve() == (run_dir / "checkpoints").resolve():
        atomic_write_text(run_dir / "checkpoints" / "latest", decision.checkpoint.name + "\n")
    truncate_metrics(run_dir / "metrics.jsonl", decision.epoch)
    atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    for note in decision.notes:
        print(f"lowmem-nablagfn: {note}", file=sys.stderr)


def truncate_metrics(path: Path, last_epoch: Optional[int]) -> None:
    """Keep the lines of epochs <= ``last_epoch`` (all gone for a fresh start, ``None``)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            epoch = json.loads(line).get("epoch")
        except ValueError:
            continue  # a line cut by a kill
        if last_epoch is not None and isinstance(epoch, (int, float)) and math.isfinite(epoch) and epoch <= last_epoch:
            keep.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))
