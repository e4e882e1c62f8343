"""``lowmem-nablagfn doctor``: the table on this CPU machine (GPU checks skipped, exit 0), a failing
check (exit 1), fake GPUs through a patched ``torch.cuda`` (a V100 warns that bf16 is unsupported),
the preset's planner verdict, and missing optional packages (a warning with the install command)."""
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from lowmem_nablagfn import cli, doctor
from lowmem_nablagfn.config import load_config

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's table")
GPU_CHECKS = ("CUDA", "GPUs", "NCCL", "Triton kernel", "8-bit AdamW", "SDPA backends")


def _rows(out):
    """{name: (status, rest of the line)} of the printed table."""
    rows = {}
    for line in out.splitlines():
        status = line[:4].strip()
        if status in (doctor.OK, doctor.WARN, doctor.FAIL, doctor.SKIP):
            for name in [*GPU_CHECKS, "torch", "dependencies", "xformers", "DeepSpeed", "disk", "planner",
                         "model files", "reward files", "GPU 0", "GPU 1"]:
                if line[6:].startswith(name + " "):
                    rows[name] = (status, line[6:])
    return rows


@needs_no_cuda
def test_cpu_machine_table_skips_the_gpu_checks_and_exits_zero(capsys, tmp_path):
    rc = cli.main(["doctor", f"logging.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rc == 0, out
    for name in GPU_CHECKS:
        status, line = rows[name]
        assert status in (doctor.SKIP, doctor.WARN) and doctor.NO_CUDA in line, line
    assert rows["torch"][0] == doctor.OK and rows["dependencies"][0] == doctor.OK
    assert rows["disk"][0] in (doctor.OK, doctor.WARN) and str(tmp_path) in rows["disk"][1]
    assert "nothing fails" in out


def test_a_failing_check_exits_one_and_the_others_still_run(monkeypatch, capsys, tmp_path):
    def broken(cfg):
        raise RuntimeError("Triton compilation failed")

    monkeypatch.setattr(doctor, "CHECKS", (doctor.check_disk, broken, doctor.check_torch))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=int(0.2 * doctor.GiB)))
    rc = cli.main(["doctor", f"logging.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rc == 1
    assert rows["disk"][0] == doctor.FAIL and "0.2 GiB free" in rows["disk"][1] and "logging.output_dir=" in out
    assert "fail  broken" in out and "RuntimeError: Triton compilation failed" in out
    assert rows["torch"][0] == doctor.OK  # after the crash


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices as torch.cuda reports them: an A100 80 GB (sm80) and a V100 16 GB (sm70)."""
    cards = [("NVIDIA A100-SXM4-80GB", (8, 0), 79.2), ("Tesla V100-SXM2-16GB", (7, 0), 15.8)]
    c = torch.cuda
    monkeypatch.setattr(c, "is_available", lambda: True)
    monkeypatch.setattr(c, "device_count", lambda: len(cards))
    monkeypatch.setattr(c, "get_device_name", lambda i=0: cards[i][0])
    monkeypatch.setattr(c, "get_device_capability", lambda i=0: cards[i][1])
    monkeypatch.setattr(c, "get_device_properties",
                        lambda i=0: SimpleNamespace(total_memory=int(cards[i][2] * doctor.GiB)))
    monkeypatch.setattr(c, "get_arch_list", lambda: ["sm_70", "sm_80", "sm_90"])
    return cards


def test_each_gpu_is_listed_and_a_v100_warns_that_bf16_is_unsupported(fake_gpus):
    rows = doctor.check_gpus(load_config("tiny_cpu"))
    assert [r.name for r in rows] == ["GPU 0", "GPU 1"]
    a100, v100 = rows
    assert a100.status == doctor.OK
    assert a100.detail == "NVIDIA A100-SXM4-80GB, sm80, 79.2 GiB, bf16 yes"
    assert v100.status == doctor.WARN
    assert v100.detail.startswith("Tesla V100-SXM2-16GB, sm70, 15.8 GiB, bf16 no") and "unsupported" in v100.detail
    assert v100.fix == "training.mixed_precision=fp16"


def test_a_card_newer_than_the_torch_build_fails(fake_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_86"])
    a100, v100 = doctor.check_gpus(load_config("tiny_cpu"))
    assert a100.status == doctor.OK  # sm_80 cubins
    assert v100.status == doctor.FAIL and "no kernels for sm70" in v100.detail
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "compute_70"])  # PTX runs on newer cards
    assert [r.status for r in doctor.check_gpus(load_config("tiny_cpu"))] == [doctor.OK, doctor.WARN]


def test_preset_runs_the_planner_verdict(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(doctor, "CHECKS", ())  # only the preset's rows
    rc = cli.main(["doctor", "--preset", "tiny_cpu", f"logging.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rc == 0, out
    assert rows["planner"][0] == doctor.OK and "predicted peak" in rows["planner"][1] and "GiB" in rows["planner"][1]
    assert rows["model files"][0] == doctor.OK and rows["reward files"][0] == doctor.OK


@needs_no_cuda
def test_gpu_preset_on_the_cpu_names_the_cards_it_fits():
    """sd15_v100 (fp16, 16 GB): without a card, the planner's verdict for each card class."""
    (row,) = doctor.check_plan(load_config("sd15_v100"))
    assert row.status == doctor.SKIP and doctor.NO_CUDA in row.detail and "V100-16" in row.detail
    # bf16 on a V100 has no fused attention (the math kernel, not shipped): not a fit, and no crash
    (row,) = doctor.check_plan(load_config("sd15_rtx4090"))
    assert row.status == doctor.SKIP and "RTX4090-24" in row.detail and "V100" not in row.detail


def test_missing_optional_packages_warn_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails, as when not installed
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    cfg = load_config("tiny_cpu")
    xf = next(r for r in doctor.check_attention(cfg) if r.name == "xformers")
    assert xf.status == doctor.WARN and "pip install 'lowmem-nablagfn[xformers]'" in xf.fix
    (ds,) = doctor.check_deepspeed(cfg)
    assert ds.status == doctor.WARN and ds.fix == "pip install 'lowmem-nablagfn[deepspeed]'"
    # a configuration that needs them: fail
    (ds,) = doctor.check_deepspeed(load_config("tiny_cpu", ["distributed.backend=deepspeed"]))
    assert ds.status == doctor.FAIL and "distributed.backend=deepspeed" in ds.detail
    xf = next(r for r in doctor.check_attention(load_config("tiny_cpu", ["memory.attention=xformers"]))
              if r.name == "xformers")
    assert xf.status == doctor.FAIL


def test_package_problems_name_the_requirement():
    assert doctor.package_problem("no-such-package-xyz>=1") == ("not installed", "")
    problem, version = doctor.package_problem("torch>=99")
    assert problem == f"{version} installed, torch>=99 needed"
    assert doctor.package_problem("torch>=2.4")[0] is None
    reqs = doctor.declared_requirements()
    assert reqs["torch"].startswith("torch>=") and reqs["deepspeed[deepspeed]"].startswith("deepspeed>=")
