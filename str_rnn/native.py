"""torch's own fused LSTM kernel, driven with str_rnn's effective weights.

On the CPU ``torch.nn.LSTM`` runs oneDNN's fused LSTM primitive (``mkldnn_rnn_layer``):
the whole sequence in one native call, parallel over the threads torch is given. When an
STR LSTM's matrices are effectively dense (full rank, or factors that would not be
cheaper, see :func:`str_rnn.fused_ops.chain`), handing torch's kernel the dense matrices
``W = A S_g(σ, s) Bᵀ`` and ``U`` is exact and as fast as ``torch.nn.LSTM`` itself: the
weights are differentiable tensors, so autograd takes their gradients on to ``A``, ``σ``,
``B`` and the thresholds. Learned low ranks keep the fused kernels of
:mod:`str_rnn.fused`, whose cost follows the rank.

Only for whole sequences (no ``lengths``: torch's packed path is not the fused one) on
the CPU; elsewhere :mod:`str_rnn.fused` runs. For training, only where the fused LSTM
kernel runs as torch operations: with its compiled element-wise steps
(:func:`str_rnn.fused_ops.compiled`, numba) a training step of the fused kernel is
faster than oneDNN's (0.76-0.78 of ``torch.nn.LSTM``'s with one thread on the benchmark
CPU, and about half its peak memory: no oneDNN workspace, no page faults). Without
gradients oneDNN's forward pass stays the faster one (0.7 of the fused kernel's).
"""
from __future__ import annotations

import torch

from . import fused_ops as ops
from .cells import LSTMCell

_DTYPES = (torch.float32, torch.float64)


def lstm(rnn, x: torch.Tensor, states, train: bool):
    """All layers of an LSTM :class:`~str_rnn.rnn.RNN` over batch-first ``x`` in one call.

    Args:
        rnn: the model (every layer an :class:`~str_rnn.cells.LSTMCell`).
        x: ``[B, T, F]``.
        states: per layer ``(h, c)``, ``[B, H]`` each.
        train: whether a backward pass will follow (the kernel then keeps its workspace).

    Returns:
        ``(outputs [B, T, H], per-layer final (h, c))``, or None when the kernel does not
        apply (not on the CPU, unsupported dtype, a matrix cheaper in factored form) or
        is not the faster one (training with the fused kernel's compiled steps).
    """
    if x.device.type != "cpu" or x.dtype not in _DTYPES or not all(type(c) is LSTMCell for c in rnn.layers):
        return None
    if train and ops.compiled(x) is not None:
        return None
    weights = []
    for cell in rnn.layers:
        w, u = ops.chain(cell.W, ops.INPUT_FACTORED_MAX), ops.chain(cell.U)
        if len(w) > 1 or len(u) > 1:
            return None
        # torch's layout: weight_ih [4H, F], weight_hh [4H, H], contiguous
        weights += [w[0].mT.contiguous(), u[0].mT.contiguous(), cell.bias_ih, cell.bias_hh]
    h0 = torch.stack([s[0] for s in states])
    c0 = torch.stack([s[1] for s in states])
    out, h_n, c_n = torch._VF.lstm(x, (h0, c0), weights, True, len(rnn.layers), 0.0, train, False, True)
    return out, [(h_n[i], c_n[i]) for i in range(len(rnn.layers))]
