r"""Compiled (numba) inference loops for small CPU batches: one step, or a whole sequence,
of the FastGRNN, FastRNN, GRU and LSTM cells on NumPy arrays.

A batch of one is a ``1 x H`` times ``H x G·H`` product and a few ``G·H``-long
element-wise operations per step: a microsecond or two of arithmetic. Called from Python
(NumPy, torch) each operation costs its dispatch instead; compiled, a step is one call.

Conventions (every array C-contiguous, of one float dtype):

* a matrix ``M`` (``[out, in]``, applied as :math:`y_j = \sum_k M_{jk} x_k`) is passed as
  two operands ``(m, mt)``: ``m = M`` or ``mt = Mᵀ``, whichever is C-contiguous in the
  parameter's own memory (a streaming step reads the parameters in place, whatever their
  layout), the other empty (shape ``(0, 0)``). From ``M`` the sum runs along contiguous
  rows, a reduction vectorised by reassociating it (``fastmath={"reassoc"}`` on
  :func:`_matvec` only, as a BLAS sums); from ``Mᵀ`` it adds scaled rows;
* a chain is one or two matrices, ``y = M_2 (M_1 x)``: four operands
  ``(m1, m1t, m2, m2t)``, the last two ``(0, 0)`` for ``y = M_1 x`` (a factor of rank 0,
  ``(out, 0)`` or ``(0, out)``, is a zero matrix, not an absent one);
* element-wise maths runs in float64 (a float32 value converts exactly) with one ``exp``
  per logistic and per ``tanh``:

  .. math:: \sigma(a) = \frac{1}{1 + e^{-a}}, \qquad \tanh(a) = 1 - \frac{2}{e^{2a} + 1}

  (libm's ``exp`` is about twice as fast as its ``tanh``; the absolute error stays at
  float64 rounding, far below the tolerances the tests hold these loops to);
* 0-d arrays hold the raw scalars (``ζ``, ``ν``, ``α``, ``β``: ``sigmoid`` applied here),
  so a streaming step sees their current value.

``*_seq`` kernels take ``X [T, B, G·H]`` (the input projection of every step, computed
beforehand in one matmul) and ``S [T + 1, B, H]`` with ``S[0] = h_0``, and write
``S[t + 1] = h_t`` (``C`` likewise for the LSTM's cell state). ``*_step`` kernels take
``x [B, F]`` and the input chain too, and write ``h_t`` (and ``c_t``) into ``out``
(``c_out``). Each compiles on first use for float32 or float64 (``cache=True``: once per
machine).
"""
from __future__ import annotations

import math

import numba
import numpy as np

# error_model="numpy": no zero-division checks in the loops (every denominator here is
# at least 1), which would keep them from vectorising
_JIT = dict(cache=True, error_model="numpy")


# ---------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------
@numba.njit(fastmath={"reassoc"}, **_JIT)
def _matvec(x, m, mt, out):
    """``out[b] = M x[b]`` for every row ``b`` of ``x``, from ``M`` or (``M`` empty) ``Mᵀ``."""
    if m.shape[0]:
        for b in range(x.shape[0]):
            for j in range(m.shape[0]):
                acc = x.dtype.type(0)
                for k in range(m.shape[1]):
                    acc += m[j, k] * x[b, k]
                out[b, j] = acc
    else:  # rows of Mᵀ scaled and summed: the same vectorised loop, over j
        out[:] = 0
        for b in range(x.shape[0]):
            for k in range(mt.shape[0]):
                xk = x[b, k]
                for j in range(mt.shape[1]):
                    out[b, j] += xk * mt[k, j]


@numba.njit(**_JIT)
def _rows(m, mt):
    return m.shape[0] if m.shape[0] else mt.shape[1]


@numba.njit(**_JIT)
def _chain(x, m1, m1t, m2, m2t):
    """``M_2 (M_1 x)`` (``M_1 x`` when both ``M_2`` operands are ``(0, 0)``) for every row of ``x``."""
    y = np.empty((x.shape[0], _rows(m1, m1t)), x.dtype)
    _matvec(x, m1, m1t, y)
    # absent is both operands (0, 0); a rank-0 factor is empty along one side only
    # ((out, 0) or (0, out)) and must still write its zeros into an [B, out] result
    if m2.shape[0] + m2.shape[1] + m2t.shape[0] + m2t.shape[1] == 0:
        return y
    out = np.empty((x.shape[0], _rows(m2, m2t)), x.dtype)
    _matvec(y, m2, m2t, out)
    return out


@numba.njit(**_JIT)
def _sigmoid(a):
    return 1.0 / (1.0 + math.exp(-a))


@numba.njit(**_JIT)
def _tanh(a):
    return 1.0 - 2.0 / (math.exp(2.0 * a) + 1.0)


@numba.njit(**_JIT)
def _scalar(raw):
    """``sigmoid`` of a 0-d parameter array, as a float64."""
    return _sigmoid(float(raw[()]))


# ---------------------------------------------------------------------------------------
# the cells' equations given wx = W x_t and uh = U h_{t-1}  ([B, G·H] each)
# ---------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _fastgrnn(wx, uh, h, out, bias_z, bias_h, zeta, nu):
    """``h_t = (ζ (1 - z) + ν) tanh(pre + b_h) + z h``, ``z = σ(pre + b_z)``, ``pre = wx + uh``."""
    for b in range(h.shape[0]):
        for j in range(h.shape[1]):
            pre = float(wx[b, j]) + float(uh[b, j])
            z = _sigmoid(pre + bias_z[j])
            out[b, j] = (zeta * (1.0 - z) + nu) * _tanh(pre + bias_h[j]) + z * h[b, j]


@numba.njit(**_JIT)
def _fastrnn(wx, uh, h, out, bias, alpha, beta):
    """``h_t = β h + α tanh(wx + uh + b)``."""
    for b in range(h.shape[0]):
        for j in range(h.shape[1]):
            out[b, j] = beta * h[b, j] + alpha * _tanh(float(wx[b, j]) + float(uh[b, j]) + bias[j])


@numba.njit(**_JIT)
def _gate(wx, uh, bias_ih, bias_hh, b, q):
    """Pre-activation ``wx + b_ih + uh + b_hh`` of column ``q`` (float64)."""
    return float(wx[b, q]) + bias_ih[q] + float(uh[b, q]) + bias_hh[q]


@numba.njit(**_JIT)
def _gru(wx, uh, h, out, bias_ih, bias_hh):
    """torch's GRU: ``r, z = σ(wx + b_i + uh + b_h)``, ``n = tanh(wx_n + b_in + r (uh_n + b_hn))``,
    ``h_t = n + z (h - n)``."""
    H = h.shape[1]
    for b in range(h.shape[0]):
        for j in range(H):
            r = _sigmoid(_gate(wx, uh, bias_ih, bias_hh, b, j))
            z = _sigmoid(_gate(wx, uh, bias_ih, bias_hh, b, H + j))
            q = 2 * H + j
            n = _tanh(float(wx[b, q]) + bias_ih[q] + r * (float(uh[b, q]) + bias_hh[q]))
            out[b, j] = n + z * (h[b, j] - n)


@numba.njit(**_JIT)
def _lstm(wx, uh, c, out, c_out, bias_ih, bias_hh):
    """torch's LSTM: ``(i, f, g, o) = wx + b_ih + uh + b_hh``,
    ``c_t = σ(f) c + σ(i) tanh(g)``, ``h_t = σ(o) tanh(c_t)``."""
    H = c.shape[1]
    for b in range(c.shape[0]):
        for j in range(H):
            i = _gate(wx, uh, bias_ih, bias_hh, b, j)
            f = _gate(wx, uh, bias_ih, bias_hh, b, H + j)
            g = _gate(wx, uh, bias_ih, bias_hh, b, 2 * H + j)
            o = _gate(wx, uh, bias_ih, bias_hh, b, 3 * H + j)
            c_out[b, j] = _sigmoid(f) * c[b, j] + _sigmoid(i) * _tanh(g)
            # tanh of the stored (rounded) c_t, as the reference computes it
            out[b, j] = _sigmoid(o) * _tanh(float(c_out[b, j]))


# ---------------------------------------------------------------------------------------
# kernels: a whole sequence (X = W x_t given), or one step (x_t given)
# ---------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def fastgrnn_seq(X, S, u1, u1t, u2, u2t, bias_z, bias_h, zeta, nu):
    """FastGRNN over a sequence: ``S[t + 1]`` from ``X[t]`` and ``S[t]``."""
    z, n = _scalar(zeta), _scalar(nu)
    for t in range(X.shape[0]):
        _fastgrnn(X[t], _chain(S[t], u1, u1t, u2, u2t), S[t], S[t + 1], bias_z, bias_h, z, n)


@numba.njit(**_JIT)
def fastgrnn_step(x, h, out, w1, w1t, w2, w2t, u1, u1t, u2, u2t, bias_z, bias_h, zeta, nu):
    """One FastGRNN step: ``out`` from ``x`` and ``h``."""
    _fastgrnn(_chain(x, w1, w1t, w2, w2t), _chain(h, u1, u1t, u2, u2t), h, out, bias_z, bias_h,
              _scalar(zeta), _scalar(nu))


@numba.njit(**_JIT)
def fastrnn_seq(X, S, u1, u1t, u2, u2t, bias, alpha, beta):
    """FastRNN over a sequence: ``S[t + 1]`` from ``X[t]`` and ``S[t]``."""
    a, b = _scalar(alpha), _scalar(beta)
    for t in range(X.shape[0]):
        _fastrnn(X[t], _chain(S[t], u1, u1t, u2, u2t), S[t], S[t + 1], bias, a, b)


@numba.njit(**_JIT)
def fastrnn_step(x, h, out, w1, w1t, w2, w2t, u1, u1t, u2, u2t, bias, alpha, beta):
    """One FastRNN step: ``out`` from ``x`` and ``h``."""
    _fastrnn(_chain(x, w1, w1t, w2, w2t), _chain(h, u1, u1t, u2, u2t), h, out, bias, _scalar(alpha), _scalar(beta))


@numba.njit(**_JIT)
def gru_seq(X, S, u1, u1t, u2, u2t, bias_ih, bias_hh):
    """GRU over a sequence: ``S[t + 1]`` from ``X[t]`` and ``S[t]``."""
    for t in range(X.shape[0]):
        _gru(X[t], _chain(S[t], u1, u1t, u2, u2t), S[t], S[t + 1], bias_ih, bias_hh)


@numba.njit(**_JIT)
def gru_step(x, h, out, w1, w1t, w2, w2t, u1, u1t, u2, u2t, bias_ih, bias_hh):
    """One GRU step: ``out`` from ``x`` and ``h``."""
    _gru(_chain(x, w1, w1t, w2, w2t), _chain(h, u1, u1t, u2, u2t), h, out, bias_ih, bias_hh)


@numba.njit(**_JIT)
def lstm_seq(X, S, C, u1, u1t, u2, u2t, bias_ih, bias_hh):
    """LSTM over a sequence: ``S[t + 1], C[t + 1]`` from ``X[t]``, ``S[t]`` and ``C[t]``."""
    for t in range(X.shape[0]):
        _lstm(X[t], _chain(S[t], u1, u1t, u2, u2t), C[t], S[t + 1], C[t + 1], bias_ih, bias_hh)


@numba.njit(**_JIT)
def lstm_step(x, h, c, out, c_out, w1, w1t, w2, w2t, u1, u1t, u2, u2t, bias_ih, bias_hh):
    """One LSTM step: ``out``, ``c_out`` from ``x``, ``h`` and ``c``."""
    _lstm(_chain(x, w1, w1t, w2, w2t), _chain(h, u1, u1t, u2, u2t), c, out, c_out, bias_ih, bias_hh)
