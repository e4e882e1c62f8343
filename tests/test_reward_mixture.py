"""Weighted reward mixtures (``reward.name=mix``, ``reward.mix={a: w_a, b: w_b}``, docs/rewards.md#mixtures):
the score and its pixel gradient are the weighted sums of the components'; validation, resume, the planner
and the real CLI know every component; each is logged and plotted."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from lowmem_nablagfn import cli
from lowmem_nablagfn.config import ConfigError, load_config, validate
from lowmem_nablagfn.memtrack import GiB
from lowmem_nablagfn.rewards import build_reward
from lowmem_nablagfn.rewards.mixture import (CheckpointedMixtureReward, MixtureReward, component_config, components,
                                             grad_shares)

from helpers import small_config
from test_planner import _check_phases, _compare, _report, reduced_model  # noqa: F401 - a fixture

BUILTIN_MIX = "reward.mix={builtin:redness: 1.0, builtin:saturation: 0.5}"
LEARNED_MIX = "reward.mix={aesthetic: 1.0, pickscore: 0.5}"
PROMPTS = ["a photo of a cat", "a painting of a dog"]


def mixture_config(mix: str, *overrides):
    return load_config("tiny_cpu", ["reward.name=mix", mix, *overrides]).reward


@pytest.mark.parametrize("mix,extra", [(BUILTIN_MIX, []), (LEARNED_MIX, ["reward.checkpoint=random:reduced"])],
                         ids=["builtin", "aesthetic+pickscore_reduced"])
def test_score_and_gradient_are_the_weighted_sums_of_the_components(mix, extra):
    """Against each component built on its own (as ``reward.name=<component>``): Σ w R and Σ w ∇R."""
    cfg = mixture_config(mix, *extra)
    mixture = build_reward(cfg)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    score = mixture(x, PROMPTS)
    (grad,) = torch.autograd.grad(score.sum(), x)
    want, want_grad = torch.zeros(2), torch.zeros_like(x)
    for name, weight, sub in components(cfg):
        alone = build_reward(sub)
        xi = x.detach().clone().requires_grad_(True)
        r = alone(xi, PROMPTS)
        (g,) = torch.autograd.grad(r.sum(), xi)
        want, want_grad = want + weight * r.detach(), want_grad + weight * g
        label = name.split(":")[-1]
        torch.testing.assert_close(mixture.last_scores[label], r.detach())
        assert g.abs().sum() > 0  # each component steers
    torch.testing.assert_close(score.detach(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(want, components(cfg)[0][1] * mixture.last_scores[mixture.labels[0]])  # both count


def test_components_are_submodules_with_the_memory_knobs_applied():
    """Weights, dtype and checkpointing reach every packaged component; weight-free ones get none of it."""
    cfg = mixture_config("reward.mix={aesthetic: 1.0, pickscore: 0.5, builtin:redness: 2.0}",
                         "reward.checkpoint=random:reduced", "reward.weight_dtype=bf16")
    mixture = build_reward(cfg)
    assert isinstance(mixture, CheckpointedMixtureReward) and len(mixture.parts) == 3
    aesthetic, pickscore, redness = mixture.parts
    assert aesthetic.weight_dtype == pickscore.weight_dtype == torch.bfloat16
    total = sum(p.numel() for p in mixture.parameters())
    assert total == sum(p.numel() for p in aesthetic.parameters()) + sum(p.numel() for p in pickscore.parameters())
    mixture.set_checkpointing(True)
    for part in (aesthetic, pickscore):
        assert all(b._reward_unit["checkpoint"] for b in part.blocks())
    mixture.set_checkpointing(False)
    assert not any(b._reward_unit["checkpoint"] for b in aesthetic.blocks())
    assert mixture.prompt_free is False  # PickScore reads the prompt
    plain = build_reward(mixture_config(BUILTIN_MIX))
    assert type(plain) is MixtureReward and not hasattr(plain, "set_checkpointing")  # nothing to checkpoint
    assert plain.prompt_free


def test_gradient_shares_equal_the_hand_derived_ones():
    """Redness mean(r - (g + b)/2) and brightness mean(.299 r + .587 g + .114 b) have constant pixel
    gradients: over n images of HW pixels, ‖w ∇R‖ = w · sqrt(n · Σc² / HW), whatever the images."""
    cfg = mixture_config("reward.mix={builtin:redness: 2.0, builtin:brightness: 0.5}")
    mixture = build_reward(cfg)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sq = mixture.gradient_sq_norms(x, ["p"] * 3)
    hw = 16 * 16
    assert sq["redness"] == pytest.approx(4.0 * 3 * 1.5 / hw, rel=1e-5)
    assert sq["brightness"] == pytest.approx(0.25 * 3 * (.299 ** 2 + .587 ** 2 + .114 ** 2) / hw, rel=1e-5)
    shares = grad_shares(sq)
    red = 2.0 * math.sqrt(1.5)
    bright = 0.5 * math.sqrt(.299 ** 2 + .587 ** 2 + .114 ** 2)
    assert shares["reward/redness/grad_share"] == pytest.approx(red / (red + bright), rel=1e-5)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert grad_shares({"a": 0.0, "b": 0.0}) == {}  # no gradient: no share is defined, none is logged


def test_log_of_the_final_rewards():
    mixture = build_reward(mixture_config(BUILTIN_MIX))
    a, b = torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        mixture(a, ["p"] * 2)
        mixture.log_last()
        mixture(torch.rand(4, 3, 8, 8), ["p"] * 4)  # a training-time call: not filed
        mixture(b, ["p"] * 3)
        mixture.log_last()
    log = mixture.pop_log()
    assert set(log) == {"redness", "saturation"} and log["redness"].shape == (5,)
    want = build_reward(component_config(mixture_config(BUILTIN_MIX), "builtin:redness"))(torch.cat([a, b]), ["p"] * 5)
    torch.testing.assert_close(log["redness"], want)
    assert mixture.pop_log() == {}


CUSTOM = '''
from torch import nn


class Green(nn.Module):
    def forward(self, images, prompts):
        return images[:, 1].flatten(1).mean(1)


def build():
    return Green()
'''


def _problems(*overrides):
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny_cpu", list(overrides)))
    return [line for line in str(err.value).splitlines()[1:]]


@pytest.mark.parametrize("overrides,needle", [
    (["reward.name=mix", "reward.mix={builtin:redness: 1.0, nope: 0.5}"], "unknown reward 'nope'"),
    (["reward.name=mix", "reward.mix={builtin:redness: 1.0, builtin:saturation: 0}"], "give a finite weight > 0"),
    (["reward.name=mix", "reward.mix={builtin:redness: 1.0, builtin:saturation: -1}"], "give a finite weight > 0"),
    (["reward.name=mix", "reward.mix={builtin:redness: 1.0, builtin:saturation: .inf}"], "give a finite weight > 0"),
    (["reward.name=mix", "reward.mix={builtin:redness: 1.0}"],
     "has one component; train it as reward.name=builtin:redness"),
    (["reward.name=mix"], "reward.name=mix needs its components"),
    ([BUILTIN_MIX], "set reward.name=mix"),
    (["reward.name=mix", LEARNED_MIX, "reward.backbone=/models/clip"], "reward.backbones.<name>=DIR"),
    (["reward.name=mix", LEARNED_MIX, "reward.checkpoints.clipscore=/x"], "names no component of reward.mix"),
    (["reward.name=mix", LEARNED_MIX, "reward.checkpoints.pickscore=/x"], "reward.backbones.pickscore=DIR"),
    (["reward.name=mix", BUILTIN_MIX, "reward.antialias=true"], "no component of reward.mix resizes"),
    (["reward.name=mix", LEARNED_MIX, "reward.max_length=20"], "imagereward, which is not in reward.mix"),
])
def test_bad_mixtures_are_one_line_each(overrides, needle):
    problems = _problems(*overrides)
    assert len(problems) == 1 and needle in problems[0], problems


def test_a_reward_named_twice_is_refused(tmp_path, monkeypatch):
    (tmp_path / "green.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.chdir(tmp_path)
    problems = _problems("reward.name=mix", f"reward.mix={{green.py:build: 1.0, {tmp_path}/green.py:build: 2.0}}")
    assert len(problems) == 1 and "the same reward; give each reward once" in problems[0], problems
    with pytest.raises(ConfigError, match="a key appears twice"):  # the literal twice: YAML's duplicate key
        load_config("tiny_cpu", ["reward.name=mix", "reward.mix={aesthetic: 1.0, aesthetic: 2.0}"])
    # a custom component is tried like a custom reward, and is then a component like any other
    cfg = validate(load_config("tiny_cpu", ["reward.name=mix", "reward.mix={green.py:build: 1.0, builtin:redness: 1}"]))
    assert build_reward(cfg.reward).labels == ["green.build", "redness"]


def test_a_bad_mixture_stops_the_cli_before_any_model_is_built(tmp_path, capsys):
    code = cli.main(["train", "--preset", "tiny_cpu", f"logging.output_dir={tmp_path}", "reward.name=mix",
                     "reward.mix={builtin:redness: 1.0, builtin:saturation: 0}"])
    assert code == 2 and "the weight of builtin:saturation is 0.0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_mixture_given_whole_replaces_the_presets():
    cfg = load_config("tiny_cpu", ["reward.name=mix", LEARNED_MIX, BUILTIN_MIX, "reward.mix.builtin:redness=3"])
    assert cfg.reward.mix == {"builtin:redness": 3.0, "builtin:saturation": 0.5}


def test_resume_refuses_a_changed_mixture():
    from lowmem_nablagfn.checkpoint import compare_configs
    from lowmem_nablagfn.config import to_dict

    def refused(*overrides):
        saved = to_dict(load_config("tiny_cpu", ["reward.name=mix", LEARNED_MIX]))
        return compare_configs(saved, to_dict(load_config("tiny_cpu", ["reward.name=mix", *overrides])))[0]

    assert refused(LEARNED_MIX) == []
    assert refused("reward.mix={aesthetic: 1.0, pickscore: 0.25}") == \
        ["reward.mix: {'aesthetic': 1.0, 'pickscore': 0.5} -> {'aesthetic': 1.0, 'pickscore': 0.25}"]
    assert [r.split(":")[0] for r in refused("reward.mix={aesthetic: 1.0, pickscore: 0.5, hpsv2: 1}")] == ["reward.mix"]
    assert [r.split(":")[0] for r in refused("reward.mix={aesthetic: 1.0}")] == ["reward.mix"]  # dropped: refused too
    assert [r.split(":")[0] for r in refused(LEARNED_MIX, "reward.backbones.pickscore=/x")] == ["reward.backbones"]


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """``lowmem-nablagfn train --preset tiny_cpu reward.name=mix 'reward.mix={...}'`` (epochs -1 and 0, 4
    trajectories each)."""
    out = tmp_path_factory.mktemp("mix")
    args = ["train", "--preset", "tiny_cpu", "--quiet", f"logging.output_dir={out}", "training.num_epochs=1",
            "sampling.batch_size=4", "logging.sample_grid_seeds=0", "reward.name=mix", BUILTIN_MIX]
    assert cli.main(args) == 0
    return out / "tiny_cpu", args


def test_cli_trains_a_two_reward_mixture_and_logs_each_component(mixture_run):
    run, _ = mixture_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [-1, 0] and rows[-1]["optimizer_steps"] == 2
    for r in rows:  # the trained reward is the weighted sum, sample by sample, so also in the mean
        assert r["reward/mean"] == pytest.approx(r["reward/redness/mean"] + 0.5 * r["reward/saturation/mean"],
                                                 rel=1e-5, abs=1e-6)
        assert r["reward/redness/std"] > 0 and r["reward/saturation/std"] > 0
        shares = r["reward/redness/grad_share"], r["reward/saturation/grad_share"]
        assert sum(shares) == pytest.approx(1.0) and min(shares) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"reward/redness/mean", "reward/saturation/grad_share"} <= set(events.Tags()["scalars"])
    assert (run / "report" / "components.png").stat().st_size > 0
    assert (run / "report" / "grad_share.png").stat().st_size > 0
    assert "reward mix (builtin:redness × 1, builtin:saturation × 0.5)" in (run / "report.html").read_text()


def test_resuming_the_run_with_another_mixture_is_refused(mixture_run, capsys):
    _, args = mixture_run
    capsys.readouterr()
    changed = [a if a != BUILTIN_MIX else "reward.mix={builtin:redness: 1.0, builtin:saturation: 0.25}" for a in args]
    assert cli.main(changed + ["--resume", "training.num_epochs=2"]) == 2
    assert "reward.mix: {'builtin:redness': 1.0, 'builtin:saturation': 0.5} -> " in capsys.readouterr().err


def test_planner_traces_the_mixture_as_the_reward(tmp_path):
    """The arch key names every component (another mixture retraces, other weights do not); the weights are
    the sum of the components'; the prediction of the tiny model with an aesthetic + PickScore mixture runs."""
    from lowmem_nablagfn import planner

    base = ["reward.name=mix", "reward.checkpoint=random:reduced"]
    cfg = small_config(tmp_path, *base, LEARNED_MIX)
    profile = planner.Probes(cfg, cache=False)
    same = planner.build_meta(small_config(tmp_path, *base, "reward.mix={aesthetic: 2.0, pickscore: 1.0}"))
    other_cfg = small_config(tmp_path, *base, "reward.mix={aesthetic: 1.0, clipscore: 0.5}")
    assert planner.key_hash(planner.arch_key(other_cfg, planner.build_meta(other_cfg))) != profile.hash
    assert planner.key_hash(planner.arch_key(cfg, same)) == profile.hash
    alone = [planner.build_meta(small_config(tmp_path, f"reward.name={n}", "reward.checkpoint=random:reduced"))
             for n in ("aesthetic", "pickscore")]
    assert profile.static["reward"] == sum(planner.nbytes(m.reward) for m in alone)
    assert profile.static["reward_has_blocks"]
    pred = planner.predict(cfg, profile)
    assert pred.peak > 0 and pred.phases["reward_grad_next"] > 0


@pytest.mark.slow  # a profiled update of test_planner's reduced model: minutes on a loaded CPU
def test_prediction_matches_measured_peak_with_a_mixture(tmp_path, reduced_model):
    """test_planner's reduced model at 128 px with an aesthetic + PickScore mixture (reduced towers, reward
    checkpointing on): the planner's per-phase peaks against the profiler's, as for a single reward."""
    cfg = small_config(tmp_path, f"pretrained.model={reduced_model}", "sampling.resolution=128", "reward.name=mix",
                       LEARNED_MIX, "reward.checkpoint=random:reduced", "model.flow_block_widths=[32,64]",
                       "memory.checkpoint_vae=true", "memory.checkpoint_unet=true", "memory.checkpoint_reward=true",
                       "memory.input_grad_chunk=2", "memory.train_chunk=3")
    peak, pred, phases = _compare(cfg)
    _report("reduced, aesthetic + pickscore", peak, pred, phases)
    assert pred.peak / GiB == pytest.approx(peak, rel=0.15)
    _check_phases(pred, phases)


def test_a_missing_file_names_the_components_option():
    """Offline (conftest), PickScore's default hub folder is not cached: the error says which option to set."""
    from lowmem_nablagfn.rewards.loading import MissingCheckpointError

    with pytest.raises(MissingCheckpointError) as err:
        build_reward(mixture_config("reward.mix={builtin:redness: 1.0, pickscore: 0.5}"))
    assert str(err.value).startswith("reward.mix: pickscore: ") and "reward.backbones.pickscore=DIR" in str(err.value)
    assert "reward.backbone=" not in str(err.value)
