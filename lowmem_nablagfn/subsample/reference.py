"""Transition subsampling, PyTorch reference (the source of truth for the fast kernel).

docs/algorithm.md, "Transition subsampling": with ``K = int(T * timestep_fraction)``, each trajectory
trains on the last transition (step index ``T-1``) plus

* low-variance mode: one index drawn uniformly from each of ``K`` equal consecutive blocks of the
  step indices ``0 … T-1`` (``T % K == 0``), blocks taken from the last to the first;
* otherwise: ``K`` distinct indices drawn uniformly from the other ``T-1``;
* ``K == T``: all ``T`` transitions in random order.

Draws are independent per trajectory, vectorised (no Python loop per trajectory or step), and
reproducible from ``(seed, offset)``.

Random numbers come from counter-based Philox4x32-10, bit-identical to Triton's
``tl.randint(seed, counter)``, so that the fused kernel (:mod:`.triton_kernel`) draws exactly the
indices drawn here whatever its launch shape. Each random number is a pure function of
``(seed, counter)`` with ``counter = offset + n``, where ``n`` enumerates (trajectory, slot):

* low-variance mode: ``n = b * K + j`` for trajectory ``b`` and block ``j`` (block ``j`` covers
  steps ``j*T/K … (j+1)*T/K - 1``); the draw is ``j*T/K + r % (T/K)``;
* otherwise: ``n = b * M + i`` with ``M = T-1`` (or ``T`` when ``K == T``), one sort key per
  candidate step ``i``; the kept steps are the ``K`` (or ``T``) smallest keys, in key order.

A call therefore uses the counters ``offset … offset + num_counters(...) - 1``: callers advancing
``offset`` by at least :func:`num_counters` per call get non-overlapping random streams.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

# Philox4x32-10 constants (Salmon et al. 2011), the same as triton.language.random.philox_impl.
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_MAX_COUNTER = 2**63 - 1


class SubsampleError(ValueError):
    """A subsampling setting that cannot work (raised before any sampling)."""


def num_blocks(num_steps: int, timestep_fraction: float) -> int:
    """``K = int(T * timestep_fraction)``, validated."""
    if not 0 < timestep_fraction <= 1:
        raise SubsampleError(f"timestep_fraction={timestep_fraction} must lie in (0, 1]")
    k = int(num_steps * timestep_fraction)
    if k < 1:
        raise SubsampleError(
            f"timestep_fraction={timestep_fraction} keeps int({num_steps}*{timestep_fraction})=0 "
            f"transitions of {num_steps} steps; use at least {1 / num_steps:.3g}")
    return k


def check_blocks(num_steps: int, k: int, low_variance: bool) -> None:
    """Raise :class:`SubsampleError` (naming T, K and the fix) if K transitions cannot be drawn."""
    if k > num_steps or k < 1:
        raise SubsampleError(f"cannot draw K={k} transitions from T={num_steps} steps")
    if low_variance and k < num_steps and num_steps % k != 0:
        divisors = [d for d in range(1, num_steps + 1) if num_steps % d == 0]
        raise SubsampleError(
            f"low-variance subsampling needs the number of steps T={num_steps} to be divisible by "
            f"the number of blocks K={k} (= int(T * timestep_fraction)); choose K among {divisors} "
            f"(timestep_fraction = K / T) or set low_var_subsampling=False")


def num_kept(num_steps: int, k: int) -> int:
    """Transitions kept per trajectory: ``K + 1`` (the last plus K), or ``T`` when ``K == T``."""
    return num_steps if k == num_steps else k + 1


def uses_blocks(num_steps: int, k: int, low_variance: bool) -> bool:
    """Whether the draw is the block draw (low-variance mode with ``K < T``), the kernel's case."""
    return low_variance and k < num_steps


def num_counters(batch: int, num_steps: int, k: int, low_variance: bool) -> int:
    """Philox counters one draw uses: ``B*K`` (blocks), ``B*(T-1)`` (uniform), ``B*T`` (K == T)."""
    if uses_blocks(num_steps, k, low_variance):
        return batch * k
    return batch * (num_steps if k == num_steps else num_steps - 1)


def philox_key(seed: int) -> int:
    """The 64-bit Philox key for ``seed`` (any Python int, reduced modulo 2**64)."""
    return int(seed) % 2**64


def check_draw(batch: int, num_steps: int, k: int, low_variance: bool, offset: int) -> None:
    """Validate a draw's arguments (shared by the reference and the kernel)."""
    check_blocks(num_steps, k, low_variance)
    if batch < 1:
        raise SubsampleError(f"batch={batch} must be >= 1")
    used = num_counters(batch, num_steps, k, low_variance)
    if offset < 0 or offset + used > _MAX_COUNTER:
        raise SubsampleError(
            f"offset={offset} must lie in [0, 2**63 - {used}] (the counters are int64)")


def _mulhilo32(a: int, b: Tensor) -> Tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * b``, ``a`` a uint32 constant, ``b`` uint32 values in int64.

    The full product needs 64 unsigned bits, which int64 cannot hold, so ``b`` is split in 16-bit
    halves: ``a*b = (a*b_hi) << 16 + a*b_lo`` with both partial products below 2**48.
    """
    lo_part = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (lo_part >> 16)  # = (a*b) >> 16, below 2**49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox_randint(seed: int, counters: Tensor) -> Tensor:
    """Philox4x32-10 first output word, equal to Triton's ``tl.randint(seed, counters)``.

    Args:
        seed: Python int; its 64 bits (see :func:`philox_key`) are the Philox key.
        counters: int64 tensor of any shape, values in ``[0, 2**63)``: the low / high 32 bits are
            Philox counter words 0 / 1 (words 2 and 3 are 0), as ``tl.randint`` does for int64
            offsets.

    Returns:
        int64 tensor, same shape, values in ``[0, 2**32)`` (the uint32 that ``tl.randint`` returns).
    """
    key = philox_key(seed)
    k0, k1 = key & _MASK32, key >> 32
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(counters)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def draw_indices(batch: int, num_steps: int, k: int, low_variance: bool, seed: int,
                 offset: int = 0, device: Optional[torch.device] = None) -> Tensor:
    """Step indices of the trained transitions (usable before sampling, to know which to keep).

    Args:
        batch: number of trajectories B.
        num_steps: steps per trajectory T.
        k: K (see :func:`num_blocks`).
        low_variance: block (stratified) draw instead of uniform without replacement.
        seed: Philox key; with ``offset`` it fully determines the draw.
        offset: first Philox counter (see the module docstring; advance it by
            :func:`num_counters` between calls for independent draws).
        device: where to compute and return the indices (default CPU).

    Returns:
        (B, num_kept(T, K)) long; column 0 is ``T-1`` (unless ``K == T``), then in low-variance
        mode one index per block from the last block to the first.
    """
    check_draw(batch, num_steps, k, low_variance, offset)
    device = torch.device(device or "cpu")
    if uses_blocks(num_steps, k, low_variance):
        size = num_steps // k
        # column s >= 1 holds block j = K - s, so blocks run from the last to the first
        blocks = torch.arange(k - 1, -1, -1, device=device)
        traj = torch.arange(batch, device=device)[:, None]
        rand = philox_randint(seed, offset + traj * k + blocks)
        drawn = blocks * size + rand % size
    else:
        cands = num_steps if k == num_steps else num_steps - 1
        traj = torch.arange(batch, device=device)[:, None]
        keys = philox_randint(seed, offset + traj * cands + torch.arange(cands, device=device))
        # stable, so that (improbable) equal keys order the same way on every device
        drawn = keys.argsort(dim=1, stable=True)[:, :k]
        if k == num_steps:
            return drawn
    last = torch.full((batch, 1), num_steps - 1, dtype=torch.long, device=device)
    return torch.cat([last, drawn], dim=1)


def check_tensors(tensors: Dict[str, Tensor], batch: int, num_steps: int) -> None:
    """Every tensor must be ``(B, T, ...)`` and all on one device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise SubsampleError(
            f"per-transition tensors lie on several devices: {sorted(map(str, devices))}")
    for name, t in tensors.items():
        if t.dim() < 2 or tuple(t.shape[:2]) != (batch, num_steps):
            raise SubsampleError(f"tensor {name!r} has shape {tuple(t.shape)}; expected "
                                 f"(batch={batch}, num_steps={num_steps}, ...)")


def out_dtype(t: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Gathered dtype: ``dtype`` for floating tensors when given, else unchanged."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def gather(tensors: Dict[str, Tensor], indices: Tensor,
           dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """Gather per-transition tensors ``(B, T, ...)`` at ``indices`` (B, S) into ``(B, S, ...)``.

    Floating tensors are cast to ``dtype`` when given; outputs are contiguous. Inputs may have any
    strides.
    """
    out = {}
    for name, t in tensors.items():
        idx = indices.to(t.device)
        # advanced indexing copies whole transitions; take_along_dim would broadcast the index to
        # the full (B, S, C, H, W) shape and gather element by element (7x slower on CPU)
        rows = torch.arange(idx.shape[0], device=t.device)[:, None]
        out[name] = t[rows, idx].to(out_dtype(t, dtype)).contiguous()
    return out


def select_and_gather(tensors: Dict[str, Tensor], batch: int, num_steps: int, k: int,
                      low_variance: bool, seed: int, offset: int = 0,
                      dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Draw the trained transitions and gather them: :func:`draw_indices` then :func:`gather`.

    Args:
        tensors: name -> (B, T, ...) per-transition tensor (latents, next latents, eps,
            timesteps, ...), all on one device, any strides.
        batch, num_steps, k, low_variance, seed, offset: as in :func:`draw_indices`.
        dtype: cast floating tensors to it (e.g. bf16 storage -> fp32 training buffers).

    Returns:
        indices (B, S) long on the tensors' device, and name -> contiguous (B, S, ...) tensor.
    """
    check_tensors(tensors, batch, num_steps)
    device = next(iter(tensors.values())).device if tensors else None
    indices = draw_indices(batch, num_steps, k, low_variance, seed, offset, device=device)
    return indices, gather(tensors, indices, dtype)
