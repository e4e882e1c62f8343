"""``benchmarks/gpu_validate.py --part 3 --smoke``: the SD 3.5 section (benchmarks/gpu_sd3.py) on tiny-sd3 at
64 px on the CPU, registered as part 3 with its own default JSON; its time budget; and the reason it may
measure without T5 — the training phases hold the same bytes with T5's conditioning as with zeros."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these rounds are thousands of tiny ops, and two OpenMP threads on a shared
    2-core machine wait on each other (a round took 16 s with two threads under load, 0.9 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def part3(tmp_path_factory):
    """One smoke run of part 3 through gpu_validate's command line (default JSON: under the cache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _one_thread, which a module fixture runs before
    tmp = tmp_path_factory.mktemp("gpu_sd3")
    mp = pytest.MonkeyPatch()
    mp.setenv("LOWMEM_NABLAGFN_CACHE", str(tmp / "cache"))
    mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))  # the prompt cache: nothing written to the real home
    mp.syspath_prepend(str(BENCH))
    import gpu_validate

    try:  # a generous budget: a loaded CI machine must not turn measurements into "skipped"
        out = gpu_validate.main(["--smoke", "--part", "3", "--budget-s", "1200", "--results", str(tmp / "RESULTS.md")])
    finally:
        torch.set_num_threads(threads)
    yield tmp, out
    mp.undo()
    for name in ("gpu_validate", "gpu_sd3"):
        sys.modules.pop(name, None)


@pytest.fixture
def sd3_bench(part3, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_sd3

    return gpu_sd3


def test_part3_is_its_own_part_with_its_own_json(part3):
    tmp, out = part3
    assert out["parts"] == [3] and set(out["section_seconds"]) == {"sd3"}
    written = list((tmp / "cache" / "gpu_validate").glob("smoke-part3-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["sd3"] == json.loads(json.dumps(out["sd3"]))
    text = (tmp / "RESULTS.md").read_text()
    assert "GPU validation, part 3 (smoke)" in text and "| SD 3.5 target |" in text and "T5-XXL" in text


def test_smoke_measures_both_targets_without_t5(part3, sd3_bench):
    _, out = part3
    rows = out["sd3"]["targets"]
    assert [r["target"] for r in rows] == [t[0] for t in sd3_bench.SD3_TARGETS]
    for r, (_, overrides, _) in zip(rows, sd3_bench.SD3_TARGETS):
        assert "skipped" not in r, r
        assert r["overrides"] == overrides + ["pretrained.t5=false"]
        assert r["peak_gib"] > 0 and r["s_per_update"] > 0 and r["reserved_gib"] is None  # CPU: no allocator
        assert r["peak_gib"] == pytest.approx(max(r["phases_gib"].values()))
        assert r["conditioning"] == [77 + 256, 96]  # tiny-sd3: 77 CLIP + 256 T5 tokens, T5's width 96
        # CPU: the planner's prediction is the live-bytes trace of the same passes (or the row says why not)
        assert "prediction" in r or r["predicted_peak_gib"] == pytest.approx(r["peak_gib"], rel=0.15)
    residual, no_flow = rows
    assert "reward_grad_cur" in residual["phases_gib"] and "reward_grad_cur" not in no_flow["phases_gib"]
    assert no_flow["peak_gib"] < residual["peak_gib"]  # no flow model, input-gradient chunks of 1


def test_smoke_encodes_the_prompts_with_t5_once_to_the_same_shape(part3):
    _, out = part3
    t5 = out["sd3"]["t5_prompt_cache"]
    assert t5["prompts"] > 0 and t5["seconds"] > 0 and t5["peak_gib"] is None
    assert t5["conditioning"] == out["sd3"]["targets"][0]["conditioning"]
    assert "the same as without T5" in (part3[0] / "RESULTS.md").read_text()


def test_training_phases_hold_the_same_bytes_with_or_without_t5(part3, sd3_bench, tmp_path, monkeypatch):
    """Why part 3 may skip T5: its conditioning (T5's states, or zeros of the same shape) changes no
    phase's live bytes.  The residual target again with T5 on, against the smoke's row without it."""
    from lowmem_nablagfn import loop as T
    from lowmem_nablagfn.config import load_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    preset, extra = sd3_bench.SD3_SMOKE
    cfg = load_config(preset, [*extra, *sd3_bench.QUIET, f"logging.output_dir={tmp_path}", "pretrained.t5=true"])
    c = T.setup(cfg)
    assert c.parts.prompt_table.table.prompt_embeds.abs()[:, 77:].amax() > 0  # T5's states, not zeros
    with_t5 = sd3_bench.measure(c, cfg, 0)
    without = part3[1]["sd3"]["targets"][0]
    assert with_t5["phases_gib"] == without["phases_gib"]


def test_no_target_starts_that_would_overrun_the_budget(sd3_bench):
    """On the GPU: with 60 s left no target (about SD3_ESTIMATE_S each) and no T5 row starts; none of
    this touches a GPU."""
    res = sd3_bench.sd3(Path("unused"), sd3_bench.Budget(60.0), smoke=False)
    assert [r["target"] for r in res["targets"]] == [t[0] for t in sd3_bench.SD3_TARGETS]
    assert all(r["skipped"].startswith("time budget") for r in res["targets"])
    assert res["t5_prompt_cache"]["skipped"].startswith("time budget")
    assert "time budget" in sd3_bench.sd3_table(res)


def test_the_alarm_keeps_what_was_measured_and_starts_nothing_more(sd3_bench, monkeypatch, tmp_path):
    """A target stopped by the part's alarm says so; the next target and the T5 row do not start."""
    from lowmem_nablagfn import loop, planner

    def no_trace(*a, **k):
        raise planner.MissingProbe("transformer|r=1")

    def alarm(cfg, *a, **k):
        raise sd3_bench.OutOfTime("stopped at the part's time budget (240 s)")

    monkeypatch.setattr(planner, "predict", no_trace)
    monkeypatch.setattr(loop, "setup", alarm)
    res = sd3_bench.sd3(tmp_path, sd3_bench.Budget(1200.0), smoke=True)
    first, second = res["targets"]
    assert first["prediction"].startswith("no SD 3 trace") and first["skipped"].startswith("stopped")
    assert second["skipped"] == first["skipped"] and "predicted_peak_gib" not in second
    assert res["t5_prompt_cache"]["skipped"] == first["skipped"]
    assert "no SD 3 trace" in sd3_bench.sd3_table(res)
