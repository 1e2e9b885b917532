"""Ranks, parameters, bytes and FLOPs of str_rnn models (pure functions).

Conventions (FastGRNN paper): a model's size counts 4 bytes per float parameter, the
classifier included. Effective parameters are what the *compacted* model holds: a
learned-rank matrix of rank r costs ``min(r (out + in), out · in)``, a sparse matrix its
nonzeros, and thresholds (dropped by compaction) cost nothing.
"""
from __future__ import annotations

from torch import nn

from .cells import RNNCell
from .lowrank import FixedSparse, LowRankSTR, Matrix, SparseSTR
from .threshold import Threshold


def matrices(model: nn.Module) -> dict[str, Matrix]:
    """Every :class:`~str_rnn.lowrank.Matrix` in ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Matrix)}


def ranks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (rank, max_rank)}`` for every matrix of ``model``."""
    return {name: (m.rank, m.max_rank) for name, m in matrices(model).items()}


def thresholds(model: nn.Module) -> dict[str, float]:
    """``{name: g(s)}`` for every learnable threshold of ``model``."""
    return {name: float(t().detach()) for name, t in model.named_modules() if isinstance(t, Threshold)}


def count_params(model: nn.Module) -> int:
    """Effective parameters: what :func:`str_rnn.compact` of ``model`` would hold."""
    mats = matrices(model)
    inside = {id(p) for m in mats.values() for p in m.parameters()}
    inside |= {id(p) for t in model.modules() if isinstance(t, Threshold) for p in t.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return rest + sum(m.effective_params for m in mats.values())


def model_size_bytes(model: nn.Module, bits: int = 32) -> int:
    """Size at ``bits`` per effective parameter (32 bits: the FastGRNN paper's convention)."""
    return count_params(model) * bits // 8


def flops(model: nn.Module, seq_len: int) -> int:
    """Floating-point operations for one sequence of ``seq_len`` steps (batch 1).

    Per step and layer: ``W x_t`` and ``U h`` at their cheapest (factored or dense) form
    plus the cell's element-wise work; plus one pass of every ``nn.Linear``.
    """
    total = 0
    for cell in model.modules():
        if isinstance(cell, RNNCell):
            total += seq_len * (cell.W.flops() + cell.U.flops() + cell.elementwise_flops())
    for lin in model.modules():
        if isinstance(lin, nn.Linear):
            total += 2 * lin.in_features * lin.out_features + lin.out_features
    return total


def summary(model: nn.Module, seq_len: int | None = None) -> str:
    """A per-matrix table (name, shape, rank/max, effective params) and model totals."""
    rows = [("matrix", "shape", "kind", "rank", "params")]
    for name, m in matrices(model).items():
        kind = type(m).__name__
        if isinstance(m, (SparseSTR, FixedSparse)):
            kind += f" nnz={m.nnz}"
        rows.append((name, f"{m.out_features}x{m.in_features}", kind, f"{m.rank}/{m.max_rank}",
                     str(m.effective_params)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    n = count_params(model)
    lines.append(f"effective parameters: {n:,}  size: {model_size_bytes(model) / 1024:.2f} KB (32-bit)")
    if seq_len is not None:
        lines.append(f"FLOPs per sequence of {seq_len} steps: {flops(model, seq_len):,}")
    learned = [t for t in model.modules() if isinstance(t, LowRankSTR)]
    if learned:
        lines.append(f"learned-rank matrices: {len(learned)} (thresholds excluded from the count)")
    return "\n".join(lines)
