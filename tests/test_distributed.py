"""Multi-process training on CPU (gloo): DDP-style averaging and DeepSpeed ZeRO-2 against one process,
ZeRO-2 / DDP resume, clear errors, launch files.

Two launches serve every ``distributed`` test (tests/dist_worker.py): one plain process (the
reference, batch 2b) and ``torchrun --nproc_per_node=2`` (batch b on each rank, same data split in
halves; then whole / cut / resumed ``train()`` runs).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_nablagfn import distributed as dist
from lowmem_nablagfn.config import ConfigError, load_config, validate

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed "
                                     "(pip install 'lowmem-nablagfn[deepspeed]')")


def _run(cmd, out: Path, name: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the one-process reference and the two-process job once for the whole module."""
    out = tmp_path_factory.mktemp("dist")
    single = "ddp,zero2-offload" if HAVE_DEEPSPEED else "ddp"
    pair = "ddp,zero2" if HAVE_DEEPSPEED else "ddp"
    _run([sys.executable, str(WORKER), "equivalence", str(out), single], out, "one-process")
    # --standalone: torchrun picks a free port for its rendezvous (parallel CI jobs do not collide)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
          "all", str(out), pair], out, "two-processes")
    return out


def _update(out: Path, setting: str, backend: str, world: int, group: str) -> torch.Tensor:
    r = torch.load(out / f"equiv-{setting}-{backend}-{world}.pt")
    return torch.cat([(r["after"][k] - r["before"][k]).flatten() for k in sorted(r["after"])
                      if k.startswith(group)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# The tolerance against one process covers float32 re-association: batch 2b vs b changes the CPU
# kernels' summation order, and the ∇-DB residuals are differences of large scores (measured
# 1e-6 for LoRA, 1.4e-5 .. 4e-4 for the flow model).  A wrong average (a sum, one rank's half only)
# is off by ~1 in the "linear" setting.
def _check_against_one_process(runs, backend):
    for setting in ("linear", "clipped"):
        for group in ("lora", "flow"):
            ref = _update(runs, setting, "ddp", 1, group)
            assert ref.norm() > 1e-3, (setting, group)  # the update did something
            got = _update(runs, setting, backend, 2, group)
            assert _rel(got, ref) < 5e-3, (setting, group, _rel(got, ref))


@pytest.mark.distributed
def test_ddp_two_processes_match_one_process_with_twice_the_batch(runs):
    _check_against_one_process(runs, "ddp")


@pytest.mark.distributed
@needs_deepspeed
def test_zero2_two_processes_match_one_process_with_twice_the_batch(runs):
    _check_against_one_process(runs, "zero2")


@pytest.mark.distributed
@needs_deepspeed
def test_zero2_clips_and_averages_each_group_like_ddp(runs):
    """Same micro-batches on both sides: ZeRO-2's reduce-scatter + per-engine clipping equal the
    all-reduce + per-group clipping to rounding (both groups clipped in the "clipped" setting)."""
    for setting in ("linear", "clipped"):
        for group in ("lora", "flow"):
            ddp, zero = _update(runs, setting, "ddp", 2, group), _update(runs, setting, "zero2", 2, group)
            assert _rel(zero, ddp) < 1e-5, (setting, group, _rel(zero, ddp))


@pytest.mark.distributed
@needs_deepspeed
def test_zero2_offload_single_process_matches_plain_adamw(runs):
    for setting in ("linear", "clipped"):
        for group in ("lora", "flow"):
            ref = _update(runs, setting, "ddp", 1, group)
            assert _rel(_update(runs, setting, "zero2-offload", 1, group), ref) < 1e-5, (setting, group)


def _final_state(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    lora = load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))
    ckpt = sorted((run_dir / "checkpoints").glob("epoch-*"))[-1]
    flow = load_file(str(ckpt / "flow_model" / "diffusion_pytorch_model.safetensors"))
    return {**{f"lora.{k}": v for k, v in lora.items()}, **{f"flow.{k}": v for k, v in flow.items()}}


def _check_resume(runs, backend):
    whole, cut = _final_state(runs / f"whole-{backend}"), _final_state(runs / f"cut-{backend}")
    assert whole.keys() == cut.keys()
    for k in whole:
        assert torch.allclose(whole[k], cut[k], atol=1e-6), k


@pytest.mark.distributed
@needs_deepspeed
def test_zero2_resume_ends_where_uninterrupted_run_ends(runs):
    _check_resume(runs, "zero2")
    ckpt = runs / "cut-zero2" / "checkpoints" / "epoch-000000"
    for group in ("lora", "flow"):
        parts = sorted(p.name for p in (ckpt / "shards" / "deepspeed" / group).glob("zero_pp_rank_*"))
        assert len(parts) == 2, parts  # each rank wrote its own optimiser partition
    assert not list((runs / "cut-zero2" / "checkpoints").glob(".tmp-*"))


@pytest.mark.distributed
def test_ddp_two_process_resume_ends_where_uninterrupted_run_ends(runs):
    _check_resume(runs, "ddp")
    shards = runs / "cut-ddp" / "checkpoints" / "epoch-000000" / "shards"
    assert sorted(p.name for p in shards.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]


@pytest.mark.distributed
def test_resume_with_another_process_count_is_refused_before_setup(runs, tmp_path):
    from helpers import small_config

    from lowmem_nablagfn.checkpoint import RunError, decide_start

    with pytest.raises(RunError, match="written by 2 process"):  # nothing built: decide_start reads the manifest
        decide_start(small_config(tmp_path), str(runs / "cut-ddp" / "checkpoints" / "epoch-000001"), world_size=1)


# ----------------------------------------------------------------------------- cheap checks

@pytest.mark.parametrize("overrides, message", [
    (["distributed.backend=deepspeed", "distributed.zero_stage=3"], "stage 3 would partition the LoRA"),
    (["distributed.backend=deepspeed", "distributed.zero_stage=0"], "Stage 0 is plain gradient averaging"),
    (["distributed.offload_optimizer=true"], "needs distributed.backend=deepspeed"),
])
def test_unsupported_combinations_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config("tiny_cpu", overrides))


def test_accelerate_deepspeed_launch_must_agree_with_the_config(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(RuntimeError, match="distributed.backend=deepspeed"):
        dist.check_launcher(load_config("tiny_cpu").distributed)
    dist.check_launcher(load_config("tiny_cpu", ["distributed.backend=deepspeed"]).distributed)


def test_deepspeed_config_sizes_buckets_to_the_group_and_offloads_on_request():
    cfg = dist.deepspeed_config(2, True, 1.0, micro_batch=2, num_params=800_000, world=8)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == 800_000
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_batch_size"] == 16
    assert "offload_optimizer" not in dist.deepspeed_config(2, False, 1.0, 2, 10, 1)["zero_optimization"]


def test_launch_scripts_are_valid_and_pass_arguments_through():
    launch = REPO / "launch"
    for name in ("single_gpu.sh", "torchrun_single_node.sh", "deepspeed_multinode.sh", "slurm.sbatch"):
        script = launch / name
        assert os.access(script, os.X_OK), name
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert "lowmem_nablagfn.cli train" in text and '"$@"' in text, name
    assert (launch / "hostfile.example").is_file() and (launch / "README.md").is_file()


def test_accelerate_configs_load():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(REPO / "launch" / "accelerate_ddp.yaml"))
    zero = load_config_from_file(str(REPO / "launch" / "accelerate_deepspeed_zero2.yaml"))
    assert str(ddp.distributed_type).endswith("MULTI_GPU")
    assert str(zero.distributed_type).endswith("DEEPSPEED") and zero.deepspeed_config["zero_stage"] == 2
