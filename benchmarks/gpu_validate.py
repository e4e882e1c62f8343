"""One command that measures every performance claim on one GPU, in three parts of about 5 minutes each
on an H100 (start-up included), against the official code's schedule, next to the planner's predictions.

    python benchmarks/gpu_validate.py --part 1          # GPU: imports, gpu tests, kernel, SD 1.5 memory/time
    python benchmarks/gpu_validate.py --part 2          # GPU: SDXL, reward models
    python benchmarks/gpu_validate.py --part 3          # GPU: SD 3.5 Medium (benchmarks/gpu_sd3.py)
    python benchmarks/gpu_validate.py --smoke           # every part's code paths at tiny sizes on the CPU
                                                        # (tests/test_gpu_validate.py runs it)

Each part has its own wall-clock budget (``--budget-s``, default 240 s on a GPU): a measurement that
would not fit is reported as skipped, and at the budget's end an alarm stops the section in progress
(it is reported as stopped).  Every section catches its own failure (a Triton compile error, a
non-finite loss, an out-of-memory, a missing package): the error goes into that section's result
and the others still run.  After every section the JSON (``--json``) and the markdown of the
RESULTS.md section (the same path with ``.md``) are rewritten, so a run killed at the machine's time
limit keeps what it measured; the markdown is appended to ``--results`` (default
``benchmarks/RESULTS.md`` on a GPU, none with ``--smoke``) when the part ends.  The JSON's default
place is outside the repository: ``$LOWMEM_NABLAGFN_CACHE/gpu_validate/`` (default
``~/.cache/lowmem_nablagfn/gpu_validate/``), one file per part and date.

Part 1 (my estimate on an H100: 20 s start-up, 30 s imports, 90 s tests, 10 s kernel, the rest of
the budget for memory and time):

1. **imports** — ``lowmem-nablagfn doctor``'s checks (:mod:`lowmem_nablagfn.doctor`): the declared
   dependencies import, the GPU, the Triton kernel against the reference, an 8-bit AdamW step, the
   SDPA backends and xformers, DeepSpeed, NCCL.
2. **gpu tests** — ``pytest -m gpu`` over the test files that hold gpu-marked tests (on the CPU:
   collected and skipped, which still checks that they import and are selected).
3. **subsampling kernel** — ``benchmarks/subsample.py``'s loop / reference / Triton kernel at
   64x50x4x64x64: GB/s and fraction of the measured copy bandwidth, speed-up over the loop.
4. **memory and time** — SD 1.5 shapes with random weights (``sd15-random``), 512 px, CFG 5, the
   aesthetic reward (CLIP ViT-L/14 + head, random weights, fp32), T = 50, ``timestep_fraction`` 0.1
   (the ``sd15_rtx4090`` preset, on-policy so that one sampling round feeds one update).  Three
   objectives (``plan_targets.TARGETS``): residual at train batch 4, residual at train batch 1
   (accumulation 4: the same update), no-flow at batch 4.  For each: the official schedule
   (``planner.OFFICIAL_OVERRIDES``: one graph and one backward per transition slot, no checkpointing,
   every step stored) and the planner's fastest configuration for 12, 10 and 8 GiB and for this card.
   Each runs one round of ``lowmem-nablagfn profile`` (sample, then one update; the models are
   loaded once per objective and reconfigured in place) and reports peak ``max_memory_allocated``
   and ``max_memory_reserved`` next to the planner's predictions for this card (error %), and the time
   per update against the official schedule's (ratio, same run).

Part 2 (estimate: 20 s start-up, about 100 s per SDXL target, 60-90 s for the reward models):

5. **SDXL** (issue #17) — the ``sdxl_rtx4090`` preset with ``sdxl-random`` (SDXL base architecture,
   random weights, 1024 px): residual (must fit 24 GB) and no-flow (16 GB), one profiled round each
   without warm-up (the time is a cold first round), peak allocated / reserved next to the planner's
   prediction from its shipped SDXL trace.  A target starts only when the time it is expected to take
   (:data:`SDXL_ESTIMATE_S`, then the previous target's measured time) fits the budget left, less the
   reward models' share.
6. **reward models** — ``benchmarks/rewards.py``'s score -> pixel-gradient time and peak memory
   (aesthetic, HPSv2, ImageReward; random full-size weights, fp32, batch 4).

Part 3 (estimate: 20 s start-up, about 110 s per SD 3.5 target, 90 s for the T5 row when time is left):

7. **SD 3.5** (issue #26, :mod:`gpu_sd3`) — the ``sd35m_rtx4090`` preset with ``sd35m-random`` (SD 3.5
   Medium's architecture, random weights, 1024 px, flow-sde): residual (must fit 24 GB) and the no-flow
   16 GB variant, one cold profiled round each: peak allocated per phase, peak reserved, time per update
   next to the planner's prediction from a shipped SD 3 trace (or why there is none).  The prompts go
   into the prompt cache without T5 (``pretrained.t5=false``: same conditioning shape, zeros, so the
   training phases cost the same; gpu_sd3's docstring says why); the T5-XXL prompt encoding is then
   measured alone if the budget leaves time.

Then a verdict against the targets (residual b4 <= 12 GiB reserved, b1 <= 10, no-flow b4 <= 8; each
<= 1.3x the official time per update; the fastest configuration for this card faster than the
official; planner within 10 % of ``max_memory_reserved``; kernel >= 20x the loop and >= 50 % of copy
bandwidth).  These figures calibrate the planner's GPU constants (``planner.FRAGMENTATION``,
``CONTEXT_GIB_BY_MAJOR``, ``CUDNN_WORKSPACE_GIB``, ``ATTN_SCRATCH_BYTES``): measured reserved / allocated
gives the fragmentation, ``nvidia-smi`` used minus reserved the context.

**On an offline GPU machine** with only torch, triton, transformers, accelerate, peft and timm (the
imports this script needs are the package's declared dependencies): build the wheels of the rest on a
machine with network, from this repository's root (``benchmarks/gpu_wheels.sh`` runs the workspace's
``shared/tools/gpu-wheels.sh``, next to this repository, and adds tensorboard and matplotlib)::

    PY=.venv/bin/python bash benchmarks/gpu_wheels.sh   # -> .whl/ (diffusers, omegaconf, bitsandbytes,
                                                        #    open-clip-torch, xformers, deepspeed,
                                                        #    tensorboard, matplotlib, ...; ~46 MB)

carry the repository with its ``.whl/`` over, and install them there without network::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python benchmarks/gpu_validate.py --part 1 --json results/part1.json   # <= 5 min each
    python benchmarks/gpu_validate.py --part 2 --json results/part2.json
    python benchmarks/gpu_validate.py --part 3 --json results/part3.json

``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` is set here, as the launchers in launch/ do,
because the planner assumes it.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

# Only torch and the standard library at import: a missing package fails the section that needs it
# (reported), never the whole command before it has written anything.
import torch  # noqa: E402

from gpu_common import (QUIET, SMOKE_BASE, Budget, OutOfTime, _error, _pct, deadline, measure,  # noqa: E402,F401
                        measured_target)

#: Workloads: (preset, overrides) of the GPU run and of the smoke run.
GPU_BASE = ("sd15_rtx4090", ["pretrained.model=sd15-random", "reward.checkpoint=random", "reward.weight_dtype=fp32",
                             "sampling.guidance_scale=5.0", "training.on_policy=true", "device=cuda"])
#: SDXL (issue #17): the sdxl_rtx4090 preset at 1024 px with SDXL's architecture and random weights;
#: (label, overrides, card GiB it must fit): residual on 24 GB, no-flow on 16 GB.
SDXL_GPU = ("sdxl_rtx4090", ["pretrained.model=sdxl-random", "reward.checkpoint=random", "training.on_policy=true",
                             "device=cuda"])
SDXL_SMOKE = ("tiny_cpu", ["pretrained.model=tiny-sdxl", *SMOKE_BASE[1]])
SDXL_TARGETS = [("SDXL residual, 1024 px, train batch 4", [], 23.6),
                ("SDXL no-flow", ["model.no_flow=true", "memory.input_grad_chunk=1"], 15.8)]
#: Expected seconds of one SDXL target on an H100 before one has been measured: building SDXL's
#: 3.5 B random parameters on the CPU (~40 s) and one cold round at 1024 px (~60 s).  An estimate.
SDXL_ESTIMATE_S = 110.0
#: The reward models' share of part 2's budget (three full-size models built and timed).
REWARDS_RESERVE_S = 75.0
#: The sections of each part, in running order.
PARTS: Dict[int, List[str]] = {1: ["imports", "tests", "subsample", "memory"], 2: ["sdxl", "rewards"], 3: ["sd3"]}
#: Default budget of one part (seconds): 5 minutes on the GPU less start-up and writing.
PART_BUDGET_S, SMOKE_BUDGET_S = 240.0, 300.0
TARGET_TIME_RATIO = 1.3
TARGET_PLAN_ERROR = 0.10
TARGET_KERNEL_SPEEDUP, TARGET_KERNEL_BW = 20.0, 0.5


# ----------------------------------------------------------------------------- 1. imports

def imports(base: tuple) -> dict:
    """Section 1: ``lowmem-nablagfn doctor``'s rows for the part's configuration."""
    from lowmem_nablagfn import doctor
    from lowmem_nablagfn.config import load_config

    rows = doctor.run_checks(load_config(base[0], base[1]))
    return {"rows": [vars(r) for r in rows], "ok": not any(r.status == doctor.FAIL for r in rows),
            "table": doctor.format_table(rows)}


# ----------------------------------------------------------------------------- 2. gpu tests

def gpu_test_files() -> List[str]:
    """The test files that hold gpu-marked tests (collecting only those is quicker than all of tests/)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_gpu_tests(paths: List[str], timeout: float) -> dict:
    """``pytest -m gpu`` in a subprocess: counts of passed / failed / skipped and the summary line;
    ``ok`` needs at least one gpu-marked test collected (pytest's exit code 5 is a selection that
    found none) and none failed."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
        summary, rc = (lines[-1] if lines else ""), proc.returncode
    except subprocess.TimeoutExpired:
        summary, rc = f"timed out after {timeout:.0f} s", -1
    counts = {}
    for word in ("passed", "failed", "skipped", "deselected", "error", "errors"):
        for part in summary.replace(",", " ,").split(","):
            toks = part.split()
            if len(toks) >= 2 and toks[1].startswith(word) and toks[0].isdigit():
                counts[word] = int(toks[0])
    ran = counts.get("passed", 0) + counts.get("skipped", 0) + counts.get("failed", 0)
    ok = rc == 0 and ran > 0 and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    return {"command": " ".join(cmd[1:]), "returncode": rc, "summary": summary, "counts": counts, "ok": ok,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- 4. memory and time

def reconfigure(c, cfg) -> bool:
    """Turn built components into those of ``cfg`` (same models): memory options, text encoder
    placement, optimiser class.  Returns True when the optimiser was rebuilt (its state is new)."""
    from lowmem_nablagfn import distributed as dist
    from lowmem_nablagfn import loop as T
    from lowmem_nablagfn.memory import build_plan

    c.cfg, c.plan = cfg, build_plan(cfg)  # these components now run cfg's plan
    c.plan.placement.apply_checkpointing(c.parts.denoiser, c.parts.vae, c.reward_model, c.flow_model)
    for te in c.parts.text_encoders:  # SDXL has two; SD 3 none (its prompt table is host memory)
        te.to("cpu" if cfg.memory.offload_text_encoder else c.device)
    rebuilt = False
    if type(c.optimizer).__name__ != {"adamw": "AdamW", "adamw8bit": "AdamW8bit",
                                      "paged_adamw8bit": "PagedAdamW8bit"}[cfg.training.optimizer]:
        c.optimizer = T.build_optimizer(cfg, c.lora_params, c.flow_model)  # ImportError without bitsandbytes
        c.sync = dist.make_gradient_sync(cfg.distributed, c.optimizer, cfg.training.max_grad_norm,
                                         cfg.training.batch_size, c.sync.scaler)
        rebuilt = True
    return rebuilt


def variants(cfg, profile, cards: Dict[str, float], capability) -> List[tuple]:
    """(label, config, overrides) of the official schedule and the planner's fastest per card, deduplicated."""
    from lowmem_nablagfn import planner

    out = [("official", planner.official_baseline(cfg), list(planner.OFFICIAL_OVERRIDES))]
    seen = {}
    for label, gib in cards.items():
        prop = planner.propose(cfg, profile, gib, capability=capability)
        if prop is None:
            out.append((label, None, ["nothing fits"]))
            continue
        key = tuple(prop.overrides)
        if key in seen:  # the same configuration as another card's: measured once
            out.append((label, seen[key], [f"as for {seen[key]}"]))
            continue
        seen[key] = label
        out.append((label, prop.config, prop.overrides))
    return out


def memory_and_time(base: tuple, out_dir: Path, budget: Budget, smoke: bool, reserve_s: float = 0.0) -> List[dict]:
    """Section 4; stops starting measurements when less than ``reserve_s`` of the budget is left.  A
    measurement that fails (a non-finite loss, a kernel error, out of memory, a missing package) is
    reported in its row and the next one runs."""
    from lowmem_nablagfn import loop as T
    from lowmem_nablagfn import planner
    from lowmem_nablagfn.config import load_config
    from lowmem_nablagfn.memtrack import GiB
    from plan_targets import TARGETS

    preset, extra = base
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() and not smoke else None
    rows: List[dict] = []
    objectives: Dict[bool, List[tuple]] = {}
    # smoke: one target per objective (the train-batch-1 target runs the same code as batch 4)
    for name, overrides, vram in ([TARGETS[0], TARGETS[2]] if smoke else TARGETS):
        objectives.setdefault("model.no_flow=true" in overrides, []).append((name, overrides, vram))
    for no_flow, targets in objectives.items():
        if budget.left() <= reserve_s:
            rows += [{"target": n, "variant": "-", "skipped": "time budget"} for n, _, _ in targets]
            continue
        common = [*extra, *QUIET, f"logging.output_dir={out_dir}", f"model.no_flow={no_flow}"]
        try:
            c = T.setup(load_config(preset, common))
            profile = planner.Probes(c.cfg)
        except Exception as exc:  # noqa: BLE001 - reported; the other objective still runs
            rows += [{"target": n, "variant": "-", "skipped": f"set-up failed: {_error(exc)}"} for n, _, _ in targets]
            continue
        warm = 1  # first measurement of these components: optimiser state, cuDNN and allocator warm-up
        for name, overrides, vram in targets:
            cfg = load_config(preset, common + overrides)
            cards = {f"{v:g} GiB": v for _, _, v in TARGETS}
            if smoke:  # tiny model, one card: its need 30 % below the official schedule's reserved bytes
                official = planner.predict(planner.official_baseline(cfg), profile)
                cards = {f"{vram:g} GiB": official.required_gib() - 0.3 * official.reserved_gib()}
            if capability is not None:
                cards["this card"] = planner.cuda_vram_gib()
            official_s = official_tflop = None
            for label, cand, ov in variants(cfg, profile, cards, capability):
                row = {"target": name, "target_gib": vram, "variant": label, "card_gib": cards.get(label),
                       "overrides": ov}
                rows.append(row)
                if isinstance(cand, str):  # measured under another card's label
                    row["same_as"] = cand
                    continue
                if cand is None:
                    row["skipped"] = ov[0]
                    continue
                if budget.left() <= reserve_s:
                    row["skipped"] = "time budget"
                    continue
                pred = planner.predict(cand, profile, capability)
                row.update(predicted_peak_gib=pred.peak / GiB, predicted_reserved_gib=pred.reserved_gib(),
                           predicted_phase=pred.peak_phase, predicted_tflop=pred.tflop_per_update,
                           kernels=pred.kernels, notes=pred.notes)
                try:
                    if reconfigure(c, cand):
                        warm = 1
                    row.update(measure(c, cand, warm))
                    warm = 0
                except ImportError as exc:  # 8-bit AdamW without bitsandbytes
                    row["skipped"] = f"{type(exc).__name__}: {exc}"
                    continue
                except torch.cuda.OutOfMemoryError as exc:
                    row["skipped"] = f"OOM: {str(exc).splitlines()[0]}"
                    c.optimizer.zero_grad(set_to_none=True)
                    continue
                except Exception as exc:  # noqa: BLE001 - a non-finite loss, a kernel error: the next runs
                    row["skipped"] = _error(exc)
                    c.optimizer.zero_grad(set_to_none=True)
                    warm = 1
                    continue
                if label == "official":
                    official_s = row["s_per_update"]
                    official_tflop = pred.tflop_per_update
                if official_s:
                    row["time_vs_official"] = row["s_per_update"] / official_s
                    row["predicted_work_vs_official"] = pred.tflop_per_update / official_tflop
                print(f"[{name}] {label}: peak {row['peak_gib']:.2f} GiB (predicted {row['predicted_peak_gib']:.2f}), "
                      f"reserved {row['reserved_gib'] or float('nan'):.2f} GiB, {row['s_per_update']:.2f} s/update",
                      flush=True)
        del c, profile
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def memory_table(rows: List[dict]) -> str:
    lines = ["| target | variant | overrides | peak allocated (GiB) | predicted | error | peak reserved (GiB) "
             "| predicted | error | s / update | vs official | planner's work vs official |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ov = " ".join(f"`{o}`" for o in r.get("overrides", [])) if r["variant"] != "official" else "official schedule"
        if "peak_gib" not in r:
            why = f"as for {r['same_as']}" if "same_as" in r else r.get("skipped", "–")
            lines.append(f"| {r['target']} | {r['variant']} | {ov} | {why} | | | | | | | | |")
            continue
        res = r["reserved_gib"]
        lines.append(
            f"| {r['target']} | {r['variant']} | {ov} | {r['peak_gib']:.2f} | {r['predicted_peak_gib']:.2f} | "
            f"{_pct(r['peak_gib'], r['predicted_peak_gib'])} | {'–' if res is None else f'{res:.2f}'} | "
            f"{r['predicted_reserved_gib']:.2f} | {_pct(res, r['predicted_reserved_gib'])} | "
            f"{r['s_per_update']:.2f} | {r.get('time_vs_official', float('nan')):.2f}x | "
            f"{r.get('predicted_work_vs_official', float('nan')):.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 3. subsampling, 6. rewards

def subsampling(size: str, device: torch.device, repeats: int) -> dict:
    """Section 3; a kernel that does not import, compile or match the reference is reported in its
    row, and the loop and the reference are still timed."""
    import subsample as subsample_bench  # benchmarks/subsample.py

    kernel, no_kernel = None, "n/a (no GPU)"
    if device.type == "cuda":
        try:
            from lowmem_nablagfn.subsample import triton_kernel as kernel
        except Exception as exc:  # noqa: BLE001 - reported, the rest still runs
            no_kernel = f"n/a (triton: {type(exc).__name__})"
    args = SimpleNamespace(fraction=0.1, seed=0, warmup=2, repeats=repeats)
    copy_bps = subsample_bench.copy_bandwidth(device, 1024 if device.type == "cuda" else 16, repeats)
    try:
        res = subsample_bench.bench_size(size, args, device, kernel)
    except Exception as exc:  # noqa: BLE001 - a Triton compile error, a mismatch (AssertionError)
        if kernel is None:
            raise
        no_kernel = f"n/a (kernel failed: {_error(exc)[:80]})"
        res = subsample_bench.bench_size(size, args, device, None)
    loop_ms = next(ms for _, m, ms, _ in res if m == "loop")
    out = {"size": size, "copy_gb_s": copy_bps / 1e9, "table": "\n".join(subsample_bench.table(res, copy_bps, no_kernel)),
           "methods": {}}
    for _, method, ms, moved in res:
        if ms is not None:
            bps = moved / (ms / 1e3)
            out["methods"][method] = {"ms": ms, "gb_s": bps / 1e9, "of_copy": bps / copy_bps,
                                      "speedup_vs_loop": loop_ms / ms}
    return out


def reward_models(names: List[str], checkpoint: str, batch: int, resolution: int, device: torch.device,
                  budget: Budget) -> List[dict]:
    """Section 6; a reward model that fails (a missing package, out of memory) is reported in its row."""
    import rewards as reward_bench  # benchmarks/rewards.py

    out = []
    for name in names:
        if budget.left() <= 0:
            out.append({"reward": name, "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        model = None
        try:
            model = reward_bench.build(name, "fp32", False, device, checkpoint=checkpoint)
            build_s = time.perf_counter() - t0
            x = reward_bench.images(batch, resolution, device)
            seconds, peak = reward_bench.timed(model, x, (reward_bench.PROMPTS * batch)[:batch], repeats=2)
            out.append({"reward": name, "batch": batch, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                        "s": seconds, "peak_above_weights_mib": peak / 2**20, "build_s": build_s})
        except Exception as exc:  # noqa: BLE001 - reported; the next reward model runs
            out.append({"reward": name, "skipped": _error(exc)})
        finally:
            del model  # freed before the next one is built
            gc.collect()
    return out


def rewards_table(rows: List[dict]) -> str:
    lines = ["| reward | batch | params (M) | score -> gradient (s) | peak above weights (MiB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['reward']} | {r['skipped']} | | | |" if "skipped" in r else
                     f"| {r['reward']} | {r['batch']} | {r['params_m']:.1f} | {r['s']:.3f} | "
                     f"{r['peak_above_weights_mib']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- verdict

def verdict(mem_rows: List[dict], sub: Optional[dict], card_gib: Optional[float]) -> List[str]:
    """PASS / FAIL per target: each objective at the planner's fastest configuration for its own card."""
    from plan_targets import TARGETS

    out = []
    for name, _, vram in TARGETS:
        mine = {r["variant"]: r for r in mem_rows if r["target"] == name}
        r = mine.get(f"{vram:g} GiB")
        r = mine.get(r.get("same_as")) if r is not None and "same_as" in r else r
        if r is None or "peak_gib" not in r:
            out.append(f"{name}: not measured ({'' if r is None else r.get('skipped', '')})")
        else:
            used = r["reserved_gib"] if r["reserved_gib"] is not None else r["peak_gib"]
            ok_mem = used <= vram
            ok_time = r.get("time_vs_official", float("inf")) <= TARGET_TIME_RATIO
            out.append(f"{name}, fastest for {r['variant']}: {used:.2f} GiB "
                       f"{'reserved' if r['reserved_gib'] is not None else 'allocated'} <= {vram:g} GiB: "
                       f"{'PASS' if ok_mem else 'FAIL'}; time {r.get('time_vs_official', float('nan')):.2f}x the "
                       f"official <= {TARGET_TIME_RATIO}x: {'PASS' if ok_time else 'FAIL'}")
        this = mine.get("this card")
        this = mine.get(this.get("same_as")) if this is not None and "same_as" in this else this
        if this is not None and "time_vs_official" in this:
            out.append(f"{name}, fastest for this card ({card_gib:.0f} GiB): {this['time_vs_official']:.2f}x the "
                       f"official: {'PASS' if this['time_vs_official'] < 1 else 'FAIL'} (< 1x)")
        for r in mine.values():
            if r.get("reserved_gib"):
                err = abs(r["predicted_reserved_gib"] / r["reserved_gib"] - 1)
                out.append(f"{name}, {r['variant']}: planner {_pct(r['reserved_gib'], r['predicted_reserved_gib'])} "
                           f"of max_memory_reserved: {'PASS' if err <= TARGET_PLAN_ERROR else 'FAIL'} (<= 10 %)")
    if sub is not None and "kernel" in sub["methods"]:
        k = sub["methods"]["kernel"]
        out.append(f"subsampling kernel: {k['speedup_vs_loop']:.0f}x the loop (>= {TARGET_KERNEL_SPEEDUP:g}x: "
                   f"{'PASS' if k['speedup_vs_loop'] >= TARGET_KERNEL_SPEEDUP else 'FAIL'}), {k['of_copy']:.0%} of "
                   f"copy bandwidth (>= 50 %: {'PASS' if k['of_copy'] >= TARGET_KERNEL_BW else 'FAIL'})")
    return out


# ----------------------------------------------------------------------------- 5. SDXL

def sdxl(out_dir: Path, budget: Budget, smoke: bool, reserve_s: float = 0.0) -> List[dict]:
    """Section 5: the SDXL preset (residual, no-flow) measured next to the planner's prediction.

    A target starts only when its expected time (:data:`SDXL_ESTIMATE_S`, then the last target's
    measured time) fits the budget left less ``reserve_s``.  The planner uses its shipped / cached
    SDXL trace only (tracing SDXL at 1024 px takes many minutes of CPU); without one the prediction
    columns say so."""
    from lowmem_nablagfn import loop as T
    from lowmem_nablagfn import planner
    from lowmem_nablagfn.config import load_config
    from lowmem_nablagfn.memtrack import GiB

    preset, extra = SDXL_SMOKE if smoke else SDXL_GPU
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() and not smoke else None
    rows = []
    expected = 0.0 if smoke else SDXL_ESTIMATE_S
    for name, overrides, card in SDXL_TARGETS[:1] if smoke else SDXL_TARGETS:  # smoke: the code path once
        row = {"target": name, "card_gib": card}
        rows.append(row)
        if budget.left() - reserve_s < expected:
            row["skipped"] = (f"time budget ({budget.left():.0f} s left, {reserve_s:.0f} s kept for the reward "
                              f"models, about {expected:.0f} s needed)")
            continue
        t0 = time.perf_counter()
        with measured_target(row) as held:
            cfg = load_config(preset, [*extra, *QUIET, f"logging.output_dir={out_dir}", *overrides])
            try:
                pred = planner.predict(cfg, planner.Probes(cfg, allow_trace=smoke), capability)
                row.update(predicted_peak_gib=pred.peak / GiB, predicted_reserved_gib=pred.reserved_gib(),
                           predicted_required_gib=pred.required_gib(), predicted_phase=pred.peak_phase)
            except planner.MissingProbe as exc:
                row["prediction"] = f"no SDXL trace shipped or cached ({exc})"
            held["c"] = T.setup(cfg)
            row.update(measure(held["c"], cfg, 0))  # no warm-up: the peak is the point, the time a cold round
        expected = time.perf_counter() - t0
        print(f"[sdxl] {name}: {row}", flush=True)
    return rows


def sdxl_table(rows: List[dict]) -> str:
    lines = ["| SDXL target | card (GiB) | peak allocated (GiB) | predicted | error | peak reserved (GiB) | "
             "predicted reserved | s / update |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['target']} | {r['card_gib']:g} | {r['skipped']} | | | | | |")
            continue
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['target']} | {r['card_gib']:g} | {fmt(r.get('peak_gib'))} | {fmt(r.get('predicted_peak_gib'))} "
                     f"| {_pct(r.get('peak_gib'), r.get('predicted_peak_gib'))} | {fmt(r.get('reserved_gib'))} "
                     f"| {fmt(r.get('predicted_reserved_gib'))} | {fmt(r.get('s_per_update'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def default_json(part: str, smoke: bool) -> Path:
    """``<cache>/gpu_validate/[smoke-]part<N>-<UTC time>.json``: outside the repository."""
    from lowmem_nablagfn.planner.probes import cache_dir

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return cache_dir().parent / "gpu_validate" / f"{'smoke-' if smoke else ''}part{part}-{stamp}.json"


def run_section(name: str, fn: Callable[[], tuple], out: dict, texts: Dict[str, str]) -> None:
    """``fn() -> (JSON value, markdown)`` into ``out[name]`` and ``texts[name]``; an exception (or the
    part's time running out) becomes ``out[name] = {"error": ...}`` and a line of markdown."""
    t0 = time.perf_counter()
    try:
        out[name], texts[name] = fn()
    except (Exception, OutOfTime) as exc:  # noqa: BLE001 - reported; the next section runs
        out[name] = {"error": _error(exc), "traceback": traceback.format_exc()[-4000:]}
        texts[name] = f"**{name}**: failed: {_error(exc)}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    out.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)


def save(out: dict, texts: Dict[str, str], json_path: Path) -> str:
    """Write the JSON and the markdown of the RESULTS.md section (``json_path`` with ``.md``); return the markdown."""
    text = "\n\n".join(texts.values())
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1, default=str))
    json_path.with_suffix(".md").write_text(text + "\n")
    return text


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    ap.add_argument("--part", choices=[*map(str, PARTS), "all"], default="all",
                    help="1: imports, gpu tests, kernel, SD 1.5 memory/time; 2: SDXL, reward models; 3: SD 3.5 "
                         "(default all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"wall-clock budget of each part (default {PART_BUDGET_S:g}; smoke {SMOKE_BUDGET_S:g})")
    ap.add_argument("--tests", nargs="*", default=None, help="paths for pytest -m gpu (default: the test files "
                                                             "with gpu-marked tests)")
    ap.add_argument("--skip", nargs="*", default=[], choices=[n for names in PARTS.values() for n in names])
    ap.add_argument("--json", type=Path, default=None,
                    help="default $LOWMEM_NABLAGFN_CACHE/gpu_validate/partN-DATE.json (outside the repository); "
                         "the RESULTS.md section goes next to it as .md after every section")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to append to when the run ends (default benchmarks/RESULTS.md; --smoke: none)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run it on a GPU, or --smoke for the CPU check of the code paths")
    device = torch.device("cpu" if smoke else "cuda")
    from lowmem_nablagfn import results

    parts = list(PARTS) if args.part == "all" else [int(args.part)]
    out: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": results.machine(), "smoke": smoke, "parts": parts,
                 "command": " ".join(["python benchmarks/gpu_validate.py", *(sys.argv[1:] if argv is None else argv)])}
    json_path = args.json or default_json(args.part, smoke)
    texts: Dict[str, str] = {}
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_validate_"))  # the profiled runs' output directories
    base = SMOKE_BASE if smoke else GPU_BASE

    # each section: budget -> (JSON value, markdown)
    def imports_section(b):
        r = imports(base)
        return r, f"Doctor (`lowmem-nablagfn doctor`):\n\n```\n{r['table']}\n```"

    def tests_section(b):
        paths = args.tests if args.tests is not None else gpu_test_files()
        r = run_gpu_tests(paths, timeout=max(30.0, min(120.0, b.left() / 2)))
        return r, f"gpu-marked tests (`{r['command']}`): {r['summary']}"

    def subsample_section(b):
        r = subsampling("4x10x4x8x8" if smoke else "64x50x4x64x64", device, repeats=2 if smoke else 10)
        return r, f"Copy bandwidth {r['copy_gb_s']:.1f} GB/s\n\n{r['table']}"

    def memory_section(b):
        r = memory_and_time(base, tmp / "memory", b, smoke)
        return r, memory_table(r)

    def sdxl_section(b):
        r = sdxl(tmp / "sdxl", b, smoke, reserve_s=0.0 if smoke or "rewards" in args.skip else REWARDS_RESERVE_S)
        return r, sdxl_table(r)

    def rewards_section(b):
        r = reward_models(["builtin:redness", "aesthetic"] if smoke else ["aesthetic", "hpsv2", "imagereward"],
                          "random:reduced" if smoke else "random", 2 if smoke else 4, 64 if smoke else 512, device, b)
        return r, rewards_table(r)

    def sd3_section(b):
        import gpu_sd3  # benchmarks/gpu_sd3.py

        r = gpu_sd3.sd3(tmp / "sd3", b, smoke)
        return r, gpu_sd3.sd3_table(r)

    sections = {"imports": imports_section, "tests": tests_section, "subsample": subsample_section,
                "memory": memory_section, "sdxl": sdxl_section, "rewards": rewards_section, "sd3": sd3_section}
    try:
        for part in parts:
            budget = Budget(args.budget_s or (SMOKE_BUDGET_S if smoke else PART_BUDGET_S))
            try:
                with deadline(budget):
                    for name in PARTS[part]:
                        if name not in args.skip and budget.left() > 0:
                            run_section(name, lambda: sections[name](budget), out, texts)  # noqa: B023
                            save(out, texts, json_path)
            except OutOfTime:  # between two sections (a section's own is caught in run_section)
                pass
            for name in PARTS[part]:
                if name not in args.skip and name not in out:
                    out[name], texts[name] = {"skipped": "time budget"}, f"**{name}**: skipped (time budget)"
            out.setdefault("part_seconds", {})[str(part)] = budget.seconds - budget.left()
            if part == 1:
                try:
                    from lowmem_nablagfn.planner import cuda_vram_gib

                    memory = out["memory"] if isinstance(out.get("memory"), list) else []
                    sub = out["subsample"] if "methods" in out.get("subsample", {}) else None
                    out["verdict"] = verdict(memory, sub, None if smoke else cuda_vram_gib())
                    texts["verdict"] = "Targets:\n\n" + "\n".join(f"- {v}" for v in out["verdict"])
                except Exception as exc:  # noqa: BLE001 - the measurements are written all the same
                    texts["verdict"] = f"**verdict**: failed: {_error(exc)}"
            save(out, texts, json_path)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    out["seconds"] = time.perf_counter() - t_start
    text = save(out, texts, json_path)
    print(text)
    print(f"JSON written to {json_path} (markdown: {json_path.with_suffix('.md')})")
    results_path = args.results or (None if smoke else ROOT / "benchmarks" / "RESULTS.md")
    if results_path is not None:
        notes = (f"{'SMOKE (tiny model, CPU: checks the code paths, not the figures)' if smoke else 'random weights'}; "
                 f"part {args.part}, {out['seconds']:.0f} s in all; planner constants as of this commit; "
                 f"JSON: {json_path.name}")
        results.append_results(results_path, f"GPU validation, part {args.part}" + (" (smoke)" if smoke else ""),
                               out["command"], text, notes)
        print(f"appended to {results_path}")
    return out


if __name__ == "__main__":
    main()
