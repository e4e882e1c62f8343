"""Part 3 of the GPU validation (issue #26): Stable Diffusion 3.5 Medium (MMDiT, flow matching) at
1024 px, measured next to the planner's prediction.  Run through ``benchmarks/gpu_validate.py``::

    python benchmarks/gpu_validate.py --part 3            # GPU, <= 5 min on an H100
    python benchmarks/gpu_validate.py --part 3 --smoke    # tiny-sd3 at 64 px on the CPU (tests/test_gpu_sd3.py)

Targets (:data:`SD3_TARGETS`): the ``sd35m_rtx4090`` preset with ``sd35m-random`` (SD 3.5 Medium's
architecture, random weights), residual ∇-DB on a 24 GB card and its no-flow variant for 16 GB cards.
Each is built once and runs one profiled round (sample, one update) without warm-up: peak
``max_memory_allocated`` per phase and ``max_memory_reserved`` over the round, time per update (a cold
first round) and sampling time, next to the planner's prediction from a shipped or cached SD 3 trace
(none traced here: tracing SD 3.5 at 1024 px takes minutes of CPU); where the planner has none or
fails, the row says why and the measurement still runs.

**Without T5** (``pretrained.t5=false``, :data:`NO_T5`).  SD 3 prompts are encoded once into the prompt
cache (``models/prompt_cache.py``) before the transformer is loaded; no text encoder is resident while
training.  Without T5 its part of the conditioning is zeros of the same shape — ``(B, 77 + 256, 4096)``:
``pretrained.max_sequence_length`` is unchanged — so the transformer sees tensors of the same shapes and
dtypes, and nothing in sampling, the reward or the update depends on the conditioning's values (dense
attention with no text mask, no data-dependent branch): the training phases' memory and time do not
depend on T5 (up to second-order effects of the values on a GPU's power and clocks).
tests/test_gpu_sd3.py checks this on tiny-sd3 (the phases' live bytes with and without T5 are equal),
and each measured row records its conditioning shape.  What T5 costs is building T5-XXL's 4.7 B random
parameters on the CPU (a minute or more: ~0.06 B parameters/s on one core here) and ~11 GB of the card
(T5-XXL and both CLIPs in bf16) for a few seconds, once per prompt set, before training: the last row
(:func:`t5_prompt_cache`) measures that step alone when the budget leaves time for it.  The planner
predicts the preset as users run it (T5 on), the configuration a shipped trace is made for.

Budget (estimates for an H100 until measured; 240 s of the part's 5 minutes): a training target about
:data:`SD3_ESTIMATE_S` (building the 2.2 B transformer and the two CLIP encoders on the CPU, then one cold
round at 1024 px), the T5 row :data:`T5_ESTIMATE_S`.  A target starts only when its expected time (the
estimate, then the previous target's measured time) fits the budget left; with T5 in the training
targets the second would not.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from gpu_common import QUIET, SMOKE_BASE, Budget, OutOfTime, _error, _pct, measure, measured_target  # noqa: E402

#: (preset, overrides) of the GPU run and of the smoke run.
SD3_GPU = ("sd35m_rtx4090", ["pretrained.model=sd35m-random", "reward.checkpoint=random", "training.on_policy=true",
                             "device=cuda"])
SD3_SMOKE = ("tiny_cpu", ["pretrained.model=tiny-sd3", "sampling.scheduler=flow-sde", *SMOKE_BASE[1]])
#: Measured without T5 (the module docstring says why); predicted with the preset's own setting.
NO_T5 = ["pretrained.t5=false"]
#: (label, overrides, the planner's card class it must fit: ``planner.CARDS``).
SD3_TARGETS = [("SD 3.5 M residual (the preset as is)", [], "RTX4090-24"),
               ("SD 3.5 M no-flow, 16 GB variant", ["model.no_flow=true", "memory.input_grad_chunk=1"], "V100-16")]
#: Expected seconds of one training target on an H100 before one has been measured: the transformer
#: (2.2 B), CLIP-L and OpenCLIP bigG (0.8 B, the prompt cache) and the reward built on the CPU (~40 s),
#: one cold round at 1024 px (~60 s: the preset's T sampling steps with CFG, then 4 trajectories'
#: trained transitions).  An estimate.
SD3_ESTIMATE_S = 110.0
#: Expected seconds of :func:`t5_prompt_cache` on an H100: T5-XXL's random weights on the CPU dominate.
T5_ESTIMATE_S = 90.0


def sd3(out_dir: Path, budget: Budget, smoke: bool) -> dict:
    """Part 3: ``{"targets": rows, "t5_prompt_cache": row}``.  A target that fails (out of memory, a
    missing package, a planner error) is reported in its row and the next one runs; one stopped by the
    part's alarm is reported in its row and the rows measured before it are kept."""
    from lowmem_nablagfn import loop as T
    from lowmem_nablagfn import planner
    from lowmem_nablagfn.config import load_config
    from lowmem_nablagfn.memtrack import GiB

    preset, extra = SD3_SMOKE if smoke else SD3_GPU
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() and not smoke else None
    common = [*extra, *QUIET, f"logging.output_dir={out_dir}"]
    rows: List[dict] = []
    out = {"targets": rows, "t5_prompt_cache": None}
    expected, stopped = (0.0 if smoke else SD3_ESTIMATE_S), None
    for name, overrides, card in SD3_TARGETS:
        row = {"target": name, "card": card, "card_gib": planner.CARDS[card], "overrides": overrides + NO_T5,
               "context_gib": planner.card_context_gib(planner.CARD_CAPABILITY[card])}  # outside the allocator
        rows.append(row)
        if stopped or budget.left() < expected:
            row["skipped"] = stopped or f"time budget ({budget.left():.0f} s left, about {expected:.0f} s needed)"
            continue
        t0 = time.perf_counter()
        try:
            with measured_target(row) as held:
                try:  # the preset as users run it (T5 on): the configuration a shipped trace is made for
                    as_run = load_config(preset, common + overrides)
                    pred = planner.predict(as_run, planner.Probes(as_run, allow_trace=smoke), capability)
                    row.update(predicted_peak_gib=pred.peak / GiB, predicted_reserved_gib=pred.reserved_gib(),
                               predicted_phase=pred.peak_phase,
                               predicted_phases_gib={k: v / GiB for k, v in pred.phases.items()})
                except planner.MissingProbe as exc:
                    row["prediction"] = f"no SD 3 trace shipped or cached ({exc})"
                except Exception as exc:  # noqa: BLE001 - measured all the same
                    row["prediction"] = f"planner failed: {_error(exc)}"
                cfg = load_config(preset, common + overrides + NO_T5)
                held["c"] = T.setup(cfg)
                row["conditioning"] = list(held["c"].uncond.prompt_embeds.shape[1:])  # (77 + T5 tokens, width)
                row.update(measure(held["c"], cfg, 0))  # no warm-up: the peak is the point, the time a cold round
        except OutOfTime as exc:  # the part's alarm: what was measured is kept, nothing more starts
            row["skipped"] = stopped = str(exc)
        expected = time.perf_counter() - t0
        print(f"[sd3] {name}: {row}", flush=True)
    if stopped or budget.left() < (0.0 if smoke else T5_ESTIMATE_S):
        out["t5_prompt_cache"] = {"skipped": stopped or f"time budget ({budget.left():.0f} s left, about "
                                                        f"{T5_ESTIMATE_S:.0f} s needed)"}
        return out
    try:
        out["t5_prompt_cache"] = t5_prompt_cache(load_config(preset, common), out_dir / "prompt-cache")
    except (Exception, OutOfTime) as exc:  # noqa: BLE001 - reported with the rows above
        out["t5_prompt_cache"] = {"skipped": _error(exc)}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def t5_prompt_cache(cfg, cache_dir: Path) -> dict:
    """The one step the training targets leave out: the run's prompts through CLIP-L, OpenCLIP bigG and
    T5-XXL into an empty prompt cache at ``cache_dir`` (what the first ``train`` on a prompt set does
    before loading the transformer).  Seconds (building the encoders' random weights on the CPU
    included), peak allocated / reserved on the GPU (None on the CPU), the conditioning's shape."""
    from lowmem_nablagfn.distributed import pick_device
    from lowmem_nablagfn.dtypes import to_dtype
    from lowmem_nablagfn.memtrack import GiB
    from lowmem_nablagfn.models.family import prompt_table, run_prompts
    from lowmem_nablagfn.models.sd3 import TextOptions

    p, device = cfg.pretrained, pick_device(cfg.device)
    cuda = device.type == "cuda"
    prompts = run_prompts(cfg.prompts.set)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    table = prompt_table(p.model, p.revision, p.seed, TextOptions(p.max_sequence_length, t5=True), prompts,
                         f"{p.model}-{cfg.prompts.set}", device, to_dtype(cfg.training.mixed_precision), cache_dir)
    if cuda:
        torch.cuda.synchronize(device)
    return {"prompts": len(prompts), "seconds": time.perf_counter() - t0,
            "conditioning": list(table.table.prompt_embeds.shape[1:]),
            "peak_gib": torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if cuda else None}


def _gib(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


def sd3_table(res: dict) -> str:
    """Markdown: one row per target, the planner's notes, each target's phases, the T5 prompt-cache line."""
    lines = ["| SD 3.5 target | card (GiB) | peak allocated (GiB) | predicted | error | peak reserved (GiB) | "
             "predicted reserved | fits (reserved + context <= card) | s / update (cold) | sampling s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    phases = ["| SD 3.5 target | phase | peak allocated (GiB) | predicted | error |",
              "| --- | --- | ---: | ---: | ---: |"]
    notes = [f"- {r['target']}: {r['prediction']}" for r in res["targets"] if "prediction" in r]
    for r in res["targets"]:
        card = f"{r['card']} {r['card_gib']:g}"
        if "peak_gib" not in r:  # not measured: why, and what the planner expected
            lines.append(f"| {r['target']} | {card} | {r.get('skipped', '–')} | {_gib(r.get('predicted_peak_gib'))} "
                         f"| | | {_gib(r.get('predicted_reserved_gib'))} | | | |")
            continue
        need = None if r["reserved_gib"] is None else r["reserved_gib"] + r["context_gib"]
        fits = "–" if need is None else f"{'PASS' if need <= r['card_gib'] else 'FAIL'} ({need:.2f})"
        lines.append(f"| {r['target']} | {card} | {_gib(r['peak_gib'])} | {_gib(r.get('predicted_peak_gib'))} | "
                     f"{_pct(r['peak_gib'], r.get('predicted_peak_gib'))} | {_gib(r['reserved_gib'])} | "
                     f"{_gib(r.get('predicted_reserved_gib'))} | {fits} | {r['s_per_update']:.2f} | "
                     f"{r['sample_s']:.2f} |")
        measured, predicted = r["phases_gib"], r.get("predicted_phases_gib", {})
        for ph in [*measured, *(k for k in predicted if k not in measured)]:
            phases.append(f"| {r['target']} | {ph} | {_gib(measured.get(ph))} | {_gib(predicted.get(ph))} | "
                          f"{_pct(measured.get(ph), predicted.get(ph))} |")
    text = "\n".join(lines) + ("\n\nPlanner:\n" + "\n".join(notes) if notes else "")
    return f"{text}\n\n" + "\n".join(phases) + f"\n\n{_t5_line(res)}"


def _t5_line(res: dict) -> str:
    """The T5 prompt-cache row in words, its conditioning shape against the training rows' (without T5)."""
    t5 = res.get("t5_prompt_cache") or {"skipped": "not run"}
    head = "Prompt cache with T5-XXL (once per prompt set, before training; the rows above ran without T5): "
    if "skipped" in t5:
        return head + t5["skipped"]
    shape = tuple(t5["conditioning"])
    without = {tuple(r["conditioning"]) for r in res["targets"] if "conditioning" in r}
    same = "" if not without else (", the same as without T5" if without == {shape} else
                                   f", NOT the {sorted(without)} measured without T5")
    return (f"{head}{t5['prompts']} prompts in {t5['seconds']:.1f} s, peak {_gib(t5['peak_gib'])} GiB allocated / "
            f"{_gib(t5['reserved_gib'])} GiB reserved; conditioning {shape} per prompt{same}")
