"""Your own reward (``reward.name=path/to/file.py:build`` or ``package.module:build``, docs/rewards-custom.md):
imported without unpickling, tried on one random image before any model is built (one clear line per
problem, exit 2 from the CLI), wrapped as a RewardModel, and trained on by the real CLI."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from lowmem_nablagfn.config import ConfigError, RewardConfig, load_config, validate
from lowmem_nablagfn.rewards import build_reward, known_reward

from helpers import SMALL

#: the example of docs/rewards-custom.md: a smooth saturation score
SATURATION = '''
import torch
from torch import nn


class Saturation(nn.Module):
    """Mean of a smooth max(r, g, b) - min(r, g, b): (B, 3, H, W) in [0, 1] -> (B,)."""

    def forward(self, images, prompts):
        hi = torch.logsumexp(20 * images, dim=1) / 20
        lo = -torch.logsumexp(-20 * images, dim=1) / 20
        return (hi - lo).flatten(1).mean(1)


def build():
    return Saturation()
'''
#: the tiny preset's own reward, written by a user: its rise under the tiny preset is known
REDNESS = '''
from torch import nn


class Redness(nn.Module):
    def forward(self, images, prompts):
        r, g, b = images.unbind(1)
        return (r - 0.5 * (g + b)).flatten(1).mean(1)


def build():
    return Redness()
'''


def write(tmp_path, source, name="my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def problems(name, *overrides):
    """The validation problems of the tiny preset with ``reward.name=name`` (exactly one expected)."""
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny_cpu", [f"reward.name={name}", *overrides]))
    return str(err.value).split("\n  - ")[1:]


def test_file_reward_builds_wraps_and_matches_the_users_module(tmp_path):
    path = write(tmp_path, SATURATION)
    name = f"{path}:build"
    assert known_reward(name)
    validate(load_config("tiny_cpu", [f"reward.name={name}"]))
    reward = build_reward(RewardConfig(name=name))
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    s = reward(x, ["a", "b", "c"])
    assert s.shape == (3,) and s.dtype == torch.float32
    builtin = build_reward(RewardConfig(name="builtin:saturation"))
    torch.testing.assert_close(s, builtin(x, ["a", "b", "c"]))  # the same formula as the built-in one
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_module_path_reward(tmp_path, monkeypatch):
    pkg = tmp_path / "my_package"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg, SATURATION, "rewards.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_package", raising=False)
    validate(load_config("tiny_cpu", ["reward.name=my_package.rewards:build"]))
    reward = build_reward(RewardConfig(name="my_package.rewards:build"))
    assert reward(torch.rand(2, 3, 8, 8), ["a", "b"]).shape == (2,)


def test_checkpointing_reaches_a_module_that_has_it(tmp_path):
    """``memory.checkpoint_reward`` (models.set_checkpointing) calls the user's own switch, if any;
    a module without one is left alone (and the planner sees no blocks to checkpoint)."""
    from lowmem_nablagfn.models import set_checkpointing

    path = write(tmp_path, SATURATION.replace("def build():", textwrap.dedent('''
        class Switchable(Saturation):
            calls = []

            def set_checkpointing(self, on):
                self.calls.append(on)


        def build_switchable():
            return Switchable()


        def build():''')))
    plain = build_reward(RewardConfig(name=f"{path}:build"))
    switchable = build_reward(RewardConfig(name=f"{path}:build_switchable"))
    assert not hasattr(plain, "set_checkpointing") and hasattr(switchable, "set_checkpointing")
    set_checkpointing(plain, True)
    set_checkpointing(switchable, True)
    set_checkpointing(switchable, False)
    assert switchable.module.calls == [True, False]


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a custom reward must not be unpickled")

    for module, attr in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, attr, refuse)
    name = f"{write(tmp_path, SATURATION)}:build"
    validate(load_config("tiny_cpu", [f"reward.name={name}"]))
    build_reward(RewardConfig(name=name))


BAD = {
    "wrong_signature": ("""
        import torch
        def build():
            return torch.nn.Flatten(0)  # its forward takes the images only
        """, "forward(images, prompts) raised TypeError"),
    "keeps_dims": ("""
        import torch
        class R(torch.nn.Module):
            def forward(self, images, prompts):
                return images.mean((1, 2, 3), keepdim=True)
        def build():
            return R()
        """, "returned a tensor of shape (1, 1, 1, 1) for 1 image; return one score per image, shape (B,)"),
    "nan": ("""
        import torch
        class R(torch.nn.Module):
            def forward(self, images, prompts):
                return images.mean((1, 2, 3)) * float("nan")
        def build():
            return R()
        """, "non-finite score"),
    "detached": ("""
        import torch
        class R(torch.nn.Module):
            def forward(self, images, prompts):
                return images.detach().mean((1, 2, 3))
        def build():
            return R()
        """, "no gradient reaches the image"),
    "zero_gradient": ("""
        import torch
        class R(torch.nn.Module):
            def forward(self, images, prompts):
                return (images * 0).mean((1, 2, 3))
        def build():
            return R()
        """, "the gradient with respect to the image is zero"),
    "not_a_module": ("""
        def build():
            return lambda images, prompts: images.mean((1, 2, 3))
        """, "build() returned a function, not a torch.nn.Module"),
    "missing_function": ("""
        def make():
            pass
        """, "defines no function 'build'"),
    "import_error": ("""
        import torch
        SCALE = undefined_name * 2
        def build():
            pass
        """, "NameError: name 'undefined_name' is not defined (my_reward.py line 3)"),
    "syntax_error": ("""
        def build(:
            pass
        """, "SyntaxError"),
    "build_raises": ("""
        def build():
            raise FileNotFoundError("weights.pt is missing")
        """, "build() raised FileNotFoundError: weights.pt is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_user_reward_gives_one_clear_line(tmp_path, case):
    source, needle = BAD[case]
    path = write(tmp_path, source)
    found = problems(f"{path}:build")
    assert len(found) == 1 and "\n" not in found[0], found
    assert needle in found[0] and str(path) in found[0], found[0]


def test_missing_file_and_module(tmp_path):
    (found,) = problems(f"{tmp_path}/nope.py:build")
    assert "no such file" in found and "nope.py" in found
    (found,) = problems("no_such_package_xyz.rewards:build")
    assert "cannot import module no_such_package_xyz.rewards" in found and "ModuleNotFoundError" in found


def test_unknown_name_points_at_custom_rewards():
    (found,) = problems("hpsv3")
    assert "reward.name='hpsv3' is unknown" in found and "path/to/my_reward.py:build" in found


@pytest.mark.parametrize("override,needle", [
    ("reward.weight_dtype=bf16", "reward.weight_dtype=bf16 is for the packaged reward models"),
    ("reward.antialias=true", "reward.antialias=True has no effect on"),
    ("reward.checkpoint=/some/weights.pt", "reward.checkpoint='/some/weights.pt' is not used by a custom reward"),
])
def test_options_a_custom_reward_does_not_have_are_refused(tmp_path, override, needle):
    (found,) = problems(f"{write(tmp_path, SATURATION)}:build", override)
    assert needle in found, found


def test_cli_refuses_a_bad_reward_with_exit_2(tmp_path, capsys):
    from lowmem_nablagfn.cli import main

    path = write(tmp_path, BAD["nan"][0])
    rc = main(["train", "--preset", "tiny_cpu", f"reward.name={path}:build", f"logging.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite score" in err, err
    assert not (tmp_path / "tiny_cpu").exists()  # nothing built, nothing written


def test_cli_trains_on_a_user_reward_as_on_the_builtin_one(tmp_path, capsys):
    """The user's file (outside the package) through the real CLI: the user's redness trains and logs
    exactly as the built-in ``builtin:redness`` does (same seeds), and the reward rises."""
    from lowmem_nablagfn.cli import main

    torch.set_num_threads(1)  # two spinning OpenMP threads on a busy 2-core machine run 10x slower
    path = write(tmp_path, REDNESS)
    runs = {}
    for run, name in (("custom", f"{path}:build"), ("builtin", "builtin:redness")):
        rc = main(["train", "--preset", "tiny_cpu", "--quiet", *SMALL, f"reward.name={name}",
                   f"logging.output_dir={tmp_path}", f"logging.run_name={run}", "training.num_epochs=3"])
        assert rc == 0, capsys.readouterr().err[-3000:]
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        runs[run] = [r["reward/mean"] for r in rows]
    assert len(runs["custom"]) == 4 and torch.isfinite(torch.tensor(runs["custom"])).all(), runs
    assert runs["custom"] == pytest.approx(runs["builtin"], rel=1e-5, abs=1e-6), runs
    assert runs["custom"][-1] > runs["custom"][0], runs
    assert json.loads((tmp_path / "custom" / "config.json").read_text())["reward"]["name"] == f"{path}:build"
