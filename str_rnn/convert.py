"""Conversion from torch's recurrent modules, and compaction to the learned rank.

* :func:`from_torch` turns a trained ``nn.LSTM`` / ``nn.GRU`` / ``nn.LSTMCell`` /
  ``nn.GRUCell`` into the equivalent str_rnn module (outputs equal within 1e-5), by
  default with learned-rank matrices whose σ are the singular values of torch's weights.
* :func:`compact` returns a copy in which every learned-rank matrix is a fixed-rank matrix
  of its learned rank (or dense when that is smaller) and every sparse STR matrix keeps
  only its nonzeros, so the threshold machinery is gone, the outputs are unchanged and the
  copy holds exactly :func:`str_rnn.count_params` parameters.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .cells import GRUCell, LSTMCell
from .lowrank import Dense, FixedRank, FixedSparse, LowRankSTR, Matrix, SparseSTR
from .rnn import RNN

_TORCH_CELLS = {nn.LSTM: LSTMCell, nn.GRU: GRUCell, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def _matrix_from(weight: torch.Tensor, matrix: str, **kwargs) -> Matrix:
    if matrix == "str":
        return LowRankSTR.from_dense(weight, **kwargs)
    if matrix == "dense":
        return Dense.from_dense(weight)
    if matrix == "fixed":
        return FixedRank.from_dense(weight, **kwargs)
    if matrix == "sparse":
        return SparseSTR.from_dense(weight, **kwargs)
    raise ValueError(f"matrix={matrix!r}: expected one of str, dense, fixed, sparse")


def _cell_from(cls, w_ih, w_hh, b_ih, b_hh, matrix, matrix_kwargs):
    hidden = w_hh.shape[1]
    cell = cls(w_ih.shape[1], hidden, W=_matrix_from(w_ih, matrix, **matrix_kwargs),
               U=_matrix_from(w_hh, matrix, **matrix_kwargs))
    with torch.no_grad():
        cell.bias_ih.copy_(b_ih if b_ih is not None else torch.zeros_like(cell.bias_ih))
        cell.bias_hh.copy_(b_hh if b_hh is not None else torch.zeros_like(cell.bias_hh))
    return cell


@torch.no_grad()
def from_torch(module: nn.Module, *, matrix: str = "str", **matrix_kwargs):
    """Convert a torch recurrent module into the equivalent str_rnn module.

    Args:
        module: ``nn.LSTM`` or ``nn.GRU`` (any ``num_layers``, ``batch_first`` either way,
            with or without bias; not bidirectional, no ``proj_size``, no dropout between
            layers in training) or ``nn.LSTMCell`` / ``nn.GRUCell``.
        matrix: parameterisation of every ``W``/``U``: ``"str"`` (default; ``A, σ, B`` from
            the SVD so that the rank can be learned from the pretrained model),
            ``"dense"``, ``"fixed"`` (with ``rank=``), ``"sparse"``.
        **matrix_kwargs: passed to the matrices (e.g. ``s_init``, ``g``).

    Returns:
        an :class:`~str_rnn.rnn.RNN` (for ``nn.LSTM``/``nn.GRU``) or a cell.

    Raises:
        TypeError: not one of the supported modules.
        ValueError: an unsupported option (bidirectional, proj_size).
    """
    cls = _TORCH_CELLS.get(type(module))
    if cls is None:
        raise TypeError(f"from_torch: expected nn.LSTM, nn.GRU, nn.LSTMCell or nn.GRUCell, "
                        f"got {type(module).__name__}")
    if isinstance(module, (nn.LSTMCell, nn.GRUCell)):
        return _cell_from(cls, module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh,
                          matrix, matrix_kwargs)
    if module.bidirectional:
        raise ValueError("from_torch: bidirectional=True is not supported")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"from_torch: proj_size={module.proj_size} is not supported")
    cells = []
    for layer in range(module.num_layers):
        def get(name):
            return getattr(module, f"{name}_l{layer}", None)
        cells.append(_cell_from(cls, get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                                matrix, matrix_kwargs))
    return RNN.from_cells(cells, batch_first=module.batch_first)


@torch.no_grad()
def compact_matrix(m: Matrix) -> Matrix:
    """The cheapest threshold-free matrix equal to ``m.weight``.

    Its parameter count is ``m.effective_params``: a rank-0 learned-rank matrix becomes a
    :class:`FixedSparse` without nonzeros (no parameters, not a dense block of zeros).
    """
    if isinstance(m, LowRankSTR):
        left, right = m.active_factors()
        r = left.shape[1]
        if r == 0:
            return FixedSparse(m.in_features, m.out_features, 0)
        if r * (m.in_features + m.out_features) >= m.in_features * m.out_features:
            return Dense.from_dense(m.weight)
        return FixedRank.from_factors(left, right.mT)
    if isinstance(m, SparseSTR):
        if m.nnz == m.in_features * m.out_features:
            return Dense.from_dense(m.weight)
        return FixedSparse.from_dense(m.weight)
    return copy.deepcopy(m)


def compact(model: nn.Module) -> nn.Module:
    """Out-of-place compaction of every learned-rank / sparse matrix in ``model``.

    Each :class:`LowRankSTR` becomes ``FixedRank(A_r · diag(S_g(σ, s)_r), B_rᵀ)`` over its
    active columns, or :class:`Dense` when ``r (out + in) >= out · in``, or an empty
    :class:`FixedSparse` when ``r = 0``; each :class:`SparseSTR` becomes a
    :class:`FixedSparse` of its nonzeros (:class:`Dense` when it has no zeros). Everything
    else is copied. The outputs of the returned model equal those of ``model`` (to float
    rounding) and ``count_params(compact(model)) == count_params(model)``.
    """
    new = copy.deepcopy(model)
    if isinstance(new, Matrix):
        return compact_matrix(new)
    for name, child in list(new.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, (LowRankSTR, SparseSTR)):
                setattr(child, attr, compact_matrix(sub))
    return new
