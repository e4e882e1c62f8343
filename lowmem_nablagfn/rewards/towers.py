"""Memory knobs shared by the reward models: low-precision weight storage with fp32 math, and
activation checkpointing of the transformer blocks.

A :class:`TowerReward` is a reward whose direct children are *towers* (image tower, text tower,
score head), each called as a module, and whose :meth:`TowerReward.blocks` lists the transformer
blocks inside them.  Both knobs act on these *units* (towers and blocks) by wrapping their
``forward`` on the instance, so the state-dict keys and the library classes stay untouched:

* :meth:`TowerReward.store_weights` (``reward.weight_dtype``): the floating parameters are stored
  in bf16 / fp16; while a unit runs, its parameters are swapped for fp32 copies (a block: its whole
  subtree; a tower: its parameters outside the blocks and the embedding tables), so every matmul,
  norm and softmax runs in fp32 and at most one block's fp32 copy exists at a time.  Embedding
  tables outside the blocks (token, position embeddings) are never copied: the rows are looked up
  in the storage dtype and upcast, which is exact.  Copies that autograd would keep for the
  backward pass (a linear layer keeps its weight to compute the input gradient) are saved as a
  reference to the low-precision parameter and upcast again in backward (a saved-tensor hook), so
  bf16 storage halves the weight memory also while a graph is alive.  When another saved-tensor
  hook is already active (an outer activation checkpoint, ``save_on_cpu``), that hook is left in
  charge: whatever it does with saved tensors it also does with the copies.
* :meth:`TowerReward.set_checkpointing` (``memory.checkpoint_reward``): each block runs under
  ``torch.utils.checkpoint`` (non-reentrant) whenever gradients are enabled, in eval mode as in
  train mode (transformers' own switch acts only in train mode).  The recomputation re-enters the
  block's fp32 upcast, so the two knobs compose.

Buffers are never cast (masks, position ids). Error of bf16 storage: see the rewards README section.
"""
from __future__ import annotations

import contextlib
import types
import weakref
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import RewardModel

# id(fp32 copy) -> (weak reference to the copy, the low-precision parameter it was made from).
# Filled while a unit runs; read by the saved-tensor pack hook.
_LIVE_COPIES: Dict[int, Tuple[weakref.ref, Tensor]] = {}


class _Recast(tuple):
    """A saved tensor replaced by its recipe: (low-precision parameter, size, stride, offset)."""


def _pack(t: Tensor):
    base = t._base if t._base is not None else t
    entry = _LIVE_COPIES.get(id(base))
    if entry is not None and entry[0]() is base:
        return _Recast((entry[1], t.size(), t.stride(), t.storage_offset()))
    return t


def _unpack(saved):
    if isinstance(saved, _Recast):
        param, size, stride, offset = saved
        return param.detach().float().as_strided(size, stride, offset)
    return saved


def _outer_saved_tensor_hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - private API moved
        return True  # leave saved tensors alone: costs memory, never correctness


@contextlib.contextmanager
def _fp32_params(params: Sequence[Tuple[nn.Module, str]]) -> Iterator[None]:
    """Swap low-precision parameters for fp32 copies for the duration of the block."""
    swapped = []
    try:
        for owner, name in params:
            param = owner._parameters[name]
            if param is None or param.dtype == torch.float32 or not param.is_floating_point():
                continue
            copy = param.float()
            _LIVE_COPIES[id(copy)] = (weakref.ref(copy), param)
            owner._parameters[name] = copy  # what torch.func.functional_call does too
            swapped.append((owner, name, param, copy))
        yield
    finally:
        for owner, name, param, copy in swapped:
            owner._parameters[name] = param
            _LIVE_COPIES.pop(id(copy), None)


def _unit_forward(self: nn.Module, *args, **kwargs):
    """The instance-level ``forward`` of a unit: fp32 upcast of its parameters, optional checkpoint."""
    state = self._reward_unit

    def run(*a, **k):
        with _fp32_params(state["params"]):
            return type(self).forward(self, *a, **k)

    if state["lookup"]:  # an embedding table: look up in storage dtype, upcast the rows (exact)
        out = type(self).forward(self, *args, **kwargs)
        return out.float() if out.is_floating_point() else out
    if state["checkpoint"] and torch.is_grad_enabled():
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    if state["tower"] and state["low_precision"] and not _outer_saved_tensor_hooks_active():
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            return run(*args, **kwargs)
    return run(*args, **kwargs)


def _direct_params(module: nn.Module, skip: Sequence[nn.Module] = ()) -> List[Tuple[nn.Module, str]]:
    """(owner, name) of the parameters of the subtree of ``module``, not descending into ``skip``.

    Names, not tensors: ``.to(device)`` may replace a parameter object."""
    skip_ids = {id(m) for m in skip}
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        out += [(m, n) for n, p in m._parameters.items() if p is not None]
        stack += [c for c in m._modules.values() if c is not None and id(c) not in skip_ids]
    return out


class TowerReward(RewardModel):
    """A reward made of towers (its direct children) with transformer blocks inside them."""

    def blocks(self) -> List[nn.Module]:  # pragma: no cover - abstract
        """The transformer blocks of every tower (units of upcast and checkpointing)."""
        raise NotImplementedError

    def _units(self) -> List[nn.Module]:
        if getattr(self, "_unit_list", None) is None:
            blocks = self.blocks()
            inside = {id(m) for b in blocks for m in b.modules()}
            lookups = [m for m in self.modules() if isinstance(m, nn.Embedding) and id(m) not in inside]
            units = [(block, _direct_params(block), "block") for block in blocks]
            units += [(tower, _direct_params(tower, skip=blocks + lookups), "tower") for tower in self.children()]
            units += [(table, [], "lookup") for table in lookups]
            for module, params, kind in units:
                module._reward_unit = {"params": params, "tower": kind == "tower", "lookup": kind == "lookup",
                                       "checkpoint": False, "low_precision": False}
                module.forward = types.MethodType(_unit_forward, module)
            object.__setattr__(self, "_unit_list", [u[0] for u in units])
        return self._unit_list

    def store_weights(self, dtype: torch.dtype) -> "TowerReward":
        """Store the floating parameters in ``dtype`` (fp32, bf16, fp16); the math stays fp32."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"weight storage dtype must be float32, bfloat16 or float16, got {dtype}")
        for unit in self._units():
            unit._reward_unit["low_precision"] = dtype != torch.float32
        for p in self.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        return self

    def set_checkpointing(self, enabled: bool = True) -> "TowerReward":
        """Activation checkpointing of every block whenever gradients are enabled (eval mode too)."""
        blocks = {id(b) for b in self.blocks()}
        for unit in self._units():
            if id(unit) in blocks:
                unit._reward_unit["checkpoint"] = bool(enabled)
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())


__all__ = ["TowerReward"]
