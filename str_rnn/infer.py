r"""Lean no-gradient time loops for small batches on the CPU (streaming and batch-1 use).

With one sequence at a time the arithmetic of a step is a ``1 x H`` times ``H x G·H``
product and a few ``G·H``-long element-wise operations: microseconds. What costs is the
number of calls: a torch operation spends about 1 µs in dispatch (more with autograd).
This module runs the recurrence in NumPy on views of the same memory (``Tensor.numpy()``
shares storage; about 0.3 µs an operation), into preallocated buffers, and computes the
logistic gates through the ``tanh`` of pre-scaled inputs,

.. math:: \sigma(a) = \tfrac12 \tanh(\tfrac a2) + \tfrac12,

so that one ``tanh`` call covers several gates. Over a sequence the recurrent chain is
multiplied out to one dense matrix (one product a step beats two smaller ones at this
size); a single streaming step keeps the active factors. Results equal the fused and
reference loops to float rounding (the tests compare them).

Where numba is installed the loops run compiled instead (:mod:`str_rnn.kernels`, one call
a layer and sequence; see :func:`kernels`); the NumPy loops here are the fallback.

Used by :class:`str_rnn.rnn.RNN` (``forward`` and ``step``) when no gradient is needed,
the tensors are float32 or float64 on the CPU, and the batch has at most
:data:`MAX_BATCH` sequences; larger batches take the fused kernels (:mod:`str_rnn.fused`)
under ``no_grad`` instead.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import jit
from .cells import FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell

MAX_BATCH = 8
"""Largest batch run by this module; above it per-call overhead no longer dominates."""

MERGE_STEPS = 8
"""Sequences at least this long multiply the recurrent chain out to one dense matrix (NumPy loops)."""

USE_KERNELS = True
"""Run the compiled loops of :mod:`str_rnn.kernels` where numba imports (``False``: the NumPy
loops of this module, as without numba; tests switch it)."""

_DTYPES = (torch.float32, torch.float64)

PARAMS = {FastGRNNCell: ("bias_z", "bias_h", "zeta", "nu"), FastRNNCell: ("bias", "alpha", "beta"),
          GRUCell: ("bias_ih", "bias_hh"), LSTMCell: ("bias_ih", "bias_hh")}
"""The element-wise parameters of each cell type, in the order its kernels take them."""


def kernels():
    """:mod:`str_rnn.kernels`, or ``None`` where numba is not importable or
    :data:`USE_KERNELS` is off. Imported on first use: numba takes a while to load."""
    return jit.load("kernels") if USE_KERNELS else None


_NAMES = {FastGRNNCell: "fastgrnn", FastRNNCell: "fastrnn", GRUCell: "gru", LSTMCell: "lstm"}


def kernel(cell: RNNCell, kind: str):
    """The compiled ``kind`` (``"seq"`` or ``"step"``) loop of ``cell``'s type, or ``None``."""
    k = kernels()
    return None if k is None else getattr(k, f"{_NAMES[type(cell)]}_{kind}")


def operands(chain: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """A chain ``x @ C_1 @ ... @ C_n`` as the kernels' ``(m1, m1t, m2, m2t)`` (see
    :mod:`str_rnn.kernels`): views of the arrays where they are C- or F-contiguous and
    ``n <= 2`` (:func:`follows`), copies otherwise."""
    if len(chain) > 2:
        chain = [functools.reduce(np.matmul, chain[:-1]), chain[-1]]
    empty = np.empty((0, 0), chain[0].dtype)
    out = []
    for c in chain:  # c = Mᵀ: C-contiguous as it is, or M = cᵀ C-contiguous (copied if neither)
        out += (empty, c) if c.flags.c_contiguous else (np.ascontiguousarray(c.T), empty)
    return tuple(out) + (empty, empty) * (2 - len(chain))


def vector_operands(arrays: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Element-wise parameters as the kernels take them: scalars (0-d) as they are, vectors
    C-contiguous (views where they already are, copies otherwise)."""
    return tuple(a if a.ndim == 0 else np.ascontiguousarray(a) for a in arrays)


def follows(chain: list[np.ndarray]) -> bool:
    """Whether :func:`operands` of ``chain`` are views of its arrays."""
    return len(chain) <= 2 and all(c.flags.c_contiguous or c.flags.f_contiguous for c in chain)


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


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().numpy().astype(dtype, copy=False)


def _chain(cell: RNNCell, dtype, merge: bool) -> list[np.ndarray]:
    """``U`` as NumPy matrices with ``h @ C_1 @ ... == U(h)`` (one matrix if ``merge``)."""
    chain = cell.U.chain()
    if merge and len(chain) > 1:
        u = chain[0]
        for c in chain[1:]:
            u = u @ c
        chain = [u]
    return [_np(c, dtype) for c in chain]


def _apply(h: np.ndarray, inner: list[np.ndarray]) -> np.ndarray:
    for c in inner:
        h = h @ c
    return h


def _final(S: np.ndarray, last) -> np.ndarray:
    if last is None:
        return S[-1].copy()
    return S[last + 1, np.arange(S.shape[1])]


def _scalar(t: torch.Tensor, dtype):
    """``sigmoid(t)`` of a 0-d parameter as a NumPy scalar."""
    return dtype.type(1.0 / (1.0 + math.exp(-t.item())))


@functools.lru_cache(maxsize=32)
def _affine_halves(hidden: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``P = [½, 1]``, ``Q = [½, 0]`` (``hidden`` each): ``[2z - 1, h~] P + Q = [z, h~]``."""
    P = np.concatenate([np.full(hidden, 0.5, dtype), np.ones(hidden, dtype)])
    Q = np.concatenate([np.full(hidden, 0.5, dtype), np.zeros(hidden, dtype)])
    P.flags.writeable = Q.flags.writeable = False
    return P, Q


# ---------------------------------------------------------------------------------------
# one NumPy loop per cell: X = W x_t [T, B, G·H], h0 (and c0) [B, H] -> S (and C) [T + 1, B, H]
# ---------------------------------------------------------------------------------------
def _fastgrnn(cell: FastGRNNCell, X: np.ndarray, h0: np.ndarray, merge: bool):
    steps, batch, hidden = X.shape
    dt = X.dtype
    zeta, nu = _scalar(cell.zeta, dt), _scalar(cell.nu, dt)
    *inner, u = _chain(cell, dt, merge)
    # q = [(pre + b_z) / 2, pre + b_h];  tanh(q) = [2z - 1, h~]
    u2 = np.empty((u.shape[0], 2 * hidden), dt)
    np.multiply(u, dt.type(0.5), out=u2[:, :hidden])
    u2[:, hidden:] = u
    x2 = np.empty((steps, batch, 2 * hidden), dt)
    np.add(X, _np(cell.bias_z, dt), out=x2[..., :hidden])
    x2[..., :hidden] *= dt.type(0.5)
    np.add(X, _np(cell.bias_h, dt), out=x2[..., hidden:])
    # [2z - 1, h~] * P + Q = [z, h~];  [z, h~] * [h - ζ h~, c1] summed by halves = h_t
    P, Q = _affine_halves(hidden, dt)
    S = np.empty((steps + 1, batch, hidden), dt)
    S[0] = h0
    q = np.empty((batch, 2 * hidden), dt)
    r = np.empty((batch, 2 * hidden), dt)
    r[:, hidden:] = zeta + nu
    ht, r1, qa, qb = q[:, hidden:], r[:, :hidden], q[:, :hidden], q[:, hidden:]
    xs, hs = list(x2), list(S)
    mul, add, dot, tanh = np.multiply, np.add, np.dot, np.tanh
    for t in range(steps):
        h = hs[t]
        dot(_apply(h, inner), u2, out=q)
        add(q, xs[t], out=q)
        tanh(q, out=q)
        mul(q, P, out=q)
        add(q, Q, out=q)
        mul(ht, -zeta, out=r1)
        add(r1, h, out=r1)
        mul(q, r, out=q)
        add(qa, qb, out=hs[t + 1])
    return S


def _fastrnn(cell: FastRNNCell, X: np.ndarray, h0: np.ndarray, merge: bool):
    steps, batch, hidden = X.shape
    dt = X.dtype
    alpha, beta = _scalar(cell.alpha, dt), _scalar(cell.beta, dt)
    *inner, u = _chain(cell, dt, merge)
    x = X + _np(cell.bias, dt)
    S = np.empty((steps + 1, batch, hidden), dt)
    S[0] = h0
    q = np.empty((batch, hidden), dt)
    for t in range(steps):
        h, out = S[t], S[t + 1]
        np.dot(_apply(h, inner), u, out=q)
        q += x[t]
        np.tanh(q, out=q)
        q *= alpha
        np.multiply(h, beta, out=out)
        out += q
    return S


def _gru(cell: GRUCell, X: np.ndarray, h0: np.ndarray, merge: bool):
    steps, batch, hidden = X.shape[0], X.shape[1], X.shape[2] // 3
    dt = X.dtype
    h2 = 2 * hidden
    # halve the r, z columns: tanh(q_rz) = 2 (r, z) - 1
    scale = np.ones(3 * hidden, dt)
    scale[:h2] = 0.5
    *inner, u = _chain(cell, dt, merge)
    u = u * scale
    bhh = _np(cell.bias_hh, dt) * scale
    x = (X + _np(cell.bias_ih, dt)) * scale
    S = np.empty((steps + 1, batch, hidden), dt)
    S[0] = h0
    hg = np.empty((batch, 3 * hidden), dt)
    rz = np.empty((batch, h2), dt)
    n, d = np.empty((batch, hidden), dt), np.empty((batch, hidden), dt)
    r, z = rz[:, :hidden], rz[:, hidden:]
    for t in range(steps):
        h, out = S[t], S[t + 1]
        np.dot(_apply(h, inner), u, out=hg)
        hg += bhh
        np.add(hg[:, :h2], x[t, :, :h2], out=rz)
        np.tanh(rz, out=rz)
        rz *= dt.type(0.5)
        rz += dt.type(0.5)
        np.multiply(r, hg[:, h2:], out=n)
        n += x[t, :, h2:]
        np.tanh(n, out=n)
        np.subtract(h, n, out=d)
        d *= z
        np.add(n, d, out=out)
    return S


def _lstm(cell: LSTMCell, X: np.ndarray, h0: np.ndarray, c0: np.ndarray, merge: bool):
    steps, batch, hidden = X.shape[0], X.shape[1], X.shape[2] // 4
    dt = X.dtype
    # halve the i, f, o columns: one tanh gives 2 (i, f) - 1, tanh(g), 2 o - 1
    scale = np.full(4 * hidden, 0.5, dt)
    scale[2 * hidden:3 * hidden] = 1.0
    *inner, u = _chain(cell, dt, merge)
    u = u * scale
    x = (X + _np(cell.bias_ih + cell.bias_hh, dt)) * scale
    S = np.empty((steps + 1, batch, hidden), dt)
    C = np.empty_like(S)
    S[0], C[0] = h0, c0
    q = np.empty((batch, 4 * hidden), dt)
    tmp = np.empty((batch, hidden), dt)
    i_f, g, o = q[:, :2 * hidden], q[:, 2 * hidden:3 * hidden], q[:, 3 * hidden:]
    i, f = q[:, :hidden], q[:, hidden:2 * hidden]
    for t in range(steps):
        h, c, out, c_out = S[t], C[t], S[t + 1], C[t + 1]
        np.dot(_apply(h, inner), u, out=q)
        q += x[t]
        np.tanh(q, out=q)
        i_f *= dt.type(0.5)
        i_f += dt.type(0.5)
        o *= dt.type(0.5)
        o += dt.type(0.5)
        np.multiply(f, c, out=c_out)
        np.multiply(i, g, out=tmp)
        c_out += tmp
        np.tanh(c_out, out=tmp)
        np.multiply(o, tmp, out=out)
    return S, C


_LOOPS = {FastGRNNCell: _fastgrnn, FastRNNCell: _fastrnn, GRUCell: _gru, LSTMCell: _lstm}


@torch.no_grad()
def scan(cell: RNNCell, x: torch.Tensor, state, last: torch.Tensor | None = None):
    """Run one layer (input projection and recurrence) over time-major ``x [T, B, F]``
    without autograd.

    Args:
        cell: a FastGRNN, FastRNN, GRU or LSTM cell.
        x: the layer's input (CPU, float32 or float64).
        state: initial ``h`` or ``(h, c)``, ``[B, H]`` each.
        last: ``[B]`` index of each sequence's last step, or ``None`` for ``T - 1``.

    Returns:
        ``(states [T, B, H], final state)``: ``states[t] = h_{t+1}``; the final state
        (``[B, H]``, or ``(h, c)``) is taken at ``last``.
    """
    # the projection of all steps in torch: NumPy's BLAS would start threads of its own
    X = cell.W(x).detach().contiguous().numpy()
    idx = None if last is None else last.cpu().numpy()
    h0, c0 = state if cell.has_cell_state else (state, None)
    h0 = _np(h0, X.dtype)
    c0 = None if c0 is None else _np(c0, X.dtype)
    run = kernel(cell, "seq")
    S, C = _numpy(cell, X, h0, c0) if run is None else _compiled(run, cell, X, h0, c0)
    h_n = torch.from_numpy(_final(S, idx))
    return torch.from_numpy(S)[1:], h_n if C is None else (h_n, torch.from_numpy(_final(C, idx)))


def _numpy(cell: RNNCell, X: np.ndarray, h0: np.ndarray, c0):
    """``S [T + 1, B, H]`` (``S[0] = h0``) and ``C`` likewise (``None`` but for an LSTM)
    from the NumPy loops."""
    merge = X.shape[0] >= MERGE_STEPS
    if c0 is None:
        return _LOOPS[type(cell)](cell, X, h0, merge), None
    return _lstm(cell, X, h0, c0, merge)


def _compiled(run, cell: RNNCell, X: np.ndarray, h0: np.ndarray, c0):
    """:func:`_numpy`'s ``(S, C)`` from the compiled loop ``run``, with the recurrent chain
    as it is (its active factors: a product per factor and step costs no call here)."""
    dt = X.dtype
    S = np.empty((X.shape[0] + 1,) + h0.shape, dt)
    S[0] = h0
    u = operands([_np(c, dt) for c in cell.U.chain()])
    params = vector_operands([_np(getattr(cell, n), dt) for n in PARAMS[type(cell)]])
    if c0 is None:
        run(X, S, *u, *params)
        return S, None
    C = np.empty_like(S)
    C[0] = c0
    run(X, S, C, *u, *params)
    return S, C
