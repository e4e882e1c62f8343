"""Trustworthy runs: resume never destroys work, divergence never overwrites good weights, bad input
is refused before any model is built (issue 13).

One interrupted run (Ctrl-C during epoch 2, after epoch 1's checkpoint) and its resume, with the
latest checkpoint damaged and a stale temporary directory planted, serve most tests; refusals run
the CLI in-process (they stop before any model is built).
"""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SMALL

from lowmem_nablagfn import checkpoint as ckpt
from lowmem_nablagfn import cli
from lowmem_nablagfn import loop as L
from lowmem_nablagfn.config import ConfigError, load_config, to_dict, validate

REPO = Path(__file__).resolve().parent.parent
RUN = ["train", "--preset", "tiny_cpu", "--quiet", *SMALL, "logging.keep_checkpoints=3"]


def _train_args(out: Path, name: str, *extra) -> list:
    return RUN + [f"logging.output_dir={out}", f"logging.run_name={name}", *extra]


def _cfg(out: Path, name: str, *extra):
    return validate(load_config("tiny_cpu", [*SMALL, "logging.keep_checkpoints=3", f"logging.output_dir={out}",
                                             f"logging.run_name={name}", *extra]))


def _epochs(run: Path) -> list:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 3-epoch run stopped by Ctrl-C while sampling epoch 2 (checkpoints of epochs 0 and 1 exist)."""
    out = tmp_path_factory.mktemp("runs")
    real = L.sample_epoch

    def sample_then_interrupt(c, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(c, epoch)

    old_mask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(L, "sample_epoch", sample_then_interrupt)
            import contextlib
            import io

            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = cli.main(_train_args(out, "cut", "training.num_epochs=3"))
    finally:
        os.umask(old_mask)
    return out, code, err.getvalue()


@pytest.fixture(scope="module")
def resumed(interrupted, tmp_path_factory):
    """A copy of the interrupted run, its latest checkpoint truncated and a stale .tmp-* planted, resumed
    with one more epoch (a harmless change)."""
    out = tmp_path_factory.mktemp("resumed")
    shutil.copytree(interrupted[0] / "cut", out / "cut")
    run = out / "cut"
    state = run / "checkpoints" / "epoch-000001" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a kill during the write
    (run / "checkpoints" / ".tmp-epoch-000007-stale").mkdir()
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(_train_args(out, "cut", "training.num_epochs=4", "--resume"))
    return run, code, err.getvalue()


# ----------------------------------------------------------------------------- interrupt, files

def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(interrupted):
    out, code, err = interrupted
    assert code == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted after epoch 1 (latest checkpoint: epoch-000001)" in lines[0]
    assert "--resume" in lines[0] and "logging.run_name=cut" in lines[0]


def test_checkpoint_has_manifest_and_loads_without_pickle(interrupted):
    ckpt_dir = interrupted[0] / "cut" / "checkpoints" / "epoch-000001"
    assert ckpt.verify(ckpt_dir) is None
    manifest = ckpt.read_manifest(ckpt_dir)
    assert {ckpt.LORA_FILE, ckpt.STATE_FILE, "flow_model/diffusion_pytorch_model.safetensors"} <= manifest["files"].keys()
    assert manifest["epoch"] == 1 and manifest["world_size"] == 1
    state = torch.load(ckpt_dir / ckpt.STATE_FILE, weights_only=True)  # no arbitrary code
    assert state["epoch"] == 1 and state["sync"]["optimizer"]["state"] and state["buffer"]["latents"].numel()


def test_run_files_have_the_usual_permissions(interrupted):
    run = interrupted[0] / "cut"
    for p in [run, *run.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


# ----------------------------------------------------------------------------- resume

def test_resume_skips_a_damaged_latest_checkpoint_and_says_so(resumed):
    run, code, err = resumed
    assert code == 0, err
    assert "epoch-000001 is damaged" in err and "resuming from epoch-000000" in err
    assert "changed since the checkpoint: training.num_epochs: 3 -> 4" in err
    assert (run / "checkpoints" / ckpt.DAMAGED_DIR / "epoch-000001").is_dir()  # set aside, not deleted
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-000003"
    assert [p.name for p in ckpt.checkpoints(run)] == ["epoch-000001", "epoch-000002", "epoch-000003"]
    assert all(ckpt.verify(p) is None for p in ckpt.checkpoints(run))


def test_resume_removes_stale_temporaries_and_duplicate_metrics(resumed):
    run = resumed[0]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert _epochs(run) == [-1, 0, 1, 2, 3]  # epoch 1 redone once, not logged twice


def test_fresh_start_over_checkpoints_is_refused_and_writes_nothing(interrupted, capsys):
    out = interrupted[0]
    before = _snapshot(out / "cut")
    assert cli.main(_train_args(out, "cut", "model.lora.rank=8")) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert "logging.run_name" in err and "Traceback" not in err
    assert _snapshot(out / "cut") == before


def test_resume_with_nothing_to_resume_is_an_error_and_writes_nothing(tmp_path, capsys):
    # --resume never swallows the override after it
    assert cli.main(["train", "--resume", f"logging.output_dir={tmp_path}", "logging.run_name=never"]) == 2
    assert "has no checkpoint to resume from" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_resume_with_changed_training_config_is_refused_with_the_differences(interrupted, capsys):
    out = interrupted[0]
    before = _snapshot(out / "cut")
    # --resume PATH then overrides, an option after them
    code = cli.main(["train", "--resume", str(out / "cut"), *SMALL, f"logging.output_dir={out}", "logging.run_name=cut",
                     "logging.keep_checkpoints=3", "model.lora.rank=8", "training.batch_size=4", "--preset", "tiny_cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "model.lora.rank: 4 -> 8" in err and "training.batch_size: 2 -> 4" in err
    assert _snapshot(out / "cut") == before  # config.json not rewritten


def test_config_comparison_sorts_changes_into_refused_and_allowed():
    from lowmem_nablagfn.checkpoint import compare_configs
    from lowmem_nablagfn.config import load_config, to_dict

    saved = to_dict(load_config("tiny_cpu", []))
    now = to_dict(load_config("tiny_cpu", ["training.num_epochs=40", "memory.checkpoint_unet=true",
                                           "logging.save_every=3", "memory.transition_dtype=bf16",
                                           "model.reward_scale=1e4"]))
    refused, allowed = compare_configs(saved, now)
    assert sorted(line.split(":")[0] for line in refused) == ["memory.transition_dtype", "model.reward_scale"]
    assert sorted(line.split(":")[0] for line in allowed) == ["logging.save_every", "memory.checkpoint_unet",
                                                              "training.num_epochs"]


def test_overwrite_starts_afresh(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / "epoch-000005").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 5}\n')
    (run / "config.json").write_text(json.dumps(to_dict(_cfg(tmp_path, "r"))))  # the run marker (overwrite's licence)
    with pytest.raises(ckpt.RunError, match="--overwrite"):
        ckpt.decide_start(_cfg(tmp_path, "r"))
    plan = ckpt.decide_start(_cfg(tmp_path, "r", "logging.overwrite=true"))
    ckpt.start_run(plan, _cfg(tmp_path, "r", "logging.overwrite=true"))
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert (run / "config.json").is_file()


def test_another_world_size_is_refused_before_setup(interrupted):
    with pytest.raises(ckpt.RunError, match="written by 1 process"):
        ckpt.decide_start(_cfg(interrupted[0], "cut"), "auto", world_size=2)


# ----------------------------------------------------------------------------- non-finite

def test_nonfinite_update_is_skipped_and_leaves_weights_and_optimizer_untouched(tmp_path, capsys):
    c = L.setup(_cfg(tmp_path, "nan", "training.max_nonfinite_updates=2"))
    before = [p.detach().clone() for p in c.lora_params]
    for p in c.lora_params:
        p.grad = torch.full_like(p, float("nan"))
    assert L.guarded_step(c, 0, 0, []) == {}
    assert all(torch.equal(a, p) for a, p in zip(before, c.lora_params))
    assert not c.optimizer.state and all(p.grad is None for p in c.lora_params)
    assert "epoch 0, update 0: non-finite gradient of lora; update skipped (1/2" in capsys.readouterr().err
    assert c.optimizer_steps == 0  # a skipped update is not an optimiser step (metrics' optimizer_steps)
    L.guarded_step(c, 0, 1, [])  # finite (no) gradients: a normal step resets the count
    assert c.nonfinite_streak == 0 and c.optimizer_steps == 1
    L.guarded_step(c, 0, 2, ["loss/forward"])
    with pytest.raises(ckpt.NonFiniteError, match="Likely causes"):
        L.guarded_step(c, 0, 3, ["loss/forward"])
    for p in c.lora_params:  # and a non-finite weight is never written
        p.data[0] = float("inf")
    with pytest.raises(ckpt.NonFiniteError):
        ckpt.save_lora(c.parts.unet, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("overrides", [["model.reward_scale=1e30"],  # inf loss from the first update
                                       ["training.learning_rate=1e10", "training.max_nonfinite_updates=1"]])
def test_diverging_run_stops_with_nonzero_exit_and_finite_files(overrides, tmp_path, capsys):
    code = cli.main(_train_args(tmp_path, "div", *overrides, "training.num_epochs=4"))
    err = capsys.readouterr().err
    assert code == 1 and "Likely causes" in err and "Traceback" not in err, err
    assert "non-finite" in err and "update skipped" in err
    run = tmp_path / "div"
    assert not (run / "lora").exists()
    from safetensors.torch import load_file

    for f in run.rglob("*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values()), f
    for f in run.rglob(ckpt.STATE_FILE):
        state = torch.load(f, weights_only=True)
        assert all(torch.isfinite(v).all() for g in state["sync"]["optimizer"]["state"].values()
                   for v in g.values() if torch.is_tensor(v) and v.is_floating_point()), f


def test_inf_and_nan_are_refused_by_validation():
    with pytest.raises(ConfigError) as exc:
        validate(load_config("tiny_cpu", ["model.reward_scale=inf", "training.max_grad_norm=nan",
                                          "training.max_nonfinite_updates=0"]))
    for key in ("model.reward_scale=inf", "training.max_grad_norm=nan", "training.max_nonfinite_updates=0"):
        assert key in str(exc.value)


# ----------------------------------------------------------------------------- preflight, CLI

def test_preflight_reports_every_problem_before_any_model(tmp_path, capsys, monkeypatch):
    import lowmem_nablagfn.models as models

    monkeypatch.setattr(models, "load_sd", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty.txt").write_text("\n \n")
    args = ["train", f"logging.output_dir={tmp_path / 'file'}", f"prompts.set={tmp_path / 'empty.txt'}",
            "reward.name=aesthetic", f"reward.checkpoint={tmp_path / 'head.pth'}", "reward.backbone=nobody/no-clip",
            "pretrained.model=nobody/no-sd", "training.num_epochs=0", "--preset", "tiny_cpu"]
    if not torch.cuda.is_available():
        args.append("device=cuda")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert "training.num_epochs=0 must be a positive integer" in err  # bad values and files together
    assert any("is a file, not a directory" in line for line in lines)
    assert any("holds no prompts" in line for line in lines)
    assert any("head.pth: no such file" in line for line in lines)
    assert any("reward.backbone=nobody/no-clip is not in the local hub cache" in line for line in lines)
    assert any("pretrained.model='nobody/no-sd' is not in the local hub cache" in line for line in lines)
    assert torch.cuda.is_available() or any("no CUDA device is visible" in line for line in lines)


def test_plan_and_export_refuse_bad_destinations(tmp_path, capsys):
    assert cli.main(["plan", "--vram", "banana"]) == 2
    assert "cannot read a memory size from 'banana'" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "f" / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err


def test_options_and_overrides_in_any_order(capsys):
    assert cli.main(["config", "training.num_epochs=2", "--preset", "tiny_cpu", "logging.run_name=zz"]) == 0
    out = capsys.readouterr().out
    assert "num_epochs: 2" in out and "run_name: zz" in out


def test_closed_pipe_ends_quietly():
    proc = subprocess.run(f"'{sys.executable}' -m lowmem_nablagfn.cli help-config | head -n 1", shell=True,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- launchers

def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_deepspeed_launcher_forwards_environment_hostfile_and_ssh_check(tmp_path):
    bin_dir, launch = tmp_path / "bin", tmp_path / "launch"
    bin_dir.mkdir()
    launch.mkdir()
    _stub(bin_dir / "deepspeed", 'echo "ARGS $*"; cat "$DS_ENV_FILE"\n')
    shutil.copy(REPO / "launch" / "deepspeed_multinode.sh", launch)
    shutil.copy(REPO / "launch" / "hostfile.example", launch / "hostfile")
    env = dict(os.environ, DEEPSPEED=str(bin_dir / "deepspeed"), HF_HUB_OFFLINE="1", HF_HOME="/data/hf",
               OMP_NUM_THREADS="3", GLOO_SOCKET_IFNAME="ib0")  # gloo: the CPU half of a CUDA job's group
    env.pop("HOSTFILE", None)
    proc = subprocess.run(["bash", str(launch / "deepspeed_multinode.sh"), "--no_ssh_check",
                           "--preset", "sd15_a100x8", "training.num_epochs=2"],
                          env=env, cwd=bin_dir, capture_output=True, text=True, timeout=60)  # another cwd
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()[0]
    assert f"--hostfile {launch / 'hostfile'}" in args and "--master_addr a100-node-01" in args
    launcher, trainer = args.split("lowmem_nablagfn.cli")
    assert "--no_ssh_check" in launcher and trainer == " train --preset sd15_a100x8 training.num_epochs=2"
    for line in ("HF_HUB_OFFLINE=1", "HF_HOME=/data/hf", "OMP_NUM_THREADS=3", "GLOO_SOCKET_IFNAME=ib0"):
        assert line in proc.stdout.splitlines(), proc.stdout


def test_slurm_script_survives_a_long_host_list(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", 'for i in $(seq 1 20000); do echo "node-$i"; done\n')
    _stub(bin_dir / "srun", 'echo "SRUN $*"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[1-20000]",
               SLURM_NNODES="2", SLURM_JOB_ID="7")
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--preset", "sd15_a100x8"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--rdzv_endpoint=node-1:29500" in proc.stdout and proc.stdout.rstrip().endswith("--preset sd15_a100x8")


@pytest.mark.distributed
def test_zero2_skip_leaves_weights_and_the_next_update_as_ddp(tmp_path, monkeypatch, capsys):
    """A skipped update under DeepSpeed ZeRO-2 (one process) reduces nothing into the next one."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)
    results = []
    for backend in ("ddp", "deepspeed"):
        c = L.setup(_cfg(tmp_path, backend, f"distributed.backend={backend}"))
        data = L.sample_epoch(c, 0)
        before = [p.detach().clone() for p in c.lora_params]
        for p in c.lora_params:
            p.grad = torch.full_like(p, float("nan"))
        assert L.guarded_step(c, 0, 0, []) == {}
        assert all(torch.equal(a, p) for a, p in zip(before, c.lora_params)), backend
        L.train_epoch(c, data, 0)
        results.append([p.detach() - a for a, p in zip(before, c.lora_params)])
        c.sync.close()
    # a step taken with zero gradients on the skip would shrink the next Adam update by about a quarter
    # (bias correction); NaN reduced into the partitions would make it NaN. What remains is rounding
    # (measured 2.6e-5 of a 2e-2 update here; 0 in a fresh single-threaded process)
    size = max(float(u.abs().max()) for u in results[0])
    diff = max(float((a - b).abs().max()) for a, b in zip(*results))
    assert size > 1e-3 and diff < 0.01 * size, (diff, size)
