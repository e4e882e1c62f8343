"""SD 3.5 Medium shapes on the CPU: the measured memory of every phase of one training round next to the
planner's prediction, at a reduced resolution (issue #26: the CPU check of the SD 3 predictions, as
benchmarks/sdxl_cpu_memory.py is SDXL's).

    python benchmarks/sd3_cpu_memory.py                         # sd35m-random, 128 px, 1 trajectory (~21 GB RAM, ~5 min a variant)
    python benchmarks/sd3_cpu_memory.py --resolution 256 --trajectories 2   # ~30 GB RAM
    python benchmarks/sd3_cpu_memory.py --smoke                 # tiny-sd3, 64 px (the test suite runs it)

Sizes (planner, live bytes): at 256 px with 2 trajectories the official schedule peaks at 25 GiB, the
preset at 12.8 GiB; at 128 px with 1 trajectory 15.3 and 11.9 GiB (measured), the process's resident set
about 3.5 GB above that.  A round at 128 px takes about 5 minutes on one core, most of it the transformer
(2 x 10 sampling calls, then the update's passes), set-up about a minute.

Workload: the ``sd35m_rtx4090`` preset with ``pretrained.model=sd35m-random`` (Stable Diffusion 3.5
Medium's architecture, random weights: the 2.5 B MMDiT-X transformer, the 16-channel SD 3 VAE), the
aesthetic reward at full size with random weights (CLIP ViT-L/14 + head), flow-sde, CFG 4.5, LoRA, on
the CPU in fp32, at ``--resolution`` instead of 1024 px.  Sampling is cut to T = 10 steps
(``timestep_fraction`` 0.1: K = 1, two kept transitions each) and ``--trajectories`` trajectories per
update, so that a round takes minutes, not hours; the phases and their code are those of a full run.

The prompts are encoded once into the prompt cache (:mod:`lowmem_nablagfn.models.prompt_cache`,
``$XDG_CACHE_HOME``) by the CLIP encoders alone, which are released before the transformer loads;
``pretrained.t5=false``, because T5-XXL alone is 19 GB in fp32 (more than a 24 GB host spares) — its
part of the table is then zeros of the same shape (N × (77 + 256) × 4096), so no phase changes size.
The table stays resident in host memory, and the measurement counts it (``profiler``: SD 3's prompt
table stands where the UNet families' text encoders stand).

The models are loaded once per objective; each variant switches the memory plan in place
(:func:`reconfigure`) and runs one profiled round (``profiler.run_profile``: encode, sample, final
reward, the update's phases, the optimiser step):

* ``official`` — the official code's schedule (``planner.OFFICIAL_OVERRIDES``);
* ``preset``   — the ``sd35m_rtx4090`` memory settings as shipped (transformer, VAE and reward
  checkpointing, passes in chunks of a few rows);
* ``nockpt``   — the preset without transformer checkpointing (the MMDiT's activations kept through
  the training pass);
* ``nof``      — no-flow with offloaded trajectories (``model.no_flow=true memory.offload_trajectories=true``).

Memory is the CPU's :class:`~lowmem_nablagfn.memtrack.LiveBytes` and the prediction ``planner.predict``
for the same configuration with ``device=cpu``, as in benchmarks/sdxl_cpu_memory.py (whose per-variant
measurement, optimiser warm-up and table this script shares).  Prints a table and appends it to
benchmarks/RESULTS.md (``--no-results``: not).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from gpu_common import QUIET  # noqa: E402
from sdxl_cpu_memory import chosen, cpu_memory_parser, measure_variants, table, write_results  # noqa: E402

PRESET = "sd35m_rtx4090"
TITLE = "SD 3.5 Medium shapes on the CPU: measured vs planner"
#: variant -> overrides on top of the workload (``official``: the planner's official baseline of it).
VARIANTS: Dict[str, List[str]] = {
    "official": [],
    "preset": [],
    "nockpt": ["memory.checkpoint_unet=false"],
    "nof": ["model.no_flow=true", "memory.offload_trajectories=true"],
}
#: ``--smoke``: tiny_cpu's flow model (the preset's full-width one is most of the smoke's seconds and none of its code).
SMOKE = ["model.flow_block_widths=[16,32]"]


def workload(model: str, resolution: int, trajectories: int, out_dir: str, extra: List[str]) -> List[str]:
    return [f"pretrained.model={model}", "pretrained.t5=false", "reward.checkpoint=random" if model == "sd35m-random"
            else "reward.checkpoint=random:reduced", "reward.weight_dtype=fp32", "device=cpu",
            "training.mixed_precision='no'", f"sampling.resolution={resolution}", "sampling.num_steps=10",
            "model.timestep_fraction=0.1", f"sampling.batch_size={trajectories}", "sampling.num_batches_per_epoch=1",
            f"training.batch_size={trajectories}", "training.gradient_accumulation_steps=1",
            "training.on_policy=true", f"logging.output_dir={out_dir}", *QUIET, *extra]


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    ap = cpu_memory_parser(__doc__, VARIANTS, 128, 1, "tiny-sd3")
    ap.add_argument("--preset", default=PRESET, help=f"the workload's preset (default {PRESET})")
    args = ap.parse_args(argv)
    variants = chosen(ap, args, VARIANTS)
    model = "tiny-sd3" if args.smoke else "sd35m-random"
    res = args.resolution or (64 if args.smoke else 128)
    with tempfile.TemporaryDirectory() as tmp:
        base = workload(model, res, args.trajectories, tmp, (SMOKE if args.smoke else []) + args.overrides)
        out = measure_variants(args.preset, base, variants, f"{model}, {res} px")
    text = table(out)
    print(text)
    write_results(args, TITLE, text,
                  f"{model}, {res} px, fp32 on the CPU, {args.preset} preset (flow-sde, CFG 4.5, LoRA, aesthetic "
                  f"reward ViT-L/14 random weights fp32; prompt table of 77 + 256 tokens without T5, resident), "
                  f"T = 10, {args.trajectories} trajectories x 2 kept transitions per update"
                  f"{'; overrides ' + ' '.join(args.overrides) if args.overrides else ''}; measured: memtrack.LiveBytes "
                  f"over one profiled round after the optimiser state exists; predicted: planner.predict (device=cpu, "
                  f"no GPU allowances). {machine()}")
    return out


if __name__ == "__main__":
    main()
