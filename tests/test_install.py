"""A non-editable install: build the wheel, install it into a directory outside the repository, and use
it from another working directory — the presets ship with it (their source is the top-level
``configs/``), and ``profile`` writes its results where the user runs, nothing into the install."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("lowmem_nablagfn", "configs", "pyproject.toml", "setup.py", "README.md")


def _files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(install directory, environment that imports the package from it)."""
    if importlib.util.find_spec("setuptools") is None:  # offline: no build backend to fetch
        pytest.skip("setuptools is not installed in this environment: the wheel cannot be built offline "
                    "(pip install -e '.[dev]' installs it)")
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject's build-system: SPDX license strings
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build this pyproject.toml offline "
                    f"(pip install -e '.[dev]' installs a newer one)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a clean copy: no stale build/ or egg-info of the checkout goes into the wheel
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, cwd=tmp)
    wheel, = (tmp / "dist").glob("lowmem_nablagfn-*.whl")
    target = tmp / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return target, env


def _run(args, cwd, env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_presets(installed, tmp_path):
    target, env = installed
    code = ("import json, lowmem_nablagfn; from lowmem_nablagfn.config import PRESET_DIR, list_presets, "
            "load_config\nfor name in list_presets(): load_config(name)\n"
            "print(json.dumps([lowmem_nablagfn.__file__, str(PRESET_DIR), list_presets()]))")
    done = _run(["-c", code], tmp_path, env)
    assert done.returncode == 0, done.stderr
    import json

    module, preset_dir, presets = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(module).resolve().is_relative_to(target.resolve())  # the wheel, not the checkout
    assert Path(preset_dir) == target.resolve() / "lowmem_nablagfn" / "configs"
    assert presets == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    cli = _run(["-m", "lowmem_nablagfn.cli", "presets"], tmp_path, env)
    assert cli.returncode == 0 and cli.stdout.split() == presets


def test_profile_from_a_wheel_writes_where_the_user_runs(installed, tmp_path):
    target, env = installed
    before = _files(target)
    (tmp_path / "benchmarks").mkdir()  # a checkout-like working directory: results go to its benchmarks/
    done = _run(["-m", "lowmem_nablagfn.cli", "profile", "--preset", "tiny_cpu", "--updates", "1", "--warmup", "0",
                 *SMALL], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert "## Profile: tiny_cpu" in (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert (tmp_path / "runs").is_dir()  # logging.output_dir is relative to the working directory
    assert _files(target) == before  # nothing written into the install
    assert not (target / "benchmarks").exists()
