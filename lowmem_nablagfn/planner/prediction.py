"""Prediction: the phases of the update composed from the profile's probes and the exact bytes.

:func:`predict` adds, per phase of the training step, what stays resident (weights, optimiser state,
gradients, stored trajectories, the batch's rows) to the traced activations of the phase's passes, and
on a GPU the allowances of :mod:`.gpu`; it also estimates the work of one update (traced FLOPs plus a
per-call overhead), which ranks the search's candidates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..config import Config
from ..dtypes import DTYPES
from ..memory import MemoryPlan, build_plan
from ..memtrack import GiB
from .gpu import (ATTN_SCRATCH_BYTES, DEFAULT_CAPABILITY, MIN_SLACK_GIB, attention_extent, attention_kernels,
                  card_context_gib, cudnn_workspace_bytes, default_capability, fragmentation_default)
from .costs import CALL_OVERHEAD, update_costs
from .monitor import monitor_cost
from .probes import Probes


@dataclass
class Prediction:
    """Predicted peak bytes of each phase of a configuration (on the training device, per process)."""

    phases: Dict[str, float]
    resident: Dict[str, float]
    """What stays allocated through the training phases: weights (text encoder included, also when
    offloaded: see ``text_encoder``), optimiser state, gradients, trajectories, the batch's rows."""
    tflop_per_update: float
    """Estimated work of one optimiser update incl. its share of sampling (TFLOP + per-call overhead)."""
    capability: Tuple[int, int] = DEFAULT_CAPABILITY
    """The card's compute capability the prediction assumes (attention kernel, CUDA context)."""
    kernels: Dict[str, str] = field(default_factory=dict)
    """Attention kernel per model (``flash`` / ``mem_efficient`` / ``math``) on that card."""
    allowances: Dict[str, float] = field(default_factory=dict)
    """GPU-only bytes included in each phase (cuDNN workspace + attention scratch; 0 on the CPU)."""
    notes: List[str] = field(default_factory=list)
    """Warnings (e.g. the math attention kernel would run)."""

    @property
    def peak(self) -> float:
        """Predicted ``max_memory_allocated`` (bytes)."""
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def reserved_gib(self, fragmentation: Optional[float] = None) -> float:
        """Predicted ``max_memory_reserved`` (GiB): the peak plus allocator fragmentation."""
        frag = fragmentation_default() if fragmentation is None else fragmentation
        return self.peak / GiB * (1 + frag)

    def required_gib(self, fragmentation: Optional[float] = None, context_gib: Optional[float] = None,
                     slack_gib: float = MIN_SLACK_GIB) -> float:
        """Card memory needed: reserved + CUDA context (outside the allocator) + the minimum slack."""
        ctx = card_context_gib(self.capability) if context_gib is None else context_gib
        return self.reserved_gib(fragmentation) + ctx + slack_gib

    def fits(self, vram_gib: float, fragmentation: Optional[float] = None,
             context_gib: Optional[float] = None) -> bool:
        return self.required_gib(fragmentation, context_gib) <= vram_gib


def optimizer_state_bytes(cfg: Config, numels: Sequence[int]) -> float:
    if cfg.training.optimizer == "adamw":
        return 8.0 * sum(numels)
    # bitsandbytes: 8-bit states (1 byte each, 2 states) + fp32 absmax per 2048-block for tensors of
    # >= 4096 elements (min_8bit_size); 32-bit states below
    return sum(2 * n + 8 * math.ceil(n / 2048) if n >= 4096 else 8 * n for n in numels)


def predict(cfg: Config, profile: Probes, capability: Optional[Tuple[int, int]] = None,
            plan: Optional[MemoryPlan] = None) -> Prediction:
    """Phase-by-phase peak bytes of ``cfg`` (same architecture as ``profile``) on a card of this
    compute ``capability`` (default: :func:`default_capability`).  ``plan``: the run's memory plan of
    ``cfg`` when it is already built (``train``'s fit check); default: built here.

    The phases are those of the plan, in its order (:attr:`~lowmem_nablagfn.memory.MemoryPlan.phase_order`);
    the row arithmetic is the plan's.  The update's phases are the executor's, costed by
    :mod:`.costs`.  On the CPU (``device=cpu``) the phases are what the live-bytes tracker measures; on
    a GPU they add the cuDNN workspace and attention scratch allowances, and the attention passes are
    traced with the kernel the card and dtype get (the math kernel's attention matrices included)."""
    st, t = profile.static, cfg.training
    plan = plan if plan is not None else build_plan(cfg)
    placement, bt, residual = plan.placement, plan.batches, plan.residual
    capability = tuple(capability or default_capability(cfg))
    gpu = cfg.device != "cpu"
    kernels = attention_kernels(cfg, profile.models, capability) if gpu else {}
    math_u = {"math": True} if kernels.get("unet") == "math" or kernels.get("vae") == "math" else {}
    math_f = {"math_flow": True} if kernels.get("flow") == "math" else {}
    c, h, w = st["latent_shape"]
    latent = c * h * w
    text = st["text_row"]
    storage = placement.storage_dtype.itemsize  # kept transitions
    kept = bt.kept
    numels = list(st["trainable_numels"])
    if not residual:
        numels = numels[:len(profile.models.lora_params)]

    # resident bytes
    weights = st["unet"] + st["lora"] + st["vae"] + st["reward"] + (st["flow"] if residual else 0)
    host_is_device = not gpu  # on the CPU the offloading knobs move nothing: host memory is the device's
    text_encoder = 0 if placement.offload_text_encoder and not host_is_device else st["text_encoder"]
    opt = optimizer_state_bytes(cfg, numels)
    grads = 4.0 * sum(numels)
    per_traj = kept * 3 * latent * storage + text + latent * 4 + kept * 8 + 4
    n_epoch, lag = bt.trajectories_per_epoch, bt.held_epochs
    if placement.offload_trajectories and not host_is_device:
        traj_train, traj_sample = 0.0, bt.sampling_batch * per_traj
    else:
        traj_train, traj_sample = lag * n_epoch * per_traj, lag * n_epoch * per_traj
    if not placement.store_only_trained:  # all T steps of the sampling batch are stored, then gathered
        traj_sample += bt.sampling_batch * bt.num_steps * 3 * latent * storage
    base = weights + text_encoder + opt
    if host_is_device:  # SD 3.x's prompt table waits in host memory: the CPU's own (0 for the UNet families)
        base += st["prompt_table"]

    # sampling, encode, final reward (no graph)
    b = bt.sampling_batch
    loop = 5 * b * latent * 4
    fixed = {}
    fixed["encode"] = base + traj_sample + (st["text_encoder"] - text_encoder) + profile.get("encode", rows=b)["Pi"]
    fixed["sampling"] = base + traj_sample + loop + profile.get("unet_sample", math_u, rows=b)["Pi"]
    vae_ng, rew_ng = profile.get("vae_nograd", math_u, rows=b), profile.get("reward_nograd", rows=b)
    fixed["final_reward"] = base + traj_sample + max(vae_ng["Pi"], vae_ng["Out"] + rew_ng["Pi"])

    # one training batch of R = B(K+1) rows: the plan's phases above what stays resident
    rows = bt.rows
    batch = bt.train_batch * per_traj + rows * (3 * latent * 4 + text) + 4 * rows * latent * 4
    train_base = base + grads + traj_train + batch
    # The gradients are freed after each optimiser step (zero_grad(set_to_none=True)) and created by the
    # training pass's backward: without accumulation, the optimised plan's phases before "train" run
    # without them (a keep-graph plan's backward runs per slot and DeepSpeed keeps its gradient buffers).
    fresh_grads = (bt.accumulation == 1 and not any(ph.keep_graph for ph in plan.phases)
                   and cfg.distributed.backend != "deepspeed")
    costs = update_costs(profile, plan, math_u, math_f)
    train_flops = sum(cost.flops for cost in costs.values())
    # foreach AdamW (torch's default on CUDA) holds two fp32 temporaries per parameter; the CPU runs the
    # per-tensor loop (one tensor's temporaries: the largest LoRA or flow weight)
    step_tmp = 2.0 * 4 * (sum(numels) if gpu else max(numels, default=0))
    fixed["optimizer"] = base + grads + traj_train + step_tmp
    monitor = monitor_cost(cfg, profile) if plan.monitor else None
    if monitor is not None:  # one watched reward at a time on the device, beside what sampling holds
        fixed["monitor"] = base + traj_sample + monitor.phase
    phases = {}
    for name in plan.phase_order:  # the plan's order; a phase over no rows is absent from ``costs``
        if name in fixed:
            phases[name] = fixed[name]
        elif name in costs:
            phases[name] = train_base + costs[name].peak - (grads if fresh_grads and name != "train" else 0.0)
    if monitor is not None and host_is_device:  # the watched rewards wait in host memory: the CPU's own
        phases = {name: v + monitor.host_resident for name, v in phases.items()}

    # GPU-only memory (allowances; see the constants): cuDNN workspaces, attention backward scratch
    allowances = {name: 0.0 for name in phases}
    notes = []
    if gpu:
        workspace = cudnn_workspace_bytes(profile.models, (h, w), DTYPES[t.mixed_precision].itemsize)
        scratch = ATTN_SCRATCH_BYTES * attention_extent(profile.models, (h, w))
        for name in phases:
            if name in costs:  # a pass with a backward: workspace and the scratch of one call's rows
                allowances[name] = workspace["grad"] + scratch * costs[name].call_rows
            elif name in ("sampling", "final_reward", "monitor"):
                allowances[name] = workspace["nograd"]
            phases[name] += allowances[name]
        math_parts = [k for k, v in kernels.items() if v == "math"]
        if math_parts:
            why = ("memory.attention=math" if placement.attention == "math" else
                   f"{t.mixed_precision} attention on a sm{capability[0]}{capability[1]} card has neither a flash "
                   f"nor a memory-efficient kernel (bf16 needs sm80+; use training.mixed_precision=fp16)")
            notes.append(f"attention of the {', '.join(math_parts)} runs on the math SDPA kernel ({why}): "
                         f"the attention matrices are materialised (included in the prediction)")

    # work of one update: its training batches plus its share of the epoch's sampling
    sample_call = profile.get("unet_sample", rows=b)["flops_f"] + CALL_OVERHEAD * profile.get("unet_sample", rows=1)["flops_f"]
    sample_flops = bt.sampling_batches * bt.num_steps * sample_call
    tflop = (bt.accumulation * train_flops + sample_flops / bt.updates_per_epoch) / 1e12
    resident = {"weights": weights + st["text_encoder"], "text_encoder": st["text_encoder"],
                "optimizer_state": opt, "gradients": grads, "trajectories": traj_train, "batch_rows": batch}
    return Prediction(phases, resident, tflop, capability, kernels, allowances, notes)

