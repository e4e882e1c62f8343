"""The live-bytes tracker, phase marks, and ``lowmem-nablagfn profile`` on the tiny preset."""
import json
import time

import pytest
import torch

from lowmem_nablagfn import cli, memtrack
from lowmem_nablagfn.memtrack import LiveBytes

from helpers import SMALL


def test_live_bytes_counts_storages_once_and_frees():
    with LiveBytes() as mem:
        a = torch.zeros(1000)                  # 4000 bytes
        view = a[10:]                          # a view: same storage
        a.add_(1)                              # in place: same storage
        b = a * 2                              # 4000 more
        assert mem.current == 8000 and mem.peak == 8000
        del b
        assert mem.current == 4000 and mem.peak == 8000
        mem.reset_peak()
        assert mem.peak == 4000
    assert view.shape == (990,)


def test_live_bytes_sees_autograd_grad_and_frozen_modules():
    """What torch's MemTracker cannot do: torch.autograd.grad through frozen modules."""
    lin = torch.nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(32, 64, requires_grad=True)
    with LiveBytes() as mem:
        y = torch.tanh(lin(x)).sum()
        saved = mem.current                     # activations kept for the backward
        (g,) = torch.autograd.grad(y, x)
        assert saved >= 32 * 64 * 4 and mem.peak >= saved + g.numel() * 4
    assert g.shape == x.shape


def test_live_bytes_new_only_skips_views_of_existing_tensors():
    """``new_only``: views of storages made before the block (a weight's ``t()``) are not counted
    unless registered; what the block creates is, and registered storages stay counted."""
    w = torch.randn(256, 256)
    x = torch.randn(4, 256)
    with LiveBytes() as every:
        wt = w.t()
    assert every.current == w.numel() * 4  # the default counts the weight through its view
    with LiveBytes(new_only=True) as new:
        wt = w.t()
        y = x @ wt
        assert new.current == y.numel() * 4
    with LiveBytes(new_only=True) as reg:
        reg.register([w])
        wt = w.t()
        assert reg.current == w.numel() * 4
    del wt


def test_live_bytes_same_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        x = torch.randn(8, 3, 16, 16, requires_grad=True)
        w = torch.randn(4, 3, 3, 3)
        y = torch.nn.functional.conv2d(x, w, padding=1).relu().mean()
        torch.autograd.grad(y, x)

    with LiveBytes() as real:
        run()
    with FakeTensorMode(), LiveBytes() as fake:
        run()
    assert real.peak == fake.peak > 0


def test_phase_is_a_no_op_without_a_recorder():
    assert not memtrack.recording_active()
    with memtrack.phase("anything"):
        memtrack.count("anything", 3)


def test_nested_phases_fold_inner_peaks_into_outer():
    with memtrack.recording(torch.device("cpu")) as rec:
        with memtrack.phase("outer"):
            keep = torch.zeros(1000)
            with memtrack.phase("inner"):
                tmp = torch.zeros(2000)
                del tmp
            after = torch.zeros(10)
    inner, outer = rec.phases["inner"], rec.phases["outer"]
    assert inner.peak_bytes == 12000 and outer.peak_bytes == 12000
    assert outer.calls == inner.calls == 1 and outer.seconds >= inner.seconds
    assert keep.numel() + after.numel() == 1010


def test_profile_cli_tiny(tmp_path, capsys):
    """The real CLI on the tiny preset: per-phase table, JSON, results section, profiler trace."""
    out, results = tmp_path / "profile.json", tmp_path / "RESULTS.md"
    t0 = time.perf_counter()
    rc = cli.main(["profile", "--preset", "tiny_cpu", "--updates", "1", "--json", str(out),
                   "--results", str(results), "--trace", str(tmp_path / "trace"),
                   *SMALL, f"logging.output_dir={tmp_path}"])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    phases = data["phases"]
    for name in ("encode", "sampling", "final_reward", "reward_grad_next", "reward_grad_cur", "reference",
                 "train", "optimizer"):
        assert phases[name]["calls"] >= 1 and phases[name]["peak_gib"] > 0, name
        assert f"| {name} |" in printed
    s = data["summary"]
    assert s["images_per_s"] > 0 and s["transitions_per_s"] > 0 and s["s_per_update"] > 0
    # 2 trajectories x (K + 1 = 3) transitions per update, every update of the round (one epoch)
    assert s["updates_per_round"] >= 1 and phases["train"]["items"] == 6 * s["updates_per_round"]
    # the update's peak is in a training pass, above what sampling needs
    assert max(phases[n]["peak_gib"] for n in ("reward_grad_next", "train")) >= phases["sampling"]["peak_gib"]
    assert "## Profile: tiny_cpu" in results.read_text()
    assert (tmp_path / "trace" / "trace.json").stat().st_size > 0
    print(f"profile of the tiny preset took {elapsed:.1f} s")  # ~20 s of CPU time: < 60 s on 2 free cores


def test_offload_text_encoder_encodes_the_same(tmp_path):
    """memory.offload_text_encoder: the encoder lives on the CPU between encodings; same embeddings."""
    from lowmem_nablagfn import loop as T

    from helpers import small_config

    c = T.setup(small_config(tmp_path, "memory.offload_text_encoder=true"))
    prompts = ["a cat", "a dog"]
    with memtrack.recording(torch.device("cpu")) as rec:
        offloaded = T.encode(c, prompts)
    assert rec.phases["encode"].calls == 1
    assert next(c.parts.text_encoder.parameters()).device.type == "cpu"
    c.cfg.memory.offload_text_encoder = False
    assert torch.equal(offloaded, T.encode(c, prompts))


@pytest.mark.gpu
def test_profile_on_cuda_uses_allocator_peaks(tmp_path):
    from lowmem_nablagfn import profiler

    from helpers import small_config

    result = profiler.run_profile(small_config(tmp_path, "device=cuda"), updates=1)
    assert result["summary"]["memory_source"] == "torch.cuda.max_memory_allocated"
    assert result["phases"]["train"]["peak_gib"] > result["phases"]["optimizer"]["peak_gib"] > 0
