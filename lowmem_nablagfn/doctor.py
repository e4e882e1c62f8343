"""``lowmem-nablagfn doctor``: what this machine can run, checked before a multi-hour run.

One row per check (:class:`Check`): ``ok``, ``warn`` (runs, but slower or with a feature off),
``fail`` (a run that needs it would break; the row says the fix) or ``skip`` (cannot be checked here,
e.g. the GPU checks on a machine without CUDA).  Every check is a small function of the configuration
(:data:`CHECKS`); :func:`run_checks` runs them all, a check that raises becomes a ``fail`` row, so one
broken package never hides the rest.  The command exits 0 when no row fails, 1 otherwise.

    lowmem-nablagfn doctor                          # the machine
    lowmem-nablagfn doctor --preset sd15_rtx4090    # ... and that preset's files and the planner's verdict

The GPU checks run real work on every visible device: the fused Triton subsampling kernel against the
PyTorch reference (bit for bit, :mod:`.subsample`), one 8-bit AdamW step (bitsandbytes), each SDPA
backend and xformers forward and backward, and a two-rank NCCL all-reduce through the trainer's own
process-group set-up when two or more GPUs are visible.
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: The detail of every GPU check on a machine without one.
NO_CUDA = "cannot check (no CUDA device)"
#: bf16 tensor cores (and bf16 fused attention, :func:`.planner.gpu.sdpa_kernel`) start with Ampere.
BF16_CAPABILITY = (8, 0)
#: Free disk under ``logging.output_dir``: below FAIL_GIB a run cannot keep its checkpoints and
#: samples; below WARN_GIB a long one may not.
DISK_FAIL_GIB, DISK_WARN_GIB = 1.0, 10.0
#: How long the two-rank NCCL all-reduce may take, start-up included (seconds).
NCCL_TIMEOUT_S = 120.0
GiB = 2**30


@dataclass(frozen=True)
class Check:
    """One row of the table: ``status`` is one of ``ok``, ``warn``, ``fail``, ``skip``; ``fix`` says
    what to do when it is not ``ok``."""
    name: str
    status: str
    detail: str
    fix: str = ""


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


def _driver_version() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def check_cuda(cfg) -> List[Check]:
    """CUDA visible to torch, the runtime it was built for, and the driver."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    said = "; ".join(str(w.message).splitlines()[0] for w in caught)
    if available:
        return [Check("CUDA", OK, f"{torch.cuda.device_count()} device(s), runtime {torch.version.cuda}, "
                                  f"driver {_driver_version()}")]
    if torch.version.cuda is None:
        why, fix = "torch is a CPU-only build", "install a CUDA build of torch to use a GPU"
    elif said:
        why, fix = f"torch says: {said}", "update the NVIDIA driver to one that supports this CUDA runtime"
    else:
        why = f"no device visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        fix = "check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES"
    status = FAIL if cfg.device == "cuda" else SKIP
    return [Check("CUDA", status, f"{NO_CUDA}: {why}", fix if status == FAIL or said else "")]


def _arch_supported(cap: Tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Does this torch build carry kernels for a card of compute capability ``cap``: a cubin of the same
    major and no newer minor (``sm_80`` runs on sm86), or PTX of an older capability (``compute_80``)."""
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)a?", arch)
        if not m:
            continue
        major, minor = int(m.group(2)), int(m.group(3))
        if m.group(1) == "sm" and major == cap[0] and minor <= cap[1]:
            return True
        if m.group(1) == "compute" and (major, minor) <= cap:
            return True
    return not arch_list  # an empty list: the build does not say


def check_gpus(cfg) -> List[Check]:
    """Each visible GPU: name, compute capability, memory, bf16 support, kernels in this torch build."""
    if not torch.cuda.is_available():
        return [Check("GPUs", SKIP, NO_CUDA)]
    rows = []
    arch_list = torch.cuda.get_arch_list()
    for i in range(torch.cuda.device_count()):
        name, cap = torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i))
        gib = torch.cuda.get_device_properties(i).total_memory / GiB
        bf16 = cap >= BF16_CAPABILITY
        detail = f"{name}, sm{cap[0]}{cap[1]}, {gib:.1f} GiB, bf16 {'yes' if bf16 else 'no'}"
        if not _arch_supported(cap, arch_list):
            rows.append(Check(f"GPU {i}", FAIL, f"{detail}; this torch build has no kernels for sm{cap[0]}{cap[1]} "
                                                f"({' '.join(arch_list)})", "install a torch build for this card"))
        elif not bf16:
            rows.append(Check(f"GPU {i}", WARN, f"{detail}: bf16 is unsupported before sm80 (no bf16 tensor cores; "
                                                f"attention falls back to the math kernel)",
                              "training.mixed_precision=fp16"))
        else:
            rows.append(Check(f"GPU {i}", OK, detail))
    return rows


def _allreduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of :func:`check_nccl`: the trainer's process group (NCCL for CUDA tensors), one
    all-reduce of ``rank + 1``; writes the sum it got to ``out_dir/rank``."""
    from .distributed import group

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from .config import load_config

    group.init_process_group(torch.device("cuda", rank), load_config(None, []).distributed)
    x = torch.full((1024,), float(rank + 1), device=f"cuda:{rank}")
    torch.distributed.all_reduce(x)
    torch.cuda.synchronize(rank)
    Path(out_dir, str(rank)).write_text(repr(float(x[0])))
    torch.distributed.destroy_process_group()


def check_nccl(cfg) -> List[Check]:
    """NCCL present; with two or more GPUs, a two-rank all-reduce gives the right sum."""
    if not torch.cuda.is_available():
        return [Check("NCCL", SKIP, NO_CUDA)]
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        return [Check("NCCL", FAIL, "this torch build has no NCCL", "install a CUDA build of torch (Linux)")]
    version = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    if torch.cuda.device_count() < 2:
        return [Check("NCCL", OK, f"NCCL {version}; one GPU visible: no all-reduce to run")]
    import torch.multiprocessing as mp

    from .distributed.group import free_port

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_allreduce_worker, args=(2, free_port(), tmp), nprocs=2, join=False,
                                 start_method="spawn")
        try:
            while not ctx.join(timeout=max(1.0, NCCL_TIMEOUT_S - (time.perf_counter() - t0))):
                if time.perf_counter() - t0 > NCCL_TIMEOUT_S:
                    for p in ctx.processes:
                        p.kill()
                    return [Check("NCCL", FAIL, f"NCCL {version}: the two-rank all-reduce hung for "
                                                f"{NCCL_TIMEOUT_S:.0f} s", "NCCL_DEBUG=INFO lowmem-nablagfn doctor; "
                                                "check NCCL_P2P_DISABLE / NCCL_IB_DISABLE and the GPUs' topology")]
        except Exception as exc:  # noqa: BLE001 - a rank died: its error is the finding
            return [Check("NCCL", FAIL, f"NCCL {version}: two-rank all-reduce failed: {str(exc).splitlines()[-1][:200]}",
                          "NCCL_DEBUG=INFO lowmem-nablagfn doctor")]
        got = [float(Path(tmp, str(r)).read_text()) for r in range(2)]
    if got != [3.0, 3.0]:
        return [Check("NCCL", FAIL, f"NCCL {version}: all-reduce of 1 + 2 gave {got}", "NCCL_DEBUG=INFO; report it")]
    return [Check("NCCL", OK, f"NCCL {version}; two-rank all-reduce on GPUs 0, 1 correct "
                              f"({time.perf_counter() - t0:.1f} s)")]


def _subsample_tensors(device: str) -> dict:
    """Per-transition tensors (B=3, T=12) in the storage layouts the trainer hands over (dtypes,
    time-major, strided, broadcast), as ``tests/test_subsample_triton.py`` uses."""
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(3, 12, 4, 8, 8, generator=g).bfloat16().to(device),
            "next_latents": torch.randn(12, 3, 4, 8, 8, generator=g).to(device).transpose(0, 1),
            "eps": torch.randn(3, 12, 8, 8, 8, generator=g).half().to(device)[:, :, ::2],
            "timesteps": torch.linspace(999, 0, 12).to(device).expand(3, -1),
            "step_index": torch.arange(12).repeat(3, 1).to(device)}


def check_triton_kernel(cfg) -> List[Check]:
    """The fused Triton subsampling kernel compiles on this GPU and equals the reference bit for bit."""
    if not torch.cuda.is_available():
        return [Check("Triton kernel", SKIP, NO_CUDA)]
    try:
        from .subsample import triton_kernel
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken Triton
        return [Check("Triton kernel", WARN, f"Triton does not import ({type(exc).__name__}: {exc}); the PyTorch "
                                             f"reference subsamples instead (slower)",
                      "pip install 'lowmem-nablagfn[triton]'")]
    from .subsample import reference

    tensors = _subsample_tensors("cuda")
    t0 = time.perf_counter()
    for k, low_variance, dtype in ((4, True, torch.float32), (3, False, None), (12, True, torch.bfloat16)):
        args = (tensors, 3, 12, k, low_variance, 7, 2**32 + 5, dtype)
        (idx_k, out_k), (idx_r, out_r) = triton_kernel.select_and_gather(*args), reference.select_and_gather(*args)
        same = torch.equal(idx_k, idx_r) and all(torch.equal(out_k[n], out_r[n]) and out_k[n].dtype == out_r[n].dtype
                                                  for n in out_r)
        if not same:
            return [Check("Triton kernel", FAIL, f"differs from the reference (K={k}, low_variance={low_variance}, "
                                                 f"dtype={dtype})", "LOWMEM_NABLAGFN_SUBSAMPLE=reference; report it "
                                                 "with the output of tests/test_subsample_triton.py")]
    torch.cuda.synchronize()
    return [Check("Triton kernel", OK, f"compiled on this GPU, equal to the reference "
                                       f"({time.perf_counter() - t0:.1f} s with compilation)")]


def check_adamw8bit(cfg) -> List[Check]:
    """bitsandbytes imports and takes one 8-bit AdamW step on the GPU (the trainer's own optimiser set-up)."""
    needed = f"training.optimizer={cfg.training.optimizer}" if cfg.training.optimizer != "adamw" else None
    row, bnb = _optional("bnb", "bitsandbytes", needed, "pip install 'lowmem-nablagfn[bnb]' (or training.optimizer=adamw)")
    if row is not None:
        return [row]
    if not torch.cuda.is_available():
        return [Check("8-bit AdamW", SKIP, f"{NO_CUDA}; bitsandbytes {bnb.__version__} imports")]
    from .loop import build_optimizer

    eight = copy.deepcopy(cfg)
    eight.training.optimizer = "adamw8bit"  # a copy: the check's own configuration
    p = torch.nn.Parameter(torch.randn(64, 128, device="cuda"))  # >= 4096 elements: 8-bit states
    opt = build_optimizer(eight, [p], None)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    states = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.dtype == torch.uint8]
    if not torch.isfinite(p).all() or torch.equal(p, before) or not states:
        return [Check("8-bit AdamW", FAIL, f"bitsandbytes {bnb.__version__}: the step left "
                                           f"{'non-finite' if not torch.isfinite(p).all() else 'unchanged or non-8-bit'} "
                                           f"parameters", "training.optimizer=adamw")]
    return [Check("8-bit AdamW", OK, f"bitsandbytes {bnb.__version__}: one step on the GPU, 8-bit states")]


def _attention_runs(fn: Callable[[], torch.Tensor]) -> Optional[str]:
    """None when ``fn`` (an attention call) runs forward and backward, else the error's first line."""
    try:
        fn().float().sum().backward()
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - "no kernel for this dtype/card" is the finding
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ''}"


def check_attention(cfg) -> List[Check]:
    """Each SDPA backend, and xformers, forward and backward in the run's dtype on this GPU; the
    kernel the planner assumes (:func:`.planner.gpu.sdpa_kernel`) must be among those that run."""
    from .dtypes import DTYPES
    from .planner.gpu import sdpa_kernel

    needed = "memory.attention=xformers" if cfg.memory.attention == "xformers" else None
    xf_row, xformers = _optional("xformers", "xformers", needed, "pip install 'lowmem-nablagfn[xformers]' "
                                 "(a wheel built for this torch)")
    if not torch.cuda.is_available():
        return [Check("SDPA backends", SKIP, NO_CUDA)] + [xf_row or Check("xformers", SKIP, f"{NO_CUDA}; imports")]
    from torch.nn.attention import SDPBackend, sdpa_kernel as use_backend

    dtype = DTYPES[cfg.training.mixed_precision]
    cap = tuple(torch.cuda.get_device_capability())

    def qkv():
        return [torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]

    names = {"flash": SDPBackend.FLASH_ATTENTION, "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH}
    errors = {}
    for name, backend in names.items():
        def call(backend=backend):
            with use_backend(backend):
                return torch.nn.functional.scaled_dot_product_attention(*qkv())
        errors[name] = _attention_runs(call)
    assumed = sdpa_kernel(dtype, cap, 64)
    runs = ", ".join(f"{n} {'ok' if e is None else 'no'}" for n, e in errors.items())
    tag = f"{str(dtype).replace('torch.', '')} on sm{cap[0]}{cap[1]}"
    if errors[assumed] is not None:
        rows = [Check("SDPA backends", FAIL, f"{tag}: {runs}; the planner assumes {assumed}: {errors[assumed]}",
                      "memory.attention=math, or training.mixed_precision=fp16 on pre-Ampere cards")]
    else:
        rows = [Check("SDPA backends", OK if assumed != "math" else WARN, f"{tag}: {runs} (the planner assumes {assumed})",
                      "" if assumed != "math" else "training.mixed_precision=fp16 (fused attention)")]
    if xf_row is not None:
        return rows + [xf_row]
    import xformers.ops as xops

    half = torch.float16 if dtype == torch.float32 else dtype
    err = _attention_runs(lambda: xops.memory_efficient_attention(
        *[torch.randn(2, 256, 8, 64, device="cuda", dtype=half, requires_grad=True) for _ in range(3)]))
    rows.append(Check("xformers", OK if err is None else (FAIL if needed else WARN),
                      f"xformers {xformers.__version__}: memory_efficient_attention {'ok' if err is None else err}",
                      "" if err is None else "memory.attention=sdpa"))
    return rows


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


def _with_offline(fn, cfg) -> List[str]:
    """``fn(cfg)`` as if ``HF_HUB_OFFLINE`` were set: the preflight's "is it in the local cache" check."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return fn(cfg)
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def check_files(cfg) -> List[Check]:
    """The preset's model and reward files on disk or in the local hub cache (the preflight's checks)."""
    from . import preflight
    from .rewards.loading import hub_offline

    rows = []
    for name, fn, what in (("model files", preflight.check_model, cfg.pretrained.model),
                           ("reward files", preflight.check_reward_files, cfg.reward.name)):
        problems = _with_offline(fn, cfg)
        if not problems:
            rows.append(Check(name, OK, f"{what}: on disk or cached"))
        else:  # online, the first run downloads what is missing
            rows.append(Check(name, FAIL if hub_offline() else WARN, f"{what}: " + "; ".join(problems),
                              "download it now (the run would fetch it at start)" if not hub_offline() else
                              "the download (or local path) the detail names"))
    return rows


def _host_memory_gib() -> Optional[float]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    except (ValueError, OSError, AttributeError):
        return None


def _fits_card(cfg, profile, card: str, gib: float) -> bool:
    """Does ``cfg`` fit the card class ``card`` (its own attention kernel)?  No when its dtype has no
    fused attention there (bf16 before sm80): the math kernel's trace is not shipped, and
    ``plan --table`` calls that a misconfiguration, not a fit."""
    from . import planner

    try:
        return planner.predict(cfg, profile, planner.CARD_CAPABILITY[card]).fits(gib)
    except planner.MissingProbe:
        return False


def check_plan(cfg) -> List[Check]:
    """The planner's verdict for this configuration on the detected card (``plan`` with this machine's
    GPU); on a machine without one, the card classes it fits."""
    from . import planner
    from .memtrack import GiB as _GiB

    try:
        profile = planner.Profile(cfg, allow_trace=False)
        pred = planner.predict(cfg, profile, tuple(torch.cuda.get_device_capability())
                               if torch.cuda.is_available() and cfg.device != "cpu" else None)
    except planner.MissingProbe as exc:
        return [Check("planner", WARN, f"no shipped or cached trace of this model ({exc})",
                      "lowmem-nablagfn plan --preset ... traces it once (minutes of CPU)")]
    notes = "; ".join(pred.notes)
    if cfg.device == "cpu":
        host = _host_memory_gib()
        detail = f"device=cpu: predicted peak {pred.peak / _GiB:.2f} GiB of host memory" + (
            f" of {host:.0f} GiB" if host else "")
        status = FAIL if host and pred.peak / _GiB > host else OK
        return [Check("planner", status, detail, "a smaller preset, or a GPU" if status == FAIL else "")]
    need = pred.required_gib()
    if not torch.cuda.is_available():
        fits = [name for name, gib in planner.CARDS.items() if _fits_card(cfg, profile, name, gib)]
        return [Check("planner", SKIP, f"{NO_CUDA}: needs {need:.1f} GiB on a card (peak {pred.peak / _GiB:.1f} GiB "
                                       f"in {pred.peak_phase}); fits {', '.join(fits) or 'none of the card classes'}")]
    vram = planner.cuda_vram_gib()
    if pred.fits(vram):
        return [Check("planner", WARN if notes else OK, f"fits this card: needs {need:.1f} of {vram:.1f} GiB "
                                                        f"(peak in {pred.peak_phase})" + (f"; {notes}" if notes else ""),
                      "see the note" if notes else "")]
    prop = planner.propose(cfg, profile, vram, capability=pred.capability)
    fix = ("add " + " ".join(prop.overrides)) if prop is not None else "a larger card, or model.no_flow=true"
    return [Check("planner", FAIL, f"does NOT fit this card: needs {need:.1f} of {vram:.1f} GiB", fix)]


#: Every check, in the table's order: each a function of the configuration returning its rows.
CHECKS: Tuple[Callable, ...] = (check_torch, check_dependencies, check_cuda, check_gpus, check_nccl,
                                 check_triton_kernel, check_adamw8bit, check_attention, check_deepspeed,
                                 check_disk)
#: Run only with ``--preset``: the preset's files and the planner's verdict.
PRESET_CHECKS: Tuple[Callable, ...] = (check_files, check_plan)


def run_checks(cfg, preset_checks: bool = False,
               checks: Optional[Iterable[Callable]] = None) -> List[Check]:
    """Every row of :data:`CHECKS` (and :data:`PRESET_CHECKS`); a check that raises is a ``fail`` row
    naming the error, and the others still run."""
    out: List[Check] = []
    for check in checks if checks is not None else CHECKS + (PRESET_CHECKS if preset_checks else ()):
        try:
            out += check(cfg)
        except Exception as exc:  # noqa: BLE001 - reported as the check's failure, the rest still run
            name = check.__name__.replace("check_", "")
            out.append(Check(name, FAIL, f"the check raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                             "see the error; rerun with the package it names fixed"))
    return out


def format_table(rows: Sequence[Check]) -> str:
    """One line per check: status, name, detail and (unless ok) the fix."""
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'':4}  {'check':<{width}}  detail", f"{'':4}  {'-' * width}  {'-' * 6}"]
    for r in rows:
        fix = f"  -> fix: {r.fix}" if r.fix and r.status != OK else ""
        lines.append(f"{r.status:<4}  {r.name:<{width}}  {r.detail}{fix}")
    counts = {s: sum(r.status == s for r in rows) for s in (OK, WARN, FAIL, SKIP)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + (
        "" if counts[FAIL] else ": nothing fails"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the subcommand

def add_parser(subparsers) -> None:
    """``lowmem-nablagfn doctor``: its flags (see :mod:`lowmem_nablagfn.cli` for the contract).  No
    ``reads_config``: the CLI's preflight would stop at a missing model file, which is a row here."""
    p = subparsers.add_parser("doctor", help="check this machine (torch, CUDA, GPUs, NCCL, kernels, packages, "
                                             "disk) before a long run; with --preset, its files and fit")
    p.add_argument("--preset", "-p", default=None, help="also check this preset's files and the planner's verdict")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the preset")


def run(args) -> int:
    """Print the table; 0 when nothing fails, 1 otherwise, 2 for a configuration that does not load."""
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.preset, list(args.overrides or []))
    except ConfigError as exc:
        print(f"lowmem-nablagfn doctor: {exc}", file=sys.stderr)
        return 2
    rows = run_checks(cfg, preset_checks=args.preset is not None)
    print(format_table(rows), flush=True)
    return 1 if any(r.status == FAIL for r in rows) else 0
