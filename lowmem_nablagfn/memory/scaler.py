"""Dynamic loss scaling of every backward pass of an update (fp16 frozen parts), searched without
losing updates."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

#: What runs a backward through the fp16 parts, each with its own scale: the training loss (parameter
#: gradients), the reward score (through the VAE and the UNet) and the reverse score (a vector-Jacobian
#: product through the UNet, its vector normalised to a largest entry of the scale).  Their safe scales
#: differ by orders of magnitude (the tiny model: ≤ 2^6, any, ≤ 2^12), so one shared scale would
#: hold every pass to the lowest.
KINDS = ("params", "reward", "reverse")


class LossScaler:
    """Dynamic loss scaling of every backward pass, for fp16 frozen parts (V100 and other cards
    without bf16); disabled (scale 1, a pass-through) for bf16 and fp32, which need none.

    Every backward runs on ``scale ×`` its output, so that small gradients survive the fp16 parts,
    and its result is unscaled in fp32 at once: input gradients by :meth:`input_grad` /
    :meth:`retry`, the parameter gradients of each training pass by :meth:`accumulate` (``.grad``
    always holds unscaled gradients, so ranks may settle on different scales).  A pass whose backward
    overflowed (finite forward, non-finite result) is **run again at once** at half its kind's scale,
    down to ``min_scale``; no update is lost to the search (torch.amp.GradScaler instead skips the
    update and halves the scale: from 2^16, the default job lost its first 9 updates).  A pass still
    non-finite at ``min_scale`` (or whose forward is non-finite) is not an overflow: its kind's scale
    goes back to where the pass started and the value is left for the trainer's non-finite guard.
    ``growth_interval`` updates in a row without an overflow of a kind double its scale.

    Args:
        enabled: scale at all (``training.mixed_precision == "fp16"``).
        params: the trainable parameters (their ``.grad`` is unscaled by :meth:`accumulate`).
        init_scale, growth_factor, backoff_factor, growth_interval: torch.amp.GradScaler's defaults.
        min_scale: the lowest scale tried; non-finite there is not an overflow.
    """

    def __init__(self, enabled: bool = False, params: Iterable[nn.Parameter] = (), init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000,
                 min_scale: float = 1.0):
        self.enabled = enabled
        self.params: List[nn.Parameter] = list(params)
        self.scales = {k: float(init_scale) for k in KINDS}
        self.good_updates = {k: 0 for k in KINDS}  # updates in a row without an overflow, per kind
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.retries = 0  # passes run again at a lower scale (reported per epoch, then reset)
        self.found_inf = False  # an input-gradient pass of this update is non-finite at every scale
        self._loss_finite = True  # the last loss through backward() (set only when enabled)

    @property
    def scale(self) -> float:
        """The scale of the training backward (``params``); 1 when disabled."""
        return self.scale_of("params")

    def scale_of(self, kind: str) -> float:
        return self.scales[kind] if self.enabled else 1.0

    # ------------------------------------------------------------------ one pass, retried
    def retry(self, kind: str, attempt: Callable[[Optional[float], bool], Tensor]) -> Tensor:
        """Run ``attempt(scale, rebuild)`` — one backward at ``scale``, returning its unscaled fp32
        result — again at lower scales of ``kind`` while the result is non-finite.  ``rebuild`` is
        True on a retry: the attempt rebuilds a graph its first backward freed.  Disabled: one attempt
        with scale None (a plain backward), unchecked."""
        if not self.enabled:
            return attempt(None, False)
        start = self.scales[kind]
        value = attempt(start, False)
        while not bool(torch.isfinite(value).all()):
            if not self._lower(kind):
                self.scales[kind] = start  # not an overflow: a lower scale does not help
                self.found_inf = True
                break
            value = attempt(self.scales[kind], True)
        return value

    def input_grad(self, forward: Callable[[], Tensor], inputs: Tensor, retain_graph: bool = False,
                   kind: str = "reward") -> Tensor:
        """``∂ forward() / ∂ inputs`` (``forward()`` a scalar built from ``inputs``) through a scaled
        backward, unscaled in fp32; ``forward`` is called again for a retry unless ``retain_graph``."""
        output = forward()
        if not self.enabled:
            return torch.autograd.grad(output, inputs, retain_graph=retain_graph)[0].detach()
        if not bool(torch.isfinite(output)):  # the forward: no scale helps, nothing to retry
            self.found_inf = True
            return torch.autograd.grad(output, inputs, retain_graph=retain_graph)[0].float().detach()

        def attempt(scale: float, rebuild: bool) -> Tensor:
            nonlocal output
            if rebuild and not retain_graph:
                output = forward()
            (grad,) = torch.autograd.grad(output * scale, inputs, retain_graph=retain_graph)
            return grad.float().div_(scale).detach()

        return self.retry(kind, attempt)

    def backward(self, loss: Tensor) -> None:
        """``(scale · loss).backward()``, inside :meth:`accumulate` (which unscales what it added)."""
        if not self.enabled:
            loss.backward()
            return
        self._loss_finite = bool(torch.isfinite(loss))
        (loss * self.scales["params"]).backward()

    def accumulate(self, run: Callable[[bool], T]) -> T:
        """``run(rebuild)``: a forward and one :meth:`backward`; its parameter gradients are added to
        ``.grad`` unscaled (fp32, exact: the scales are powers of two).  An overflow (finite loss,
        non-finite gradient) runs it again at once at a lower scale, ``rebuild`` True.  Returns what
        the last ``run`` returned.  Disabled: ``run(False)``, gradients accumulating as usual."""
        if not self.enabled:
            return run(False)
        if not self.params:
            raise ValueError("LossScaler(enabled=True) was given no parameters, so it cannot unscale their "
                             "gradients; pass params= (the optimiser's parameters)")
        earlier = [p.grad for p in self.params]  # set aside: this pass's gradients arrive alone
        start, rebuild = self.scales["params"], False
        while True:
            for p in self.params:
                p.grad = None
            self._loss_finite, scale = True, self.scales["params"]
            out = run(rebuild)
            fresh = [p.grad for p in self.params if p.grad is not None]
            if not self._loss_finite or _all_finite(fresh):
                break
            if not self._lower("params"):
                self.scales["params"] = start  # non-finite at every scale: not an overflow
                break
            rebuild = True
        for p, before in zip(self.params, earlier):  # this pass's gradient, unscaled, after the earlier ones
            if p.grad is not None:
                p.grad.div_(scale)
                if before is not None:
                    p.grad = before.add_(p.grad)
            else:
                p.grad = before
        return out

    def _lower(self, kind: str) -> bool:
        """An overflow of ``kind``: lower its scale (False: already at ``min_scale``)."""
        self.good_updates[kind] = 0
        if self.scales[kind] <= self.min_scale:
            return False
        self.scales[kind] = max(self.scales[kind] * self.backoff_factor, self.min_scale)
        self.retries += 1
        return True

    # ------------------------------------------------------------------ per update
    def stepped(self) -> Dict[str, float]:
        """After an optimiser step: grow each kind's scale after ``growth_interval`` updates in a row
        without an overflow.  Returns the scales (metrics)."""
        self.found_inf = False
        if not self.enabled:
            return {}
        for k in KINDS:
            self.good_updates[k] += 1
            if self.good_updates[k] >= self.growth_interval:
                self.scales[k] *= self.growth_factor
                self.good_updates[k] = 0
        return {"loss_scale": self.scales["params"], "loss_scale_reward": self.scales["reward"],
                "loss_scale_reverse": self.scales["reverse"]}

    def skipped(self) -> None:
        """After an update skipped for a non-finite value (never the scale's: overflows are retried)."""
        self.found_inf = False

    def pop_retries(self) -> int:
        """Passes run again at a lower scale since the last call."""
        n, self.retries = self.retries, 0
        return n

    def state_dict(self) -> dict:
        return {"scales": dict(self.scales), "good_updates": dict(self.good_updates)}

    def load_state_dict(self, state: dict) -> None:
        """Also reads the format before per-kind scales (``{"scale", "good_updates"}``, one scale for
        every backward): each kind starts from that scale."""
        if "scales" in state:
            scales, good = state["scales"], state["good_updates"]
        elif "scale" in state:
            scales = {k: state["scale"] for k in KINDS}
            good = {k: state["good_updates"] for k in KINDS}
        else:
            raise ValueError(f"unknown loss-scaler state (keys {sorted(state)}); expected 'scales' and "
                             f"'good_updates' (or the older 'scale'); resume without this checkpoint")
        self.scales = {k: float(scales[k]) for k in KINDS}
        self.good_updates = {k: int(good[k]) for k in KINDS}


def _all_finite(tensors: List[Tensor]) -> bool:
    """One device sync for all of them."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
