"""Checkpoints and run directories: one module saves and loads a run's state, for one process or
many, and decides — before any model is built — whether a run may start, resume, or must stop.

A checkpoint ``RUN/checkpoints/epoch-XXXXXX/`` holds::

    pytorch_lora_weights.safetensors  the LoRA (diffusers format, loads with load_lora_weights)
    flow_model/                       the flow model (diffusers format, safetensors)
    training_state.pt                 TrainingState: optimiser, counters, sample buffer, RNG, config
    shards/rank-XXXXX.pt              several processes: each rank's sample buffer and RNG state
    shards/deepspeed/<group>/         DeepSpeed ZeRO: each rank's optimiser partitions
    manifest.json                     epoch, world size, resolved config, size + sha256 of each file

It is written into a temporary directory beside its final place, the manifest last, and renamed
when complete; ``latest`` (one line) is replaced atomically.  A checkpoint is *intact* when every
file of its manifest is there with its size and checksum; ``--resume`` uses the newest intact one
and says which damaged ones it skipped.  Nothing is unpickled: tensors are safetensors files or
``torch.load(weights_only=True)`` (the training state and the per-rank shards), the rest JSON.
DeepSpeed's partitions are read by DeepSpeed's own loader after their checksums matched.

:func:`plan_run` checks a start or resume without touching anything (world size, the checkpoint's
config against this one, damaged checkpoints); :func:`start_run` then tidies the run directory
(stale temporary files, damaged checkpoints set aside, ``metrics.jsonl`` cut back to the resumed
epoch) and writes ``config.json``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .distributed import SHARD_DIR

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"
FLOW_DIR = "flow_model"
FLOW_FILE = "diffusion_pytorch_model.safetensors"
RANK_FILE = "rank-{:05d}.pt"
DAMAGED_DIR = "damaged"
FORMAT = 1

#: Config keys whose change on resume does not alter what is trained (logged, allowed). Prefixes end
#: in ".". ``memory.*`` only moves memory around (checkpointing, chunking, offloading, kernels).
HARMLESS = ("training.num_epochs", "training.max_nonfinite_updates", "logging.", "memory.")
#: Exceptions to :data:`HARMLESS`: the storage precision of the kept transitions changes the numbers
#: the model trains on (bf16 storage: ~11 % error in the last transition's s_F).
NOT_HARMLESS = ("memory.transition_dtype",)
#: What a fresh start with ``logging.overwrite=true`` deletes from the run directory.
RUN_OUTPUTS = ("checkpoints", "lora", "samples", "tensorboard", "report", "report.html", "metrics.jsonl",
               "config.json", "eval")


class RunError(Exception):
    """A run cannot start or resume as asked (nothing was written); the message says what to do."""


class NonFiniteError(RuntimeError):
    """Non-finite values where weights or updates must be finite; the message names the likely causes."""


# ----------------------------------------------------------------------------- files

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``mkdtemp`` with the usual permissions (0755 under umask 022; mkdtemp alone gives 0700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~_umask())
    return path


def usual_modes(directory: Path) -> None:
    """0644 files / 0755 directories (under the umask) below ``directory``: some writers (safetensors,
    mkstemp, mkdtemp) create 0600 / 0700, which other users of a shared machine cannot read."""
    mask = _umask()
    for p in [directory, *directory.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` (0644 under umask 022) and rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(run_dir: Path) -> List[Path]:
    """Delete ``.tmp-*`` left by a process killed while writing (run directory and checkpoints/)."""
    gone = []
    for parent in (run_dir, run_dir / "checkpoints"):
        for p in parent.glob(".tmp-*") if parent.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


# ----------------------------------------------------------------------------- weights

def lora_state_dict(unet: nn.Module) -> dict:
    """The adapter's weights in diffusers' naming (what ``load_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def check_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensors of ``tensors`` holding inf or NaN."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"{what} holds non-finite values ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}); "
                             f"not written. {LIKELY_CAUSES}")


LIKELY_CAUSES = ("Likely causes: training.learning_rate / training.flow_learning_rate too high, "
                 "model.reward_scale too large for the reward's range, fp16 overflow "
                 "(training.mixed_precision=bf16 or no), or a reward that returns NaN/inf. "
                 "The checkpoints written so far hold finite weights: lower the value and continue with --resume.")


def save_lora(unet: nn.Module, directory: str | Path) -> None:
    """The LoRA in diffusers format (``pytorch_lora_weights.safetensors``); refuses non-finite weights."""
    from diffusers import StableDiffusionPipeline

    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    check_finite(state, "the LoRA")
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=state, safe_serialization=True)
    usual_modes(Path(directory))


def load_lora_into(unet: nn.Module, directory: Path) -> None:
    """Load a diffusers-format LoRA file into the UNet's existing adapter (for resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(directory / LORA_FILE))
    state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    try:
        incompatible = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state))
    except RuntimeError as exc:  # a shape mismatch lists every tensor: keep the first line
        raise RunError(f"checkpoint {directory}: its LoRA does not fit this model "
                       f"({str(exc).splitlines()[-1].strip()}); resume with the run's model.lora settings") from None
    missing = [k for k in getattr(incompatible, "missing_keys", []) if "lora_" in k]
    if missing:
        raise RunError(f"checkpoint {directory} lacks LoRA weights: {missing[:3]} …")


# ----------------------------------------------------------------------------- training state

def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(internal), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def buffer_state(traj) -> Optional[dict]:
    """A :class:`~lowmem_nablagfn.sampling.Trajectories` as tensors, strings and dicts (CPU)."""
    if traj is None:
        return None
    from .sampling import Trajectories

    out = {}
    for f in fields(Trajectories):
        v = getattr(traj, f.name)
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
        elif v is not None and not isinstance(v, list):  # a Conditioning (SDXL): its tensors
            v = {"conditioning": {g.name: None if getattr(v, g.name) is None else getattr(v, g.name).cpu()
                                  for g in fields(v)}}
        out[f.name] = v
    return out


def buffer_from_state(state: Optional[dict], device):
    if state is None:
        return None
    from . import sampling

    state = dict(state)
    for k, v in state.items():
        if isinstance(v, dict) and "conditioning" in v:
            state[k] = sampling.Conditioning(**v["conditioning"])
    return sampling.Trajectories(**state).to(device)


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs to continue bit for bit.

    Attributes:
        epoch: the last completed epoch (the resumed run starts at ``epoch + 1``).
        global_step: optimiser updates so far.
        config: the resolved configuration (``config.to_dict``).
        sync: the gradient synchroniser's state (``GradientSync.state_dict()``: the optimiser under
            ddp; empty under DeepSpeed, whose partitions are files of their own).
        buffer: this rank's lagged samples (:func:`buffer_state`), or None.
        rng: this rank's generator states (:func:`rng_state`).
        world_size: processes that wrote it (each rank's buffer and partitions are its own).
    """

    epoch: int
    global_step: int
    config: dict
    sync: dict = field(default_factory=dict)
    buffer: Optional[dict] = None
    rng: dict = field(default_factory=rng_state)
    world_size: int = 1

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- manifest

def write_manifest(directory: Path, state: TrainingState) -> None:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    manifest = {"format": FORMAT, "epoch": state.epoch, "global_step": state.global_step,
                "world_size": state.world_size, "config": state.config, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def verify(directory: Path) -> Optional[str]:
    """None when ``directory`` is an intact checkpoint; else what is wrong with it (one phrase)."""
    if not (directory / MANIFEST).is_file():
        return f"no {MANIFEST}: incomplete, or written by an older version"
    try:
        manifest = read_manifest(directory)
        files = manifest["files"]
    except (ValueError, KeyError, OSError) as exc:
        return f"unreadable {MANIFEST} ({exc.__class__.__name__})"
    for name in (LORA_FILE, STATE_FILE):
        if name not in files:
            return f"{name} missing from the manifest"
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, {meta['bytes']} written (truncated?)"
        if sha256(p) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


# ----------------------------------------------------------------------------- save / load (collective)

def _epoch_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoints(run_dir: Path) -> List[Path]:
    """``RUN/checkpoints/epoch-*`` directories, oldest first."""
    root = run_dir / "checkpoints"
    return sorted((p for p in root.glob("epoch-*") if p.is_dir() and _epoch_of(p) >= 0), key=_epoch_of) \
        if root.is_dir() else []


def save(run_dir: Path, unet: nn.Module, flow_model: Optional[nn.Module], state: TrainingState, sync,
         keep: int = 2) -> Path:
    """Write ``RUN/checkpoints/epoch-XXXXXX`` atomically and point ``latest`` at it.

    Collective: every rank calls it at the same epoch (decided from the epoch number).  Rank 0 makes
    the temporary directory; every rank writes its own part (its sample buffer and RNG state when
    several, its ZeRO partitions); after a barrier rank 0 writes the LoRA, the flow model, the
    training state and the manifest, renames the directory and prunes to the newest ``keep``.
    The run directory must be on a file system every node sees.  Non-finite weights are refused
    (on every rank, before anything is written).
    """
    check_finite({f"lora.{k}": v for k, v in lora_state_dict(unet).items()}, "the LoRA")
    if flow_model is not None:
        check_finite({f"flow_model.{k}": v for k, v in flow_model.state_dict().items()}, "the flow model")
    root = run_dir / "checkpoints"
    tmp = None
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        tmp = str(make_temp_dir(root, f".tmp-epoch-{state.epoch:06d}-"))
    tmp = Path(dist.broadcast_object(tmp))
    final = root / f"epoch-{state.epoch:06d}"
    try:
        if state.world_size > 1:
            (tmp / SHARD_DIR).mkdir(exist_ok=True)
            torch.save({"buffer": state.buffer, "rng": state.rng}, tmp / SHARD_DIR / RANK_FILE.format(dist.rank()))
        sync.save_shards(tmp / SHARD_DIR)
        dist.barrier()
        if dist.is_main():
            save_lora(unet, tmp)
            if flow_model is not None:
                flow_model.save_pretrained(str(tmp / FLOW_DIR), safe_serialization=True)
            main = state.as_dict()
            if state.world_size > 1:  # the buffer and RNG state are in each rank's shard
                main.update(buffer=None, rng={})
            torch.save(main, tmp / STATE_FILE)
            usual_modes(tmp)
            write_manifest(tmp, state)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            atomic_write_text(root / "latest", final.name + "\n")
            _prune(root, keep)
    except BaseException:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = checkpoints(root.parent)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load(checkpoint: Path, unet: nn.Module, flow_model: Optional[nn.Module], sync) -> TrainingState:
    """Every rank: LoRA, flow model, optimiser (through ``sync``: ZeRO reads this rank's partitions),
    this rank's sample buffer and RNG state (which is set).  ``checkpoint`` was verified by
    :func:`plan_run`."""
    from safetensors.torch import load_file

    raw = _load(checkpoint / STATE_FILE)
    state = TrainingState(**{f.name: raw[f.name] for f in fields(TrainingState) if f.name in raw})
    if state.world_size > 1:
        own = _load(checkpoint / SHARD_DIR / RANK_FILE.format(dist.rank()))
        state.buffer, state.rng = own["buffer"], own["rng"]
    load_lora_into(unet, checkpoint)
    if flow_model is not None:
        weights = load_file(str(checkpoint / FLOW_DIR / FLOW_FILE))
        try:
            flow_model.load_state_dict(weights)
        except RuntimeError as exc:
            raise RunError(f"checkpoint {checkpoint}: its flow model does not fit this one "
                           f"({str(exc).splitlines()[-1].strip()}); resume with the run's "
                           f"model.flow_block_widths") from None
    sync.load(state.sync, checkpoint)
    set_rng_state(state.rng)
    return state


# ----------------------------------------------------------------------------- start / resume

@dataclass
class RunPlan:
    """What :func:`plan_run` decided.

    Attributes:
        run_dir: where this run writes.
        checkpoint: the intact checkpoint to resume from, or None (a fresh start).
        epoch: that checkpoint's epoch (None for a fresh start).
        notes: what the user should know (harmless config changes, damaged checkpoints skipped).
        damaged: checkpoints of this run newer than ``checkpoint`` that failed verification.
        overwrite: delete the run's earlier outputs before starting.
    """

    run_dir: Path
    checkpoint: Optional[Path] = None
    epoch: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    damaged: List[Path] = field(default_factory=list)
    overwrite: bool = False


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
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


def _candidates(source: Path) -> List[Path]:
    """Checkpoints of run ``source``, newest first, the one ``latest`` names first of all."""
    found = list(reversed(checkpoints(source)))
    marker = source / "checkpoints" / "latest"
    if marker.is_file():
        named = source / "checkpoints" / marker.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def plan_run(cfg, resume: Optional[str] = None, world_size: Optional[int] = None) -> RunPlan:
    """Decide a start or resume of ``cfg``'s run without building or writing anything.

    Args:
        resume: None (a fresh start), ``"auto"`` (the run's newest intact checkpoint), or a path (a
            checkpoint directory or a run directory).
        world_size: processes of this job (default: the launcher's ``WORLD_SIZE``, else 1).

    Raises:
        RunError: nothing to resume; checkpoints present but no ``--resume`` (and no overwrite);
            no intact checkpoint; a config change that alters what is trained; another world size.
    """
    from .config import to_dict

    run_dir = Path(cfg.logging.output_dir) / cfg.logging.run_name
    world = world_size or env_world_size()
    overwrite = bool(getattr(cfg.logging, "overwrite", False))
    own = checkpoints(run_dir)
    if resume is None:
        if own and not overwrite:
            raise RunError(f"{run_dir} already holds checkpoints (newest: {own[-1].name}); continue that run "
                           f"with --resume, or start afresh under a new logging.run_name=NAME, or with "
                           f"--overwrite (logging.overwrite=true), which deletes its checkpoints and outputs")
        return RunPlan(run_dir, overwrite=overwrite)
    if overwrite:
        raise RunError("--resume and --overwrite (logging.overwrite=true) contradict each other; give one")
    path = run_dir if resume == "auto" else Path(resume).expanduser()
    if (path / "checkpoints").is_dir() or resume == "auto":
        candidates, source = _candidates(path), path
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
    return RunPlan(run_dir, chosen, int(manifest["epoch"]), notes, damaged if same_run else [])


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def start_run(plan: RunPlan, cfg) -> None:
    """Rank 0, after :func:`plan_run`: overwrite if asked, remove stale temporaries, set damaged
    checkpoints aside (``checkpoints/damaged/``), cut ``metrics.jsonl`` back to the resumed epoch,
    write ``config.json``, print the plan's notes."""
    from .config import to_dict

    if not _is_main_process():
        return
    run_dir = plan.run_dir
    if plan.overwrite:
        for name in RUN_OUTPUTS:
            p = run_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        plan.notes.append(f"logging.overwrite: deleted the earlier outputs of {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    for bad in plan.damaged:
        aside = run_dir / "checkpoints" / DAMAGED_DIR / bad.name
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(bad, aside)
        plan.notes.append(f"moved damaged {bad.name} to {aside}")
    if plan.checkpoint is not None and plan.checkpoint.parent == run_dir / "checkpoints":
        atomic_write_text(run_dir / "checkpoints" / "latest", plan.checkpoint.name + "\n")
    truncate_metrics(run_dir / "metrics.jsonl", plan.epoch)
    atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    for note in plan.notes:
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


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest intact checkpoint of a run (``latest`` first), or None."""
    for cand in _candidates(run_dir):
        if verify(cand) is None:
            return cand
    return None
