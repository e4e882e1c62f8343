"""Checkpoints that survive what a GPU cluster does to them (issue 23): a resume from an older
checkpoint never deletes the fresh one, a power loss never leaves nothing intact, the resumed sample
buffer lives where the memory plan puts it, and a SLURM one-GPU-per-task job resumes a torchrun
checkpoint.

One 3-epoch run (checkpoints of epochs 0, 1 and 2 kept) is copied by each test that changes it.
"""
import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SMALL

from lowmem_nablagfn import checkpoint as ckpt
from lowmem_nablagfn import cli
from lowmem_nablagfn import trainer as T
from lowmem_nablagfn.config import load_config, validate
from lowmem_nablagfn.memory.plan import Placement

RUN = ["train", "--preset", "tiny_cpu", "--quiet", *SMALL]


def _train(out, name: str, *extra) -> tuple:
    """``lowmem-nablagfn train`` in-process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(RUN + [f"logging.output_dir={out}", f"logging.run_name={name}", *extra])
    return code, err.getvalue()


def _names(run: Path) -> list:
    return [p.name for p in ckpt.checkpoints(run)]


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> Path:
    """A finished 3-epoch run with ``logging.keep_checkpoints=3``: epoch-000000 … epoch-000002."""
    out = tmp_path_factory.mktemp("runs")
    code, err = _train(out, "x", "training.num_epochs=3", "logging.keep_checkpoints=3")
    assert code == 0, err
    assert _names(out / "x") == ["epoch-000000", "epoch-000001", "epoch-000002"]
    return out / "x"


@pytest.fixture
def run_copy(three_epochs, tmp_path) -> Path:
    shutil.copytree(three_epochs, tmp_path / "x")
    return tmp_path / "x"


# ----------------------------------------------------------------------------- resume from an older one

def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside_and_keeps_the_fresh_one(run_copy):
    run = run_copy
    branch = (run / "metrics.jsonl").read_text()
    code, err = _train(run.parent, "x", "training.num_epochs=2", "logging.keep_checkpoints=1",
                       "--resume", str(run / "checkpoints" / "epoch-000000"))
    assert code == 0, err
    assert _names(run) == ["epoch-000001"]  # the fresh one: pruning kept it, not the abandoned epoch-000002
    assert ckpt.verify(run / "checkpoints" / "epoch-000001") is None
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-000001"
    aside = run / "checkpoints" / ckpt.ABANDONED_DIR
    assert sorted(p.name for p in aside.iterdir()) == ["epoch-000001", "epoch-000002", "metrics.jsonl"]
    assert all(ckpt.verify(p) is None for p in aside.iterdir() if p.is_dir())  # moved, not deleted
    assert (aside / "metrics.jsonl").read_text() == branch  # the abandoned branch's curve is kept too
    lines = [line for line in err.splitlines() if "epoch-000002" in line]
    assert len(lines) == 1 and "epoch-000001, epoch-000002" in lines[0] and str(aside) in lines[0], err
    # a later --resume continues this branch, not the abandoned one
    cfg = validate(load_config("tiny_cpu", [*SMALL, f"logging.output_dir={run.parent}", "logging.run_name=x"]))
    assert ckpt.decide_start(cfg, "auto").checkpoint.name == "epoch-000001"


def test_setting_aside_twice_loses_nothing(run_copy):
    """A second resume from an older checkpoint finds its names taken in abandoned/: both are kept."""
    cfg = validate(load_config("tiny_cpu", [*SMALL, f"logging.output_dir={run_copy.parent}", "logging.run_name=x"]))
    for _ in range(2):
        ckpt.start_run(ckpt.decide_start(cfg, str(run_copy / "checkpoints" / "epoch-000000")), cfg)
        shutil.copytree(run_copy / "checkpoints" / "epoch-000000", run_copy / "checkpoints" / "epoch-000001")
    aside = sorted(p.name for p in (run_copy / "checkpoints" / ckpt.ABANDONED_DIR).iterdir())
    assert aside == ["epoch-000001", "epoch-000001.1", "epoch-000002", "metrics.jsonl", "metrics.jsonl.1"]


def test_resume_compares_paths_resolved(run_copy, monkeypatch):
    """An absolute --resume with a relative logging.output_dir: ``latest`` names the resumed checkpoint."""
    monkeypatch.chdir(run_copy.parent)
    cfg = validate(load_config("tiny_cpu", [*SMALL, "logging.output_dir=.", "logging.run_name=x"]))
    plan = ckpt.decide_start(cfg, str(run_copy / "checkpoints" / "epoch-000000"))
    ckpt.start_run(plan, cfg)
    assert (run_copy / "checkpoints" / "latest").read_text().strip() == "epoch-000000"


def test_prune_keeps_the_checkpoint_just_written_and_anything_newer(tmp_path):
    from lowmem_nablagfn.checkpoint.saving import prune

    root = tmp_path / "checkpoints"
    for epoch in (1, 2, 3, 4):
        (root / f"epoch-{epoch:06d}").mkdir(parents=True)
    prune(root, keep=2, written=root / "epoch-000003")
    assert _names(tmp_path) == ["epoch-000002", "epoch-000003", "epoch-000004"]
    prune(root, keep=1, written=root / "epoch-000002")
    assert _names(tmp_path) == ["epoch-000002", "epoch-000003", "epoch-000004"]


# ----------------------------------------------------------------------------- durability

def test_save_flushes_files_then_renames_then_flushes_the_parent_then_prunes(run_copy, monkeypatch):
    """After a power loss the new checkpoint is whole before the old ones' deletion is durable."""
    events = []
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(src, dst, *a, **k):
        events.append(("rename", Path(src), Path(dst)))
        real_rename(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        events.append(("rmtree", Path(path)))
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    code, err = _train(run_copy.parent, "x", "training.num_epochs=4", "logging.keep_checkpoints=1", "--resume")
    assert code == 0, err
    root = run_copy.resolve() / "checkpoints"
    final = root / "epoch-000003"
    at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final)
    tmp = events[at][1]
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    must = {tmp / p.relative_to(final) for p in final.rglob("*")} | {tmp}
    assert must - synced_before == set(), "not flushed before the rename"
    parent_synced = next(i for i, e in enumerate(events) if i > at and e == ("fsync", root))
    pruned = [i for i, e in enumerate(events) if e[0] == "rmtree" and e[1].parent == root]
    assert len(pruned) == 3 and at < parent_synced < min(pruned)
    assert _names(run_copy) == ["epoch-000003"]


# ----------------------------------------------------------------------------- the resumed sample buffer

def test_resumed_buffer_is_placed_as_a_fresh_epochs_buffer(run_copy, monkeypatch):
    """``memory.offload_trajectories``: the restored buffer goes through the plan's ``park`` (host
    memory, pinned under CUDA) like every freshly sampled one, not straight to the device."""
    parked, first_buffer = [], []
    real_park, real_run_epoch = Placement.park, T.run_epoch

    def park(self, traj, *args, **kwargs):
        out = real_park(self, traj, *args, **kwargs)
        parked.append((out, self.offload_trajectories))
        return out

    def run_epoch(c, epoch, buffer):
        first_buffer.append(buffer)
        return real_run_epoch(c, epoch, buffer)

    monkeypatch.setattr(Placement, "park", park)
    monkeypatch.setattr(T, "run_epoch", run_epoch)
    code, err = _train(run_copy.parent, "x", "training.num_epochs=4", "logging.keep_checkpoints=3",
                       "memory.offload_trajectories=true", "--resume")
    assert code == 0, err
    assert "memory.offload_trajectories: False -> True" in err
    assert first_buffer[0] is not None
    assert any(out is first_buffer[0] and offload for out, offload in parked), "the restored buffer was not parked"


# ----------------------------------------------------------------------------- CUDA RNG state

class _Generator:
    """Stands for one GPU's default CUDA generator (its state: a ByteTensor)."""

    def __init__(self, seed: int):
        self.state = torch.tensor([seed] * 16, dtype=torch.uint8)

    def get_state(self):
        return self.state.clone()

    def set_state(self, state):
        self.state = state.clone()


@pytest.fixture
def fake_cuda(monkeypatch):
    """``fake_cuda(n, current)``: torch.cuda with ``n`` visible GPUs, this process on ``current``.

    torch's own get/set_rng_state(_all) run against them: an index past the visible GPUs fails as it
    does on the hardware (``torch.cuda.default_generators[i]``: IndexError)."""
    import torch.cuda.random as cuda_random

    def install(n: int, current: int = 0):
        gens = tuple(_Generator(10 * i + 1) for i in range(n))
        for mod in (torch.cuda, cuda_random):
            monkeypatch.setattr(mod, "current_device", lambda: current)
            monkeypatch.setattr(mod, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "default_generators", gens)
        monkeypatch.setattr(cuda_random, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda_random, "_lazy_init", lambda: None)
        monkeypatch.setattr(cuda_random, "_lazy_call", lambda cb, **k: cb())
        return gens

    return install


def test_cuda_rng_of_a_torchrun_checkpoint_restores_on_one_visible_gpu(fake_cuda):
    """Saved by rank 3 of torchrun on 8 GPUs (cuda:3), resumed by a SLURM task that sees one GPU."""
    gens = fake_cuda(8, current=3)
    saved = ckpt.rng_state()
    used = gens[3].get_state()
    gens = fake_cuda(1, current=0)
    ckpt.set_rng_state(saved)
    assert torch.equal(gens[0].get_state(), used)


def test_cuda_rng_of_an_older_checkpoint_with_every_gpus_state_is_tolerated(fake_cuda):
    gens = fake_cuda(8, current=3)
    saved = ckpt.rng_state()
    saved["cuda"] = torch.cuda.get_rng_state_all()  # what versions before issue 23 wrote
    gens = fake_cuda(1, current=0)
    ckpt.set_rng_state(saved)  # no IndexError
    assert torch.equal(gens[0].get_state(), saved["cuda"][0])
    gens = fake_cuda(8, current=3)  # the same shape of job: this rank's own entry
    ckpt.set_rng_state(saved)
    assert torch.equal(gens[3].get_state(), saved["cuda"][3])
