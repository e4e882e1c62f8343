"""Checks of the installed software: torch, the declared dependencies, DeepSpeed, free disk."""
from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .rows import DISK_FAIL_GIB, DISK_WARN_GIB, FAIL, OK, SKIP, WARN, Check, GiB

# ----------------------------------------------------------------------------- packages

@functools.lru_cache(maxsize=None)
def declared_requirements() -> Dict[str, str]:
    """``{distribution name: requirement}`` of this package — the required ones and the extras named
    ``{extra}`` — read from the installed metadata, or from ``pyproject.toml`` when the package runs
    from a source tree (``PYTHONPATH``).  Empty when neither is readable."""
    import importlib.metadata as md

    try:
        lines = md.requires("lowmem-nablagfn") or []
    except md.PackageNotFoundError:
        lines = []
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            import tomllib

            project = tomllib.loads(pyproject.read_text())["project"]
            lines = list(project["dependencies"])
            for extra, reqs in project.get("optional-dependencies", {}).items():
                lines += [f'{r}; extra == "{extra}"' for r in reqs]
        except (ImportError, OSError, KeyError):  # Python 3.10 (no tomllib), or an installed copy
            return {}
    out: Dict[str, str] = {}
    for line in lines:
        req, _, marker = line.partition(";")
        extra = re.search(r'extra\s*==\s*["\']([^"\']+)', marker)
        name = re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0]
        key = f"{name}[{extra.group(1)}]" if extra else name
        out.setdefault(key, req.strip())
    return out


def _distribution_modules() -> Dict[str, str]:
    """Installed distribution name (normalised) -> one of its top-level modules."""
    import importlib.metadata as md

    out: Dict[str, str] = {}
    for module, dists in md.packages_distributions().items():
        for d in dists:
            key = re.sub(r"[-_.]+", "-", d).lower()
            if key not in out or module == key.replace("-", "_"):
                out[key] = module
    return out


def _version_ok(requirement: str, version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with transformers; without it, do not judge
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def package_problem(requirement: str, modules: Optional[Dict[str, str]] = None) -> Tuple[Optional[str], str]:
    """(None or what is wrong, the installed version or "") of one requirement, e.g. ``torch>=2.4``:
    not installed, too old, or installed but failing to import."""
    import importlib.metadata as md

    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0]
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        return "not installed", ""
    if not _version_ok(requirement.split(";")[0], version):
        return f"{version} installed, {requirement} needed", version
    module = (modules if modules is not None else _distribution_modules()).get(
        re.sub(r"[-_.]+", "-", name).lower(), name.replace("-", "_"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install (missing shared library, ABI) is the finding
        return f"{version} does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", version
    return None, version


def _optional(extra: str, module: str, needed_by: Optional[str], install: str) -> Tuple[Optional[Check], object]:
    """(a row when the optional ``module`` is unusable, else None; the module or None).

    Missing and not needed by the configuration: ``warn`` with ``install``; needed (``needed_by``
    names the setting): ``fail``."""
    req = declared_requirements().get(f"{module}[{extra}]", module)
    problem, version = package_problem(req)
    if problem is None:
        return None, importlib.import_module(module)
    status = FAIL if needed_by else WARN
    why = f"needed by {needed_by}" if needed_by else "optional"
    return Check(module, status, f"{problem} ({why})", install), None


# ----------------------------------------------------------------------------- the checks

def check_torch(cfg) -> List[Check]:
    """torch's version against the declared requirement, and whether it is a CUDA build."""
    req = declared_requirements().get("torch", "torch")
    cuda = torch.version.cuda
    detail = f"torch {torch.__version__} ({f'CUDA {cuda} build' if cuda else 'CPU-only build'})"
    if not _version_ok(req, torch.__version__.split("+")[0]):
        return [Check("torch", FAIL, f"{detail}; {req} needed", f"pip install -U '{req}'")]
    if not cuda:
        return [Check("torch", WARN if cfg.device == "cuda" else OK, detail,
                      "a GPU needs a CUDA build of torch: pip install torch --index-url "
                      "https://download.pytorch.org/whl/cu124 (pick your CUDA)" if cfg.device == "cuda" else "")]
    return [Check("torch", OK, detail)]


def check_dependencies(cfg) -> List[Check]:
    """Every required dependency installed, recent enough, and importing."""
    reqs = {k: v for k, v in declared_requirements().items() if "[" not in k}
    if not reqs:
        return [Check("dependencies", SKIP, "cannot read the declared requirements (no package metadata, "
                      "no pyproject.toml)", "pip install -e . from the repository")]
    modules = _distribution_modules()
    bad = []
    for name, req in reqs.items():
        problem, _ = package_problem(req, modules)
        if problem:
            bad.append(f"{name}: {problem}")
    if bad:
        return [Check("dependencies", FAIL, "; ".join(bad),
                      "pip install -e . (or, offline, the wheels of benchmarks/gpu_wheels.sh)")]
    return [Check("dependencies", OK, f"{len(reqs)} required packages import")]


def check_deepspeed(cfg) -> List[Check]:
    """DeepSpeed imports at the declared version and picked the CUDA accelerator; its ops (the
    trainer needs none: it steps torch's AdamW on the ZeRO partitions)."""
    needed = "distributed.backend=deepspeed" if cfg.distributed.backend == "deepspeed" else None
    if not torch.cuda.is_available():  # what DeepSpeed picks anyway, without its line on stdout above the table
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row, ds = _optional("deepspeed", "deepspeed", needed, "pip install 'lowmem-nablagfn[deepspeed]'")
    if row is not None:
        return [row]
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    compatible = sorted(k for k, v in (getattr(ds.ops, "__compatible_ops__", None) or {}).items() if v)
    detail = (f"DeepSpeed {ds.__version__}, accelerator {accel}; ops (none needed by the trainer) buildable: "
              f"{', '.join(compatible) or 'none'}")
    if torch.cuda.is_available() and accel != "cuda":
        return [Check("DeepSpeed", FAIL if needed else WARN, detail, "DS_ACCELERATOR=cuda")]
    return [Check("DeepSpeed", OK, detail)]


def check_disk(cfg) -> List[Check]:
    """Free space under ``logging.output_dir`` (its nearest existing parent)."""
    path = Path(cfg.logging.output_dir).expanduser().absolute()
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / GiB
    detail = f"{free:.1f} GiB free under {path}"
    if free < DISK_FAIL_GIB:
        return [Check("disk", FAIL, detail, "free space, or logging.output_dir=<a larger disk>")]
    if free < DISK_WARN_GIB:
        return [Check("disk", WARN, f"{detail} (a long run's checkpoints and samples may need more)",
                      "logging.output_dir=<a larger disk>")]
    return [Check("disk", OK, detail)]


