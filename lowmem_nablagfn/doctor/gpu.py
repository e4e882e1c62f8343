"""Checks that need a GPU: CUDA and the driver, each card, NCCL, the Triton kernel, 8-bit AdamW, attention."""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .rows import BF16_CAPABILITY, FAIL, NCCL_TIMEOUT_S, NO_CUDA, OK, SKIP, WARN, Check, GiB
from .software import _optional

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
    from ..distributed import group

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from ..config import load_config

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

    from ..distributed.group import free_port

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
        from ..subsample import triton_kernel
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken Triton
        return [Check("Triton kernel", WARN, f"Triton does not import ({type(exc).__name__}: {exc}); the PyTorch "
                                             f"reference subsamples instead (slower)",
                      "pip install 'lowmem-nablagfn[triton]'")]
    from ..subsample import reference

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
    from ..loop import build_optimizer

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
    from ..dtypes import DTYPES
    from ..planner.gpu import sdpa_kernel

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


