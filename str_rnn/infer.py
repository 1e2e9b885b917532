r"""Lean no-gradient time loops for small batches on the CPU (streaming and batch-1 use).

With one sequence at a time the arithmetic of a step is a ``1 x H`` times ``H x G·H``
product and a few ``G·H``-long element-wise operations: microseconds. What costs is the
number of calls: a torch operation spends about 1 µs in dispatch, and autograd triples
that. This module runs the recurrence in NumPy on views of the same memory
(``Tensor.numpy()`` shares storage; about 0.3 µs an operation), into preallocated
buffers, with the recurrent chain multiplied out to one dense matrix (one product a step
beats two smaller ones at this size), and with the logistic gates computed through the
``tanh`` of pre-scaled inputs,

.. math:: \sigma(a) = \tfrac12 \tanh(\tfrac a2) + \tfrac12,

so that one ``tanh`` call covers several gates. Results equal the fused and reference
loops to float rounding (the tests compare them).

Used by :class:`str_rnn.rnn.RNN` when no gradient is needed, the tensors are float32 or
float64 on the CPU, and the batch has at most :data:`MAX_BATCH` sequences; larger batches
take the fused kernels (:mod:`str_rnn.fused`) under ``no_grad`` instead.
"""
from __future__ import annotations

import numpy as np
import torch

from .cells import FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell

MAX_BATCH = 8
"""Largest batch run by this module; above it per-call overhead no longer dominates."""

_DTYPES = (torch.float32, torch.float64)


def needs_grad(module: torch.nn.Module, x: torch.Tensor, states) -> bool:
    """Whether a forward pass through ``module`` on ``x`` and ``states`` must record autograd."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or any(p.requires_grad for p in module.parameters()):
        return True
    parts = [p for s in states for p in (s if isinstance(s, tuple) else (s,))]
    return any(p.requires_grad for p in parts)


def supports(module: torch.nn.Module, batch: int, x: torch.Tensor) -> bool:
    """Whether this module's loops apply to ``batch`` sequences like ``x``: CPU, float32/64,
    ``batch <= MAX_BATCH``, and every layer of a type with a loop here."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and batch <= MAX_BATCH
            and all(type(c) in _LOOPS for c in module.layers))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _dense_u(cell: RNNCell, dtype) -> np.ndarray:
    """``U`` as one ``H x G·H`` array with ``h @ U_np == U(h)`` (chain multiplied out)."""
    chain = cell.U.chain()
    u = chain[0]
    for c in chain[1:]:
        u = u @ c
    return np.array(_np(u), dtype=dtype, order="C")


def _final(S: np.ndarray, last) -> np.ndarray:
    if last is None:
        return S[-1].copy()
    return S[last + 1, np.arange(S.shape[1])]


# ---------------------------------------------------------------------------------------
# one loop per cell; each takes X = W x_t [T, B, G·H] (NumPy), h0 (and c0) [B, H]
# ---------------------------------------------------------------------------------------
def _fastgrnn(cell: FastGRNNCell, X: np.ndarray, h0: np.ndarray, last):
    steps, batch, hidden = X.shape
    dt = X.dtype.type
    zeta = dt(torch.sigmoid(cell.zeta).item())
    nu = dt(torch.sigmoid(cell.nu).item())
    u = _dense_u(cell, X.dtype)
    # q = [(pre + b_z) / 2, pre + b_h]; tanh(q) = [2z - 1, h~]
    u2 = np.concatenate([u * dt(0.5), u], axis=1)
    x2 = np.concatenate([(X + _np(cell.bias_z)) * dt(0.5), X + _np(cell.bias_h)], axis=2)
    # with z = (1 + t)/2:  h' = a h~ + h/2 + t (h/2 - b h~),  a = ζ/2 + ν, b = ζ/2
    a, b = dt(0.5) * zeta + nu, dt(0.5) * zeta
    S = np.empty((steps + 1, batch, hidden), X.dtype)
    S[0] = h0
    q = np.empty((batch, 2 * hidden), X.dtype)
    half, w = np.empty((batch, hidden), X.dtype), np.empty((batch, hidden), X.dtype)
    t1, ht = q[:, :hidden], q[:, hidden:]
    for t in range(steps):
        h, out = S[t], S[t + 1]
        np.dot(h, u2, out=q)
        q += x2[t]
        np.tanh(q, out=q)
        np.multiply(h, dt(0.5), out=half)
        np.multiply(ht, -b, out=w)
        w += half
        w *= t1
        np.multiply(ht, a, out=out)
        out += half
        out += w
    return S, _final(S, last)


def _fastrnn(cell: FastRNNCell, X: np.ndarray, h0: np.ndarray, last):
    steps, batch, hidden = X.shape
    dt = X.dtype.type
    alpha = dt(torch.sigmoid(cell.alpha).item())
    beta = dt(torch.sigmoid(cell.beta).item())
    u = _dense_u(cell, X.dtype)
    x = X + _np(cell.bias)
    S = np.empty((steps + 1, batch, hidden), X.dtype)
    S[0] = h0
    q = np.empty((batch, hidden), X.dtype)
    for t in range(steps):
        h, out = S[t], S[t + 1]
        np.dot(h, u, out=q)
        q += x[t]
        np.tanh(q, out=q)
        q *= alpha
        np.multiply(h, beta, out=out)
        out += q
    return S, _final(S, last)


def _gru(cell: GRUCell, X: np.ndarray, h0: np.ndarray, last):
    steps, batch, hidden = X.shape[0], X.shape[1], X.shape[2] // 3
    dt = X.dtype.type
    h2 = 2 * hidden
    # halve the r, z columns: tanh(q_rz) = 2 (r, z) - 1
    scale = np.ones(3 * hidden, X.dtype)
    scale[:h2] = 0.5
    u = _dense_u(cell, X.dtype) * scale
    bhh = _np(cell.bias_hh).astype(X.dtype) * scale
    x = (X + _np(cell.bias_ih)) * scale
    S = np.empty((steps + 1, batch, hidden), X.dtype)
    S[0] = h0
    hg = np.empty((batch, 3 * hidden), X.dtype)
    rz = np.empty((batch, h2), X.dtype)
    n, d = np.empty((batch, hidden), X.dtype), np.empty((batch, hidden), X.dtype)
    r, z = rz[:, :hidden], rz[:, hidden:]
    for t in range(steps):
        h, out = S[t], S[t + 1]
        np.dot(h, u, out=hg)
        hg += bhh
        np.add(hg[:, :h2], x[t, :, :h2], out=rz)
        np.tanh(rz, out=rz)
        rz *= dt(0.5)
        rz += dt(0.5)
        np.multiply(r, hg[:, h2:], out=n)
        n += x[t, :, h2:]
        np.tanh(n, out=n)
        np.subtract(h, n, out=d)
        d *= z
        np.add(n, d, out=out)
    return S, _final(S, last)


def _lstm(cell: LSTMCell, X: np.ndarray, h0: np.ndarray, c0: np.ndarray, last):
    steps, batch, hidden = X.shape[0], X.shape[1], X.shape[2] // 4
    dt = X.dtype.type
    # halve the i, f, o columns: one tanh gives 2 (i, f) - 1, tanh(g), 2 o - 1
    scale = np.full(4 * hidden, 0.5, X.dtype)
    scale[2 * hidden:3 * hidden] = 1.0
    u = _dense_u(cell, X.dtype) * scale
    x = (X + _np(cell.bias_ih + cell.bias_hh)) * scale
    S = np.empty((steps + 1, batch, hidden), X.dtype)
    C = np.empty_like(S)
    S[0], C[0] = h0, c0
    q = np.empty((batch, 4 * hidden), X.dtype)
    tmp = np.empty((batch, hidden), X.dtype)
    i_f, g, o = q[:, :2 * hidden], q[:, 2 * hidden:3 * hidden], q[:, 3 * hidden:]
    i, f = q[:, :hidden], q[:, hidden:2 * hidden]
    for t in range(steps):
        h, c, out, c_out = S[t], C[t], S[t + 1], C[t + 1]
        np.dot(h, u, out=q)
        q += x[t]
        np.tanh(q, out=q)
        i_f *= dt(0.5)
        i_f += dt(0.5)
        o *= dt(0.5)
        o += dt(0.5)
        np.multiply(f, c, out=c_out)
        np.multiply(i, g, out=tmp)
        c_out += tmp
        np.tanh(c_out, out=tmp)
        np.multiply(o, tmp, out=out)
    return S, C, _final(S, last), _final(C, last)


_LOOPS = {FastGRNNCell: _fastgrnn, FastRNNCell: _fastrnn, GRUCell: _gru, LSTMCell: _lstm}


@torch.no_grad()
def scan(cell: RNNCell, wx: torch.Tensor, state, last: torch.Tensor | None = None):
    """Run one layer over time-major ``wx [T, B, G·H]`` without autograd.

    Args:
        cell: a FastGRNN, FastRNN, GRU or LSTM cell.
        wx: ``W x_t`` for all steps (CPU, float32 or float64).
        state: initial ``h`` or ``(h, c)``, ``[B, H]`` each.
        last: ``[B]`` index of each sequence's last step, or ``None`` for ``T - 1``.

    Returns:
        ``(states [T, B, H], final state)`` as in :func:`str_rnn.fused.fused_scan`.
    """
    X = _np(wx.contiguous())
    idx = None if last is None else last.cpu().numpy()
    loop = _LOOPS[type(cell)]
    if cell.has_cell_state:
        S, _, h_n, c_n = loop(cell, X, _np(state[0]), _np(state[1]), idx)
        return torch.from_numpy(S)[1:], (torch.from_numpy(h_n), torch.from_numpy(c_n))
    S, h_n = loop(cell, X, _np(state), idx)
    return torch.from_numpy(S)[1:], torch.from_numpy(h_n)
