"""Dynamic loss scaling of every backward pass of an update (fp16 frozen parts)."""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import Tensor, nn


class LossScaler:
    """Dynamic loss scaling of every backward pass, for fp16 frozen parts (V100 and other cards
    without bf16); disabled (scale 1, a pass-through) for bf16 and fp32, which need none.

    Every backward — the training loss and the input-gradient passes (reward score through the VAE
    and UNet, reverse scores) — runs on ``scale ×`` its output, so that small gradients survive the
    fp16 parts; results are unscaled in fp32 (input gradients at once, :meth:`input_grad`; parameter
    gradients before clipping, :meth:`unscale_grads_`, called by ``distributed.DataParallel``).  An
    update whose scaled gradients overflowed is skipped by the trainer's non-finite guard (optimiser
    untouched) and :meth:`back_off` halves the scale; ``growth_interval`` good updates in a row double
    it (torch.amp.GradScaler's rule).

    Args:
        enabled: scale at all (``training.mixed_precision == "fp16"``).
        init_scale, growth_factor, backoff_factor, growth_interval: torch.amp.GradScaler's defaults.
        min_scale: below this an overflow is not the scale's fault (a true inf/NaN): :meth:`back_off`
            returns False and the guard counts the skip as a failure.
    """

    def __init__(self, enabled: bool = False, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        self.enabled = enabled
        self._scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_updates = 0
        self.found_inf = False  # an input-gradient pass of this update overflowed

    @property
    def scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def backward(self, loss: Tensor) -> None:
        """``(scale · loss).backward()``: parameter gradients accumulate scaled."""
        (loss * self._scale if self.enabled else loss).backward()

    def check(self, value: Tensor) -> Tensor:
        """Record an overflow of an (already unscaled) input gradient; returns ``value``."""
        if self.enabled and not bool(torch.isfinite(value).all()):
            self.found_inf = True
        return value

    def input_grad(self, output: Tensor, inputs: Tensor, retain_graph: bool = False) -> Tensor:
        """``∂ output / ∂ inputs`` (``output`` a scalar) through a scaled backward, unscaled in fp32."""
        if not self.enabled:
            return torch.autograd.grad(output, inputs, retain_graph=retain_graph)[0].detach()
        (grad,) = torch.autograd.grad(output * self._scale, inputs, retain_graph=retain_graph)
        return self.check(grad.float() / self._scale).detach()

    @torch.no_grad()
    def unscale_grads_(self, params: Iterable[nn.Parameter]) -> None:
        """Divide the accumulated (fp32) parameter gradients by the scale, in place."""
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self._scale)

    def stepped(self) -> Dict[str, float]:
        """After an optimiser step: count it, grow the scale every ``growth_interval`` in a row."""
        self.found_inf = False
        if not self.enabled:
            return {}
        self.good_updates += 1
        if self.good_updates >= self.growth_interval:
            self._scale *= self.growth_factor
            self.good_updates = 0
        return {"loss_scale": self._scale}

    def back_off(self) -> bool:
        """After a skipped update: lower the scale. False when disabled or already at ``min_scale``
        (then the overflow is a true inf/NaN, not the scale's)."""
        self.found_inf = False
        self.good_updates = 0
        if not self.enabled or self._scale <= self.min_scale:
            return False
        self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        return True

    def state_dict(self) -> dict:
        return {"scale": self._scale, "good_updates": self.good_updates}

    def load_state_dict(self, state: dict) -> None:
        self._scale, self.good_updates = float(state["scale"]), int(state["good_updates"])
