"""Files of a run directory: atomic writes with the usual permissions, the manifest (size and sha256 of
every file of a checkpoint), verification, and the list of a run's checkpoints (newest intact first)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

from .state import FORMAT, LORA_FILE, MANIFEST, STATE_FILE, TrainingState

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


def fsync_dir(directory: Path) -> None:
    """Make ``directory``'s entries (files created, renamed or removed in it) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some network and FUSE file systems cannot flush a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Every file below ``directory`` on disk, then every directory, deepest first, ``directory`` last:
    what a rename of ``directory`` publishes must be durable before the rename is."""
    paths = sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for p in paths:
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for p in [*paths, directory]:
        if p.is_dir() and not p.is_symlink():
            fsync_dir(p)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` (0644 under umask 022) and rename it; both
    the contents and the rename are durable on return."""
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
    fsync_dir(path.parent)


def set_aside(path: Path, into: Path, copy: bool = False) -> Path:
    """Move (``copy``: copy) ``path`` into directory ``into`` (made if needed) under its name, or
    ``NAME.1``, ``NAME.2`` … when that is taken — nothing there is replaced; returns where it went (durably)."""
    into.mkdir(parents=True, exist_ok=True)
    dest, n = into / path.name, 0
    while dest.exists():
        n += 1
        dest = into / f"{path.name}.{n}"
    if copy:
        shutil.copy2(path, dest)
        with open(dest, "rb") as f:
            os.fsync(f.fileno())
    else:
        os.rename(path, dest)
        fsync_dir(path.parent)
    fsync_dir(into)
    return dest


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


def epoch_of(path: Path) -> int:
    """The epoch of a checkpoint directory ``epoch-XXXXXX`` (-1 for any other name)."""
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoints(run_dir: Path) -> List[Path]:
    """``RUN/checkpoints/epoch-*`` directories, oldest first."""
    root = run_dir / "checkpoints"
    return sorted((p for p in root.glob("epoch-*") if p.is_dir() and epoch_of(p) >= 0), key=epoch_of) \
        if root.is_dir() else []


def newest_first(source: Path) -> List[Path]:
    """Checkpoints of run ``source``, newest first, the one ``latest`` names first of all."""
    found = list(reversed(checkpoints(source)))
    marker = source / "checkpoints" / "latest"
    if marker.is_file():
        named = source / "checkpoints" / marker.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest intact checkpoint of a run (``latest`` first), or None."""
    for cand in newest_first(run_dir):
        if verify(cand) is None:
            return cand
    return None
