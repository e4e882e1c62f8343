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


def _declared_requirements() -> list:
    """The package's requirements and those of the extras CI installs (dev, bnb, deepspeed)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("dev", "bnb", "deepspeed"):
        reqs += project["optional-dependencies"][extra]
    return [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in reqs]


def _pins() -> dict:
    import re

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_constraints_pin_every_declared_dependency():
    """The README's install commands and .ci/run install with ``-c constraints.txt``: every dependency
    the suite runs with has an exact version there (a new dependency without a pin is an error here)."""
    import re

    pins, torch_stack = _pins(), {"torch", "torchvision"}  # named by the install commands themselves
    missing = [r for r in _declared_requirements()
               if r not in torch_stack and re.sub(r"[-_.]+", "-", r).lower() not in pins]
    assert not missing, f"add these to constraints.txt (bash .ci/latest --write-constraints): {missing}"
    assert not torch_stack & set(pins), "the torch stack stays out of constraints.txt (a CUDA machine keeps its own)"
    for cmd in ((ROOT / ".ci" / "run").read_text(), (ROOT / "README.md").read_text()):
        assert "-c constraints.txt" in cmd and "torch==2.14.1" in cmd


@pytest.mark.skipif(os.environ.get("LOWMEM_CI_UNPINNED") == "1", reason="bash .ci/latest: newest versions on purpose")
def test_installed_versions_are_the_pinned_ones():
    """Drift is seen here first: an environment installed without the constraints (or a registry that
    served something else) fails with the list of differences.  Each name is looked up as Python finds
    it (the first on ``sys.path``): setuptools appends its ``_vendor`` folder, whose older packaging,
    zipp and importlib-metadata are not what the package imports."""
    from importlib.metadata import PackageNotFoundError, version

    pins, drift = _pins(), {}
    for name, pinned in pins.items():  # transitive ones too: `kernels` came in as one
        try:
            installed = version(name)
        except PackageNotFoundError:  # an extra this environment does not have
            continue
        if installed != pinned:
            drift[name] = (pinned, installed)
    assert not drift, (f"installed versions differ from constraints.txt (pinned, installed): {drift}; install with "
                       f"`pip install -c constraints.txt -e '.[dev,bnb,deepspeed]'` or refresh the pins with "
                       f"`bash .ci/latest --write-constraints`")
