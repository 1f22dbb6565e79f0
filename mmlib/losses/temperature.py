"""Temperature handling: a CLIP-style learnable temperature and the validation shared by the losses.

A contrastive loss divides cosine similarities by a temperature ``tau`` (equivalently multiplies
them by a logit scale ``1 / tau``). CLIP learns it: the parameter is ``log(1 / tau)``, initialised
from ``tau = 0.07``, and the scale is clamped to at most 100 so training cannot make the logits
explode.

Paper: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", https://arxiv.org/abs/2103.00020 (section 2.5).

Example::

    temp = LearnableTemperature(init=0.07)
    loss = matryoshka_in_batch_negative_loss(q, t, temperature=temp())
    loss.backward()                       # temp.log_scale.grad is set
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

__all__ = ["LearnableTemperature", "resolve_temperature"]


class LearnableTemperature(nn.Module):
    """Learnable temperature ``tau = 1 / min(exp(log_scale), max_scale)``; ``forward()`` returns it.

    Args:
        init: initial temperature (CLIP uses 0.07).
        max_scale: upper bound on the logit scale ``1 / tau`` (CLIP uses 100, i.e. tau >= 0.01).
            Beyond it the clamp passes no gradient, as in CLIP.
    """

    def __init__(self, init: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        init = _positive_finite_float(init, "init")
        max_scale = _positive_finite_float(max_scale, "max_scale")
        if 1.0 / init > max_scale:
            raise ValueError(
                f"LearnableTemperature: init={init} gives a logit scale 1/init={1.0 / init:.4g} "
                f"above max_scale={max_scale}; raise max_scale or raise init."
            )
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init), dtype=torch.float32))

    def scale(self) -> Tensor:
        """The clamped logit scale ``1 / tau`` as a 0-dim tensor (with grad)."""
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self) -> Tensor:
        """The temperature as a 0-dim float32 tensor carrying the gradient to ``log_scale``."""
        return self.scale().reciprocal()

    @property
    def temperature(self) -> float:
        """Current temperature as a Python float (no grad)."""
        return float(self().detach())

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, max_scale={self.max_scale:g}"


def _positive_finite_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}.")
    return value


def resolve_temperature(
    temperature: float | Tensor | nn.Module, device: torch.device
) -> tuple[float, Tensor | None]:
    """Validate a temperature; return ``(value, tensor_or_None)``.

    A float gives ``(value, None)``. A 0-dim (or one-element) tensor, or a module such as
    :class:`LearnableTemperature` returning one, gives its value and the tensor as float32 on
    ``device``, so that the loss can send a gradient to it.
    """
    if isinstance(temperature, nn.Module):
        temperature = temperature()
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                "temperature must be a float or a one-element tensor, got a tensor of shape "
                f"{tuple(temperature.shape)}; pass a scalar."
            )
        if not temperature.is_floating_point():
            raise TypeError(
                f"temperature tensor must be floating point, got {temperature.dtype}; "
                "use torch.tensor(0.07)."
            )
        tensor = temperature.reshape(()).to(device=device, dtype=torch.float32)
        value = float(tensor.detach())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {value}.")
        return value, tensor
    return _positive_finite_float(temperature, "temperature"), None
