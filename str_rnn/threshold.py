"""Soft Threshold Reparameterization (STR), Kusupati et al., ICML 2020.

The operator

    S_g(w, s) = sign(w) * relu(|w| - g(s))

sets every entry with ``|w| <= g(s)`` exactly to zero and shrinks the others by ``g(s)``.
``s`` is a learnable scalar; ``g`` maps it to a positive threshold (``exp`` for the
low-rank RNN experiments, ``sigmoid`` for the CNN ones, both with scale 1). Gradients are
plain autograd through ``sign`` and ``relu``: pruned entries receive no loss gradient.
"""
from __future__ import annotations

import torch
from torch import nn

THRESHOLD_FUNCTIONS = {"exp": torch.exp, "sigmoid": torch.sigmoid}


def soft_threshold(w: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Return ``sign(w) * relu(|w| - threshold)`` (differentiable in ``w`` and ``threshold``)."""
    return torch.sign(w) * torch.relu(w.abs() - threshold)


def threshold_function(g: str):
    """Return the function ``g`` named ``"exp"`` or ``"sigmoid"``."""
    try:
        return THRESHOLD_FUNCTIONS[g]
    except KeyError:
        raise ValueError(f"g={g!r} is not a threshold function; expected one of {sorted(THRESHOLD_FUNCTIONS)}") from None


class Threshold(nn.Module):
    """A learnable threshold ``g(s)`` with a scalar parameter ``s``.

    Args:
        g: ``"exp"`` (default; ``g(-10) ≈ 4.5e-5``, training starts effectively dense)
            or ``"sigmoid"``.
        s_init: initial value of ``s``.
    """

    def __init__(self, g: str = "exp", s_init: float = -10.0):
        super().__init__()
        self._g = threshold_function(g)
        self.g = g
        self.s = nn.Parameter(torch.tensor(float(s_init)))

    def forward(self) -> torch.Tensor:
        return self._g(self.s)

    def extra_repr(self) -> str:
        return f"g={self.g}, s={self.s.item():.3g}, threshold={self().item():.3g}"
