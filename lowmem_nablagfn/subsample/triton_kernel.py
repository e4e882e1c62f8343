"""Fused transition subsampling: draw and gather in one Triton launch.

One launch draws the trained transitions of every trajectory (low-variance mode: the last step
plus one Philox draw per block, bit-identical to :func:`.reference.draw_indices`) and copies, for
those steps, every per-transition tensor (latents, next latents, stored eps, timesteps, ...) into
contiguous ``(B, S, ...)`` training buffers, casting dtype on the way (e.g. bf16 -> fp32). The
uniform and ``K == T`` modes draw their indices with the PyTorch reference (a sort, cheap at
``B x T``) and use the same launch for the gather.

Program ``(row, chunk)`` copies elements ``chunk*BLOCK … (chunk+1)*BLOCK - 1`` of output row
``row = b*S + s`` of every tensor; every program recomputes its row's draw (one scalar Philox,
far cheaper than a second launch or a round trip through memory), so the draw does not depend on
the launch shape: the counter is ``offset + b*K + block`` as in the reference.

Inputs may have any strides over (B, T). Per transition, the trailing dims are collapsed to at
most two strided dims in the kernel (covers contiguous, channel-sliced, channels-last and
time-major storage); a tensor whose trailing dims do not collapse to two is first made contiguous,
which costs one extra read and write of the whole ``(B, T, ...)`` tensor (T/S times the gather's
own traffic).

Works on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which the tests use. Casts round as torch does (bf16/fp16 -> fp32
exact; downcasts to nearest even), except that Triton's interpreter rounds float -> bf16 toward
zero.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .reference import SubsampleError

_MAX_BLOCK = 4096  # elements per program and tensor: 8-16 KiB loads in flight per tensor
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


# The scalars may equal 1, which Triton would otherwise turn into constants (and recompile for).
@triton.jit(do_not_specialize=["seed", "offset", "num_kept", "num_steps", "k"])
def _select_gather_kernel(indices_ptr, srcs, dsts, stride_b, stride_t, numel, inner_n1,
                          inner_s0, inner_s1, seed, offset, num_kept, num_steps, k,
                          DRAW: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    """Copy one chunk of one output row of every tensor.

    Args:
        indices_ptr: (B*S,) int64: written with the drawn steps when DRAW, else read.
        srcs, dsts: tuples of input (B, T, ...) / contiguous output (B, S, ...) pointers.
        stride_b, stride_t: tuples of the inputs' element strides over B and T.
        numel: tuple of elements per transition.
        inner_n1, inner_s0, inner_s1: per tensor, the trailing dims collapsed to (n0, n1) with
            strides (s0, s1): element e of a transition lies at (e // n1) * s0 + (e % n1) * s1.
        CONTIG: bit i set when tensor i's transition is contiguous (element e lies at e).
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    b = row // num_kept
    s = row % num_kept
    if DRAW:
        # column s >= 1 holds block K - s (blocks from the last to the first), column 0 step T-1
        block = k - s
        size = num_steps // k
        counter = offset.to(tl.int64) + b.to(tl.int64) * k + block
        rand = tl.randint(seed, counter)  # uint32: reduce in uint32 (uint32 % int32 is an error)
        drawn = block * size + (rand % size.to(tl.uint32)).to(tl.int32)
        step = tl.where(s == 0, num_steps - 1, drawn).to(tl.int64)
        if chunk == 0:
            tl.store(indices_ptr + row, step)
    else:
        step = tl.load(indices_ptr + row)
    elem = chunk * BLOCK + tl.arange(0, BLOCK)
    for i in tl.static_range(len(srcs)):
        mask = elem < numel[i]
        if (CONTIG >> i) & 1:
            inner = elem.to(tl.int64)
        else:
            inner = (elem // inner_n1[i]).to(tl.int64) * inner_s0[i] + \
                (elem % inner_n1[i]).to(tl.int64) * inner_s1[i]
        src = srcs[i] + b.to(tl.int64) * stride_b[i] + step * stride_t[i] + inner
        val = tl.load(src, mask=mask)
        dst = dsts[i] + row.to(tl.int64) * numel[i] + elem
        tl.store(dst, val.to(dsts[i].dtype.element_ty), mask=mask)


def _collapse_inner(t: Tensor) -> Optional[Tuple[int, int, int, bool]]:
    """Trailing dims (after B, T) of ``t`` as ``(n1, s0, s1, contiguous)``, None if they need 3+.

    Adjacent dims merge when the outer stride equals size * stride of the inner one; size-1 dims
    are dropped (their stride is irrelevant). ``contiguous``: element ``e`` of a transition lies
    at ``e`` (a single unit-stride dim, or one element), so the kernel skips the div/mod.
    """
    merged: List[List[int]] = []
    for size, stride in zip(t.shape[2:], t.stride()[2:]):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        return None
    contiguous = not merged or (len(merged) == 1 and merged[0][1] == 1)
    merged = [[1, 0]] * (2 - len(merged)) + merged
    return merged[1][0], merged[0][1], merged[1][1], contiguous


def _check_device(tensors: Dict[str, Tensor]) -> torch.device:
    device = next(iter(tensors.values())).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SubsampleError(
            f"the Triton subsampling kernel needs CUDA tensors (got {device}); use the reference "
            f"(LOWMEM_NABLAGFN_SUBSAMPLE=reference) or set TRITON_INTERPRET=1 before importing "
            f"triton to run the kernel on CPU through Triton's interpreter")
    return device


def _launch(tensors: Dict[str, Tensor], indices: Tensor, dtype: Optional[torch.dtype],
            draw: Optional[Tuple[int, int, int, int]]) -> Dict[str, Tensor]:
    """One launch over every tensor. ``draw = (seed, offset, T, K)`` draws into ``indices``."""
    batch, kept = indices.shape
    srcs, layouts = [], []
    for t in tensors.values():
        layout = _collapse_inner(t)
        if layout is None:
            t = t.contiguous()  # documented cost: a full extra read+write of this tensor
            layout = _collapse_inner(t)
        srcs.append(t)
        layouts.append(layout)
    dsts = [torch.empty((batch, kept, *t.shape[2:]), dtype=reference.out_dtype(t, dtype),
                        device=t.device) for t in srcs]
    numel = tuple(math.prod(t.shape[2:]) for t in srcs)
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(*numel, 1)))
    chunks = triton.cdiv(max(*numel, 1), block)
    if chunks > _MAX_GRID_Y:
        raise SubsampleError(f"{max(numel)} elements per transition exceed the kernel's grid limit "
                             f"({_MAX_GRID_Y * block}); use the reference")
    n1, s0, s1, contiguous = zip(*layouts)
    seed, offset, num_steps, k = draw if draw is not None else (0, 0, srcs[0].shape[1], 1)
    _select_gather_kernel[(batch * kept, chunks)](
        indices, tuple(srcs), tuple(dsts), tuple(t.stride(0) for t in srcs),
        tuple(t.stride(1) for t in srcs), numel, n1, s0, s1,
        reference.philox_key(seed), offset, kept, num_steps, k, DRAW=draw is not None,
        CONTIG=sum(int(c) << i for i, c in enumerate(contiguous)), BLOCK=block, num_warps=4)
    return dict(zip(tensors, dsts))


def gather(tensors: Dict[str, Tensor], indices: Tensor,
           dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """Kernel version of :func:`.reference.gather` (bit-identical outputs), one launch."""
    if not tensors:
        return {}
    device = _check_device(tensors)
    num_steps = next(iter(tensors.values())).shape[1]
    reference.check_tensors(tensors, indices.shape[0], num_steps)
    indices = indices.to(device=device, dtype=torch.long).contiguous()
    # the kernel does not bounds-check its loads (the reference raises); one small sync
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < num_steps:
        raise SubsampleError(f"indices must lie in [0, {num_steps}); got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
    return _launch(tensors, indices, dtype, draw=None)


def select_and_gather(tensors: Dict[str, Tensor], batch: int, num_steps: int, k: int,
                      low_variance: bool, seed: int, offset: int = 0,
                      dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Kernel version of :func:`.reference.select_and_gather`: same arguments, identical results.

    Low-variance mode (``K < T``) draws inside the launch; the other modes draw with
    :func:`.reference.draw_indices` on the device and gather with the same kernel.

    Args:
        tensors: name -> (B, T, ...) tensor, all on one CUDA device (CPU under the interpreter).
        batch, num_steps, k, low_variance, seed, offset: as in :func:`.reference.draw_indices`.
        dtype: cast floating tensors to it.

    Returns:
        indices (B, S) long, and name -> contiguous (B, S, ...) tensor.
    """
    reference.check_draw(batch, num_steps, k, low_variance, offset)
    if not tensors:
        return reference.draw_indices(batch, num_steps, k, low_variance, seed, offset), {}
    device = _check_device(tensors)
    reference.check_tensors(tensors, batch, num_steps)
    if not reference.uses_blocks(num_steps, k, low_variance):
        indices = reference.draw_indices(batch, num_steps, k, low_variance, seed, offset, device)
        return indices, _launch(tensors, indices, dtype, draw=None)
    indices = torch.empty((batch, reference.num_kept(num_steps, k)), dtype=torch.long,
                          device=device)
    return indices, _launch(tensors, indices, dtype, draw=(seed, offset, num_steps, k))
