"""Predict the peak memory of a training configuration phase by phase — no GPU needed — and propose
the fastest configuration that fits a card.

How a prediction is made
------------------------
1. **Exact bytes** — the configuration's models are built on the ``meta`` device (no memory, a few
   seconds even for SD 1.5): UNet with its LoRA adapter, VAE, text encoder, flow model, reward model,
   frozen parts cast to ``training.mixed_precision``, reward weights to ``reward.weight_dtype``.  Weights,
   gradients (fp32, trainable parameters), optimiser state (AdamW: 8 bytes per trainable parameter;
   8-bit AdamW: 2 bytes for tensors of >= 4096 elements, 8 below, as bitsandbytes does) and the stored
   trajectories follow from parameter counts, dtypes and the batch arithmetic.
2. **Traced activations** — the models are materialised as ``FakeTensor``s (shapes and dtypes, no
   data, no compute) and each pass runs *at the configuration's resolution* under a
   :class:`~lowmem_nablagfn.memtrack.LiveBytes` tracker, which sums the storages every aten op
   returns (saved activations, temporaries, gradients).  Tracing costs the same at any size (a full SD 1.5
   UNet forward + backward traces in ~10 s on a CPU), so nothing is extrapolated in resolution.  Each
   probe runs at 1 and 2 rows; activations are linear in rows (a constant plus a per-row slope), which
   gives any chunk size.  Probes, per checkpointing flag: the policy UNet with ``x̂0`` (the first link of
   a reward-gradient chain), the VAE decoder, the reward model (forward, retained backward, backward),
   the reference pass (:func:`~lowmem_nablagfn.memory.reference_scores`), the training pass
   (:func:`~lowmem_nablagfn.memory.train_pass`), the sampler's no-grad UNet, the final reward, the text
   encoder; the executor running the naive plan (:func:`~lowmem_nablagfn.memory.accumulate_gradients`)
   is traced whole, phase by phase.  Results are cached per architecture (JSON under
   ``~/.cache/lowmem_nablagfn/planner``; SD 1.5 at 512 px and SDXL at 1024 px ship in ``planner_profiles/``).
3. **Composition** — the phases of the run's plan (``memory.build_plan(cfg)``: the executor's phases in
   its order, and its row arithmetic), each costed by its name, chunk, ``live_only`` and ``keep_graph``.  A reward-gradient pass
   keeps the UNet graph while the VAE and the reward run, so its peak is the largest of
   ``Pf_U``, ``F_U + Pf_V``, ``F_U + F_V + max(Pf_R, Pb_R)``, ``F_U + Pb_V``, ``Pb_U`` (``F``: bytes a
   forward leaves alive, ``Pf``/``Pb``: forward/backward peaks).  Each phase adds what stays resident:
   weights, optimiser state, gradients, stored trajectories, the batch's rows.
4. **GPU-only memory** (a configuration with ``device`` other than ``cpu``): what the CPU trace cannot
   see is added as allowances — cuDNN convolution workspaces and the fused-attention backward's
   scratch per phase (:data:`CUDNN_WORKSPACE_GIB`, :data:`ATTN_SCRATCH_BYTES`) — and the attention
   passes are traced with the kernel the card and dtype get (:func:`sdpa_kernel`; the math kernel's
   attention matrices are materialised in the trace, with a warning).  ``Prediction.peak`` is then the
   predicted ``max_memory_allocated``; ``reserved_gib`` adds allocator fragmentation
   (:data:`FRAGMENTATION` with ``expandable_segments:True``, which the launchers set), and a card fits
   when ``reserved + CUDA context (per card class) + MIN_SLACK_GIB <= card memory``.  Every GPU constant
   is an estimate until ``benchmarks/gpu_validate.py`` has measured it (its source is noted beside it).

The proposal
------------
Candidates keep the objective and everything that changes the update's numbers, and vary the exact
memory knobs; the first tier with a fitting candidate wins, the fastest inside it by the estimated
cost (traced FLOPs, checkpoint recomputation included, plus a per-call overhead that favours large
chunks and batches):

1. checkpointing flags, ``memory.input_grad_chunk``, ``memory.train_chunk``, ``training.batch_size``
   (with ``gradient_accumulation_steps`` raised to keep the trajectories per update) and
   ``sampling.batch_size`` (with ``num_batches_per_epoch`` raised);
2. + ``memory.offload_text_encoder`` and ``memory.offload_trajectories``;
3. + 8-bit AdamW (changes optimiser numerics slightly);
4. + ``model.no_flow`` (changes the objective: the last resort).

Where things are
----------------
- :mod:`.meta` — the models on the meta device, exact sizes, the architecture key;
- :mod:`.gpu` — card classes, GPU-only allowances, the attention-kernel model;
- :mod:`.trace` — the probes on fake tensors; :mod:`.profile` — their cached results;
- :mod:`.costs` — the cost of each phase of the memory plan the executor runs
  (``memory.build_plan``); :mod:`.prediction` — the composition;
- :mod:`.search` — candidates, proposals, the checks ``train`` runs;
- :mod:`.cli` — the ``plan`` subcommand and its reports.
"""
from .cli import add_parser, describe, gpu_presets, prediction_table, run, table
from .gpu import (ATTN_SCRATCH_BYTES, CARD_CAPABILITY, CARDS, CONTEXT_GIB, CONTEXT_GIB_BY_MAJOR, CUDNN_WORKSPACE_GIB,
                  DEFAULT_CAPABILITY, FRAGMENTATION, FRAGMENTATION_FIXED_SEGMENTS, MIN_SLACK_GIB, attention_kernels,
                  card_context_gib, cuda_vram_gib, default_capability, fragmentation_default, parse_vram, sdpa_kernel)
from .meta import (PROBE_VERSION, Models, arch_key, build_meta, key_hash, model_configs, nbytes, sd_configs,
                   static_sizes)
from .costs import CALL_OVERHEAD, COSTS, PhaseCost, update_costs
from .prediction import Prediction, optimizer_state_bytes, predict
from .probes import SHIPPED, MissingProbe, Probes, cache_dir
from .search import (KNOBS, OFFICIAL_OVERRIDES, Proposal, candidates, check_fits, fit_check, official_baseline,
                     overrides, propose)
from .trace import FlopCount, Tracer

__all__ = ["ATTN_SCRATCH_BYTES", "CALL_OVERHEAD", "COSTS", "CARD_CAPABILITY", "CARDS", "CONTEXT_GIB", "CONTEXT_GIB_BY_MAJOR",
           "CUDNN_WORKSPACE_GIB", "DEFAULT_CAPABILITY", "FRAGMENTATION", "FRAGMENTATION_FIXED_SEGMENTS",
           "KNOBS", "MIN_SLACK_GIB", "OFFICIAL_OVERRIDES", "PROBE_VERSION", "SHIPPED", "FlopCount",
           "MissingProbe", "Models", "PhaseCost", "Prediction", "Probes", "Proposal", "Tracer", "add_parser", "arch_key",
           "attention_kernels", "build_meta", "cache_dir", "candidates", "card_context_gib", "check_fits",
           "cuda_vram_gib", "default_capability", "describe", "fragmentation_default", "gpu_presets",
           "key_hash", "model_configs", "nbytes", "official_baseline", "optimizer_state_bytes", "overrides", "parse_vram",
           "fit_check", "prediction_table", "predict", "propose", "run", "sd_configs", "sdpa_kernel", "static_sizes", "table", "update_costs"]
