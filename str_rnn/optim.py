"""Optimiser parameter groups: every parameter in exactly one group.

STR's sparsity (here: rank) is driven by weight decay on the thresholded vector σ and on
the threshold parameter ``s``, so those get their own groups and their own decay.
"""
from __future__ import annotations

from torch import nn

from .lowrank import LowRankSTR
from .threshold import Threshold


def param_groups(model: nn.Module, weight_decay: float, threshold_decay: float | None = None,
                 spectrum_decay: float | None = None) -> list[dict]:
    """Split ``model``'s trainable parameters into named optimiser groups.

    Groups (empty ones are dropped): ``"weights"`` (everything else, ``weight_decay``),
    ``"spectra"`` (σ of every :class:`LowRankSTR`, ``spectrum_decay``, default
    ``weight_decay``) and ``"thresholds"`` (every threshold ``s``, ``threshold_decay``,
    default ``weight_decay``).

    Returns:
        a list of dicts ``{"name", "params", "weight_decay"}`` for ``torch.optim``.
    """
    for name, value in (("weight_decay", weight_decay), ("threshold_decay", threshold_decay),
                        ("spectrum_decay", spectrum_decay)):
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name}={value!r}: expected a non-negative number")
    thresholds = {id(m.s) for m in model.modules() if isinstance(m, Threshold)}
    spectra = {id(m.sigma) for m in model.modules() if isinstance(m, LowRankSTR)}
    groups = {"weights": [], "spectra": [], "thresholds": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = "thresholds" if id(p) in thresholds else "spectra" if id(p) in spectra else "weights"
        groups[key].append(p)
    decay = {"weights": weight_decay,
             "spectra": weight_decay if spectrum_decay is None else spectrum_decay,
             "thresholds": weight_decay if threshold_decay is None else threshold_decay}
    out = [{"name": k, "params": v, "weight_decay": float(decay[k])} for k, v in groups.items() if v]
    n_grouped = sum(len(g["params"]) for g in out)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert n_grouped == n_trainable, "every trainable parameter must be in exactly one group"
    return out
