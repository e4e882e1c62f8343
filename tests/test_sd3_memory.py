"""Memory of an SD 3.x run (issue #26): ``lowmem-nablagfn profile`` on tiny-sd3 counts what the run holds —
the transformer, VAE, flow and reward models and the cached prompt table that stands for the text
encoders — and ``benchmarks/sd3_cpu_memory.py --smoke`` measures every phase of every variant next to the
planner's CPU prediction."""
import json
import sys
from pathlib import Path

import pytest

from lowmem_nablagfn import cli
from lowmem_nablagfn import loop as L
from lowmem_nablagfn.models.family import run_prompts

from helpers import SMALL

SD3 = ["pretrained.model=tiny-sd3", "sampling.scheduler=flow-sde"]
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """The prompt-embedding and planner caches in the test's directory (nothing written to the home)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOWMEM_NABLAGFN_CACHE", str(tmp_path / "cache"))


def storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_profile_counts_the_models_and_the_prompt_table(tmp_path, caches, monkeypatch, capsys):
    """The real CLI on tiny-sd3, recording from the first round (no warm-up: no gradients, optimiser state
    or held samples yet): the live total it starts from is the four models' weights plus the prompt
    table, whose size is the arithmetic of its shape — N prompts x (77 + 256 tokens x 96 + 80 pooled)
    fp32, and the CFG row."""
    built = {}
    setup = L.setup

    def keep(cfg, *args, **kwargs):
        built["c"] = c = setup(cfg, *args, **kwargs)
        models = [m for m in (c.parts.denoiser, c.parts.vae, c.flow_model, c.reward_model) if m is not None]
        built["models"] = storage_bytes([t for m in models for t in [*m.parameters(), *m.buffers()]])
        return c

    monkeypatch.setattr(L, "setup", keep)
    out = tmp_path / "profile.json"
    assert cli.main(["profile", "--preset", "tiny_cpu", *SD3, *SMALL, "training.on_policy=true", "--updates", "1",
                     "--warmup", "0", "--json", str(out), "--no-results", f"logging.output_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    for name in ("encode", "sampling", "final_reward", "reward_grad_next", "train", "optimizer"):
        assert f"| {name} |" in printed, name
    c = built["c"]
    assert c.parts.text_encoders == [] and c.parts.prompt_table is not None
    n, width, pooled = len(run_prompts(c.cfg.prompts.set)), c.parts.prompt_embed_dim, 80  # tiny-sd3: 32 + 48
    table = (n + 1) * (77 + 256) * width * 4 + (n + 1) * pooled * 4  # + 1: the CFG row
    result = json.loads(out.read_text())
    assert result["summary"]["start_gib"] * 2**30 == built["models"] + table
    assert result["phases"]["encode"]["peak_gib"] * 2**30 >= built["models"] + table


def test_sd3_cpu_memory_benchmark_smoke(tmp_path, caches, monkeypatch):
    """``benchmarks/sd3_cpu_memory.py --smoke``: the SD 3.5 CPU benchmark's code path on tiny-sd3, and the
    planner's CPU prediction equal to the live-bytes measurement in every phase of every variant (the
    official schedule, the sd35m_rtx4090 settings, those without transformer checkpointing, no-flow with
    offloaded trajectories: a no-op on the CPU).  The training pass alone may be over by the gradient
    bytes (the trace accumulates into existing gradients; a fresh update creates them)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import sd3_cpu_memory

    results = tmp_path / "RESULTS.md"
    out = sd3_cpu_memory.main(["--smoke", "--results", str(results)])
    assert set(out) == set(sd3_cpu_memory.VARIANTS)
    assert "SD 3.5 Medium shapes on the CPU: measured vs planner" in results.read_text()
    assert "checkpointing: vae, reward" in out["nockpt"]["memory"] and "unet" in out["preset"]["memory"]
    for name, r in out.items():
        assert set(r["measured"]) <= set(r["predicted"]), name
        for phase, measured in r["measured"].items():
            predicted, slack = r["predicted"][phase], max(0.01 * measured, 2 / 1024)
            # tiny-sd3: a phase is MiB; 1 % or 2 MiB (the 1- and 2-row traces' interpolation)
            top = measured * 1.3 if phase == "train" else measured + slack
            assert measured - slack <= predicted <= top, (name, phase, measured, predicted)
    sys.modules.pop("sd3_cpu_memory", None)
    sys.modules.pop("sdxl_cpu_memory", None)
