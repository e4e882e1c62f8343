"""The reward-hacking monitor (``monitor.*``, issue #25 item 4): the detector on synthetic histories, the
configuration's refusals, a run built to hack (trained on redness, watched by blueness) through the real
CLI, resume, the report's figure, and the planner's bytes against a measured forward."""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import SMALL, small_config

from lowmem_nablagfn import cli
from lowmem_nablagfn import loop as L
from lowmem_nablagfn import monitor as M
from lowmem_nablagfn.config import load_config, to_dict

HACK = ["monitor.rewards=[builtin:blueness]", "monitor.every=1", "monitor.patience=2",
        "logging.sample_grid_seeds=0", "logging.tensorboard=false"]


def _history(trained, watched, diversity=None):
    rows = []
    for i, (t, w) in enumerate(zip(trained, watched)):
        row = {"epoch": i - 1, M.TRAINED: t, "monitor/pickscore": w}
        if diversity is not None:
            row[M.DIVERSITY] = diversity[i]
        rows.append(row)
    return rows


def _alarms_over(history, patience):
    """Every alarm of a run, evaluation by evaluation, as the monitor raises them."""
    return [a for i in range(1, len(history) + 1) for a in M.detect(history[:i], patience)]


# ----------------------------------------------------------------------------- the detector

def test_warns_when_a_watched_reward_falls_k_times_while_the_trained_one_rises():
    history = _history([0.1, 0.2, 0.15, 0.4], [21.0, 20.8, 20.5, 20.1])  # trained: a net rise, one dip
    alarms = M.detect(history, patience=3)
    assert [(a.epoch, a.key, a.watched, a.trained) for a in alarms] == \
        [(2, "monitor/pickscore", (21.0, 20.1), (0.1, 0.4))]
    assert alarms[0].line() == ("lowmem-nablagfn: warning: epoch 2: monitored pickscore fell for 3 evaluations in a "
                                "row (21 → 20.1) while the training reward rose (0.1 → 0.4): the policy may be "
                                "hacking the reward")


def test_no_warning_when_the_trained_reward_falls_too():
    assert M.detect(_history([0.4, 0.3, 0.2, 0.1], [21.0, 20.8, 20.5, 20.1]), patience=3) == []
    assert M.detect(_history([0.4, 0.5, 0.6, 0.4], [21.0, 20.8, 20.5, 20.1]), patience=3) == []  # no net rise


def test_no_warning_after_k_minus_one_falls():
    assert M.detect(_history([0.1, 0.2, 0.3, 0.4], [20.0, 21.0, 20.5, 20.1]), patience=3) == []  # rose once
    assert M.detect(_history([0.1, 0.2, 0.3], [21.0, 20.5, 20.1]), patience=3) == []  # too short
    assert M.detect(_history([0.1, 0.2, 0.3, 0.4], [21.0, 20.5, 20.5, 20.1]), patience=3) == []  # a tie is no fall


def test_one_warning_per_episode_and_diversity_is_watched():
    trained = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    watched = [9.0, 8.0, 7.0, 6.0, 6.5, 6.0, 5.0, 4.0]  # falls, rises once, falls again
    diversity = [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.7]
    alarms = _alarms_over(_history(trained, watched, diversity), patience=2)
    # epochs -1..6; the second pickscore episode goes on at epoch 6 without a second warning
    assert [(a.epoch, a.key) for a in alarms] == [(1, "monitor/pickscore"), (5, "monitor/pickscore"),
                                                   (6, "monitor/diversity")]
    assert "diversity fell for 2 evaluations" in alarms[-1].line()


def test_missing_or_nonfinite_values_raise_nothing():
    history = _history([0.1, 0.2, 0.3], [3.0, float("nan"), 1.0])
    assert M.detect(history, patience=2) == []
    history[1].pop("monitor/pickscore")
    assert M.detect(history, patience=2) == []


def test_evaluations_are_every_n_epochs_from_the_base_model():
    assert [e for e in range(-1, 10) if M.due(5, e)] == [-1, 4, 9]
    rows = [{"epoch": 0, "reward/mean": 1.0}, {"epoch": 1, M.TRAINED: 2.0, "monitor/x": 1.0, "time/monitor_s": 3.0}]
    assert M.history_of(rows) == [{"epoch": 1, M.TRAINED: 2.0, "monitor/x": 1.0}]


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("override, message", [
    ("monitor.rewards=[nope]", "monitor.rewards lists 'nope', an unknown reward"),
    ("monitor.rewards=[builtin:redness]", "monitor.rewards lists 'builtin:redness', the reward being trained"),
    ("monitor.every=0", "monitor.every=0 must be a positive integer"),
    ("monitor.patience=0", "monitor.patience=0 must be a positive integer"),
    ("monitor.images_per_prompt=1", "monitor.images_per_prompt=1 must be >= 2"),
    ("monitor.backbones.pickscore=/x", "monitor.backbones names 'pickscore', which monitor.rewards does not list"),
])
def test_bad_monitor_values_are_one_line_each_before_any_model_loads(tmp_path, monkeypatch, capsys, override,
                                                                      message):
    monkeypatch.setattr(L, "load_run_parts", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["train", "--preset", "tiny_cpu", "--quiet", *SMALL, f"logging.output_dir={tmp_path}",
                     "monitor.rewards=[builtin:blueness]", override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert sum(message in line for line in err.splitlines()) == 1, err


def test_missing_weights_of_a_watched_reward_name_its_monitor_option(tmp_path):
    from lowmem_nablagfn.checks import check_monitor_files

    cfg = load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", "monitor.rewards=[pickscore]",
                                   f"monitor.backbones.pickscore={tmp_path / 'none'}"])
    problems = check_monitor_files(cfg)
    assert len(problems) == 1 and f"monitor.backbones.pickscore={tmp_path / 'none'}: no such directory" in problems[0]


def test_a_resume_may_change_the_monitor():
    from lowmem_nablagfn.checkpoint import compare_configs

    saved = to_dict(load_config("tiny_cpu", ["monitor.rewards=[builtin:blueness]", "monitor.stop=true"]))
    now = to_dict(load_config("tiny_cpu", ["monitor.rewards=[builtin:blueness, builtin:brightness]",
                                           "monitor.stop=false", "monitor.every=2"]))
    refused, allowed = compare_configs(saved, now)
    assert refused == [] and len(allowed) == 3


# ----------------------------------------------------------------------------- a run built to hack

def test_cli_run_trained_on_redness_warns_that_blueness_falls_and_stops(tmp_path):
    """tiny_cpu turns its samples red: blueness, watched, falls at each evaluation while redness rises."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "lowmem_nablagfn.cli", "train", "--preset", "tiny_cpu", "--quiet",
           f"logging.output_dir={tmp_path}", "training.num_epochs=4", "monitor.stop=true", *HACK]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]  # stopped by the monitor
    warning = [line for line in proc.stderr.splitlines() if "monitored builtin:blueness fell" in line]
    head = "lowmem-nablagfn: warning: epoch 1: monitored builtin:blueness fell for 2 evaluations in a row ("
    assert len(warning) == 1 and warning[0].startswith(head), proc.stderr
    assert "the policy may be hacking the reward" in warning[0] and "Traceback" not in proc.stderr
    run = tmp_path / "tiny_cpu"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [-1, 0, 1]  # stopped early: 4 epochs asked
    for r in rows:
        assert {M.TRAINED, M.DIVERSITY, "monitor/builtin:blueness", "time/monitor_s"} <= r.keys()
    blue, red = [r["monitor/builtin:blueness"] for r in rows], [r[M.TRAINED] for r in rows]
    assert blue[0] > blue[1] > blue[2] and red[2] > red[0], (blue, red)
    assert rows[-1]["monitor/alarm/builtin:blueness"] == 1.0 and rows[-1][M.STOPPED] == 1.0
    assert (run / "checkpoints" / "epoch-000001" / "manifest.json").is_file()  # the stop's checkpoint
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    page = (run / "report.html").read_text()
    assert "report/monitor.png" in page and "epoch 1: builtin:blueness (stopped after epoch 1" in page


def test_resume_rebuilds_the_history_from_the_metrics(tmp_path, capsys):
    """Cut after epoch 0 (two evaluations), resumed: the warning at epoch 1 needs the evaluations before the
    cut, read back from metrics.jsonl (nothing else carries them)."""
    from lowmem_nablagfn import trainer as T

    cfg = load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", "training.num_epochs=2", "logging.quiet=true",
                                   *HACK])
    T.train(cfg, stop_after_epoch=0)
    assert "fell" not in capsys.readouterr().err
    T.train(cfg, resume="auto")
    err = capsys.readouterr().err
    assert "lowmem-nablagfn: warning: epoch 1: monitored builtin:blueness fell for 2 evaluations" in err, err


def test_an_evaluation_leaves_training_alone_and_repeats_itself(tmp_path):
    """What training reads — weights, optimiser state, the global RNG — is untouched by an evaluation, which
    draws its noise from its own fixed seeds: the same policy scores the same twice."""
    c = L.setup(small_config(tmp_path, *HACK))
    L.train_epoch(c, L.sample_epoch(c, 0), 0)  # a trained adapter and a non-empty optimiser state

    def snapshot():
        params = [p.detach().clone() for group in c.trainable.values() for p in group]
        state = [t.clone() for s in c.optimizer.state_dict()["state"].values() for t in s.values()]
        return params + state + [torch.get_rng_state()]

    before = snapshot()
    watch = M.Monitor(c)
    first, second = watch.evaluate(), watch.evaluate()
    assert first == second and set(first) == {M.TRAINED, M.DIVERSITY, "monitor/builtin:blueness"}
    after = snapshot()
    assert len(before) == len(after) > 3 and all(torch.equal(a, b) for a, b in zip(before, after))
    assert next(iter(watch.rewards.values())).training is False  # built once, kept


# ----------------------------------------------------------------------------- report and planner

def test_report_plots_the_monitor_and_lists_its_warnings(tmp_path):
    from lowmem_nablagfn.report import write_report

    (tmp_path / "config.json").write_text(json.dumps(to_dict(load_config("tiny_cpu", HACK))))
    history = _history([0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1, 0.0], [0.5, 0.5, 0.4, 0.3])
    history[2]["monitor/alarm/pickscore"] = 1.0
    rows = [dict(r, **{"reward/mean": 0.0}) for r in history]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(tmp_path, force=True).read_text()
    assert (tmp_path / "report" / "monitor.png").stat().st_size > 0 and "report/monitor.png" in page
    assert "epoch 1: pickscore" in page
    assert M.warnings_text([{"epoch": 0, "reward/mean": 1.0}]) is None  # no monitor: no row


def test_planner_bytes_of_the_monitor_match_a_measured_forward(tmp_path, monkeypatch):
    """The monitor phase: the largest watched reward's weights + its no-grad forward (traced on fake tensors)
    + a batch of images; the forward against the same forward measured on real tensors."""
    from lowmem_nablagfn.memtrack import LiveBytes
    from lowmem_nablagfn.planner.meta import nbytes
    from lowmem_nablagfn.planner.monitor import monitor_cost
    from lowmem_nablagfn.rewards import build_reward

    monkeypatch.setenv("LOWMEM_NABLAGFN_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny_cpu", ["sampling.batch_size=4", "monitor.rewards=[builtin:blueness, pickscore]",
                                   "monitor.checkpoints.pickscore=random:reduced"])
    assert monitor_cost(load_config("tiny_cpu")) is None  # off
    cost = monitor_cost(cfg)
    assert cost.rows == 4  # min(sampling batch, 4 prompts x 2 images)
    model = build_reward(M.reward_config(cfg, "pickscore"))
    weights = nbytes(model)
    assert cost.host_resident == weights  # blueness has none
    images = torch.rand(cost.rows, 3, 64, 64)
    with LiveBytes() as mem, torch.no_grad():
        mem.reset_peak()
        base = mem.current
        model(images, ["a cat"] * cost.rows)
        forward = mem.peak - base
    assert forward > 0
    assert cost.per_reward["pickscore"] == pytest.approx(weights + forward + images.numel() * 4, rel=0.05)
    assert cost.phase == max(cost.per_reward.values()) == cost.per_reward["pickscore"]
