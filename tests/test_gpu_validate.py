"""``benchmarks/gpu_validate.py --smoke``: every section of the GPU validation runs on the tiny model
on the CPU, so that the command cannot rot between GPU runs."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_validate")
    mp = pytest.MonkeyPatch()
    mp.setenv("LOWMEM_NABLAGFN_CACHE", str(tmp / "cache"))
    mp.syspath_prepend(str(BENCH))
    import gpu_validate

    # a generous budget: a loaded CI machine must not turn measurements into "skipped"
    out = gpu_validate.main(["--smoke", "--budget-s", "1200", "--json", str(tmp / "v.json"),
                             "--results", str(tmp / "RESULTS.md")])
    mp.undo()
    sys.modules.pop("gpu_validate", None)
    return tmp, out


def test_smoke_writes_json_and_results(smoke):
    tmp, out = smoke
    assert json.loads((tmp / "v.json").read_text())["smoke"] is True
    text = (tmp / "RESULTS.md").read_text()
    assert "GPU validation (smoke)" in text and "vs official" in text and "Targets:" in text


def test_smoke_runs_the_gpu_test_selection(smoke):
    _, out = smoke
    assert out["tests"]["ok"], out["tests"]
    assert "-m gpu" in out["tests"]["command"]


def test_smoke_measures_official_and_planned_configurations(smoke):
    _, out = smoke
    rows = out["memory"]
    targets = {r["target"] for r in rows}
    assert len(targets) == 2  # smoke: residual and no-flow at train batch 4 (one per objective)
    for target in targets:
        official = next(r for r in rows if r["target"] == target and r["variant"] == "official")
        assert official["time_vs_official"] == pytest.approx(1.0)
        # CPU: the planner's prediction is the live-bytes trace of the same passes
        assert official["predicted_peak_gib"] == pytest.approx(official["peak_gib"], rel=0.15)
        planned = [r for r in rows if r["target"] == target and r["variant"] != "official"]
        assert planned and all("peak_gib" in r or "skipped" in r or "same_as" in r for r in planned)
    measured = [r for r in rows if r["variant"] != "official" and "peak_gib" in r]
    assert measured and all(r["time_vs_official"] > 0 and r["s_per_update"] > 0 for r in measured)
    # a configuration planned for a smaller card than the official schedule needs holds less
    for r in measured:
        official = next(o for o in rows if o["target"] == r["target"] and o["variant"] == "official")
        assert r["predicted_peak_gib"] < official["predicted_peak_gib"]
    assert out["verdict"] and all("PASS" in v or "FAIL" in v or "not measured" in v for v in out["verdict"])


def test_smoke_times_subsampling_and_rewards(smoke):
    _, out = smoke
    assert {"loop", "reference"} <= set(out["subsample"]["methods"])
    assert out["subsample"]["copy_gb_s"] > 0
    assert [r["reward"] for r in out["rewards"]] == ["builtin:redness", "aesthetic"]
    assert all(r["s"] > 0 for r in out["rewards"])


def test_docstring_says_how_to_install_the_wheels():
    doc = (BENCH / "gpu_validate.py").read_text()
    assert "gpu-wheels.sh" in doc and "--no-index" in doc and "PYTHONPATH=/tmp/site" in doc
