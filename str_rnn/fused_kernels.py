r"""Compiled per-step element-wise work of the FastGRNN and LSTM kernels (numba, optional).

The kernels of :mod:`str_rnn.fused` run one small torch operation after another at every
time step; at ``[100, 100]`` each costs about 3 µs, mostly dispatch, so the element-wise
part of a step (six operations forward, the local derivatives and parameter sums
backward, for FastGRNN) costs more than the data it touches. Here that part is one
compiled pass a step over NumPy views of the kernel's own buffers (``Tensor.numpy()``
shares memory); the matmuls stay in torch (MKL, and its threads). Importing this module
imports numba, which is optional: :func:`str_rnn.fused_ops.compiled` imports it on first
use, and without numba the torch code runs.

**exp.** numba's ``math.exp`` is a scalar libm call unless Intel's SVML is installed,
which would make a step's 20,000 sigmoids 7x slower than torch's. :func:`_exp` is the
classic vectorisable form instead: ``k = round(x / ln 2)``, ``r = x - k ln 2`` with
``ln 2`` in two parts (Cody-Waite: ``k · ln2_hi`` is exact, so ``r`` keeps its digits),
``e^r`` by its Taylor polynomial on ``|r| <= ln 2 / 2`` (degree 7 in float32, 13 in
float64: truncation error below half an ulp) and ``2^k`` written straight into the
exponent bits. The argument is clamped to where ``e^x`` is a normal number
(``[-87, 88]`` in float32, ``[-708, 709]`` in float64), so ``σ(a) = 1 / (1 + e^{-a})``
saturates at 1 and at about the smallest normal number instead of overflowing; a NaN
stays NaN. Measured: within 1.3 ulp of float64 ``torch.sigmoid`` in float32, 1.4 ulp in
float64.

Compiled on first use (about 3 s) and cached on disk (``cache=True``), for float32 and
float64.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_JIT = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": {"contract"}}
"""``error_model="numpy"``: no zero-division check, which would stop vectorisation;
``contract``: fused multiply-adds, but no reassociation (it would undo Cody-Waite) and no
``nnan`` (NaN must propagate); ``nogil``: other Python threads (data loading) run
meanwhile."""


# ---------------------------------------------------------------------------------------
# exp and sigmoid, vectorisable
# ---------------------------------------------------------------------------------------
def _taylor(degree: int) -> tuple:
    """``1/n!`` for ``n = degree .. 0`` (Horner order)."""
    return tuple(1.0 / math.factorial(n) for n in range(degree, -1, -1))


# per float type: (clamp low, clamp high, ln 2 high part, ln 2 low part, Horner coefficients)
_EXP = {
    types.float32: (-87.0, 88.0, 0.693359375, -2.12194440e-4, _taylor(7)),
    types.float64: (-708.0, 709.0, 0.693145751953125, 1.42860682030941723212e-6, _taylor(13)),
}
# per float type: (bits, mantissa bits, exponent bias)
_BITS = {types.float32: (32, 23, 127), types.float64: (64, 52, 1023)}


@intrinsic
def _pow2(typingctx, k):
    """``2**k`` for a float ``k`` holding an integer in the normal exponent range: the
    bits ``(k + bias) << mantissa bits``."""
    if k not in _BITS:
        return None
    width, mantissa, bias = _BITS[k]

    def codegen(context, builder, sig, args):
        ity = ir.IntType(width)
        bits = builder.shl(builder.add(builder.fptosi(args[0], ity), ity(bias)), ity(mantissa))
        return builder.bitcast(bits, context.get_value_type(k))

    return k(k), codegen


def _exp(x):  # pragma: no cover - replaced by the compiled implementation below
    raise NotImplementedError


@overload(_exp, jit_options=_JIT)
def _exp_impl(x):
    if x not in _EXP:
        return None
    low, high, ln2_hi, ln2_lo, coefs = _EXP[x]
    cast = np.float32 if x == types.float32 else np.float64
    low, high, inv_ln2, ln2_hi, ln2_lo = cast(low), cast(high), cast(1 / math.log(2)), cast(ln2_hi), cast(ln2_lo)
    coefs = tuple(cast(c) for c in coefs)
    half, zero = cast(0.5), cast(0.0)

    def impl(x):
        x = high if x > high else (low if x < low else x)  # NaN passes through
        k = np.floor(x * inv_ln2 + half)
        k = zero if k != k else k  # NaN: any k, the result is NaN through r
        r = (x - k * ln2_hi) - k * ln2_lo
        p = coefs[0]
        for c in coefs[1:]:
            p = p * r + c
        return p * _pow2(k)

    return impl


def _sigmoid(x):  # pragma: no cover - replaced by the compiled implementation below
    raise NotImplementedError


@overload(_sigmoid, jit_options=_JIT)
def _sigmoid_impl(x):
    if x not in _EXP:
        return None
    one = np.float32(1) if x == types.float32 else np.float64(1)

    def impl(x):
        return one / (one + _exp(-x))

    return impl


@numba.njit(**_JIT)
def sigmoid(x, out):
    """``out = σ(x)`` element-wise (flat arrays; for tests)."""
    for i in range(x.size):
        out[i] = _sigmoid(x[i])


# ---------------------------------------------------------------------------------------
# FastGRNN
# ---------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def fastgrnn_forward(X, Z, S2, S, delta, zeta, c1, t):
    r"""Step ``t`` of the FastGRNN forward pass after the matmul, which left ``Uᵀ h_{t-1}``
    in ``Z[t]``: with ``p = X[t] + Uᵀ h_{t-1}``, ``z = σ(p)`` (to ``Z[t]``), ``s = σ(2p + δ)``
    (to ``S2[t]``; ``h̃ = 2s - 1``) and ``h_t = z h_{t-1} + (c_1 - ζ z) h̃`` to ``S[t+1]``,
    with ``c_1 = ζ + ν``.

    ``X, Z, S2 [T, H, B]``, ``S [T+1, H, B]``: C-contiguous, one float type; ``delta [H]``;
    ``zeta``, ``c1``: NumPy scalars of that type.
    """
    x, pre, sg, hp, h = X[t], Z[t], S2[t], S[t], S[t + 1]
    one = Z.dtype.type(1)
    for i in range(pre.shape[0]):
        d = delta[i]
        for j in range(pre.shape[1]):
            p = x[i, j] + pre[i, j]
            z = _sigmoid(p)
            s = _sigmoid(p + p + d)
            pre[i, j] = z
            sg[i, j] = s
            h[i, j] = z * hp[i, j] + (c1 - zeta * z) * (s + s - one)


@numba.njit(inline="always", **_JIT)
def _local(dh, z, s, hp, dp, acc, zeta, c1, one, i, j):
    r"""One element of the local backward: ``dp = dh (K^z + K^h)`` with
    ``K^h = 4 (c_1 - ζ z) s(1-s)``, ``K^z = (h_{t-1} + ζ - 2ζ s) z(1-z)``, and the parameter
    sums ``acc += dh (K^h, h̃, (1-z) h̃)`` for ``dδ = ½ Σ dh K^h``, ``dν = Σ dh h̃``,
    ``dζ = Σ dh (1-z) h̃`` (``h̃ = 2s - 1``). Sums go to per-element accumulators: a
    vectorised reduction would need reassociation."""
    g = dh[i, j]
    zz, ss = z[i, j], s[i, j]
    two = one + one
    ht = two * ss - one
    kh = two * two * (c1 - zeta * zz) * ss * (one - ss)
    kz = (hp[i, j] + zeta - two * zeta * ss) * zz * (one - zz)
    dp[i, j] = g * (kh + kz)
    acc[0, i, j] += g * kh
    acc[1, i, j] += g * ht
    acc[2, i, j] += g * (one - zz) * ht


@numba.njit(**_JIT)
def fastgrnn_backward(DH, Z, S2, S, DP, ACC, zeta, c1, t):
    r"""Local backward of step ``t`` given ``dh_t`` in ``DH [H, B]``: ``DP[t] = dh_t (K^z + K^h)``
    and the parameter sums added to ``ACC [3, H, B]`` (see :func:`_local`)."""
    z, s, hp, dp = Z[t], S2[t], S[t], DP[t]
    one = DH.dtype.type(1)
    for i in range(DH.shape[0]):
        for j in range(DH.shape[1]):
            _local(DH, z, s, hp, dp, ACC, zeta, c1, one, i, j)


@numba.njit(**_JIT)
def fastgrnn_carry(DH, BACK, Z, t):
    r"""``dh_{t-1} = g_{t-1} + U dpre_t + dh_t z_t``: ``DH = BACK + DH ⊙ Z[t]`` in place,
    ``BACK`` holding the first two terms (the matmul's output)."""
    z = Z[t]
    for i in range(DH.shape[0]):
        for j in range(DH.shape[1]):
            DH[i, j] = BACK[i, j] + DH[i, j] * z[i, j]


@numba.njit(**_JIT)
def fastgrnn_carry_backward(DH, BACK, Z, S2, S, DP, ACC, zeta, c1, t):
    """:func:`fastgrnn_carry` at step ``t + 1``, then :func:`fastgrnn_backward` at step ``t``,
    in one pass."""
    zn, z, s, hp, dp = Z[t + 1], Z[t], S2[t], S[t], DP[t]
    one = DH.dtype.type(1)
    for i in range(DH.shape[0]):
        for j in range(DH.shape[1]):
            DH[i, j] = BACK[i, j] + DH[i, j] * zn[i, j]
            _local(DH, z, s, hp, dp, ACC, zeta, c1, one, i, j)


# ---------------------------------------------------------------------------------------
# LSTM (gate rows i, f, g, o; the g rows primed, see str_rnn.fused.LSTMScan)
# ---------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def lstm_forward(X, P, S, C, TC, t):
    r"""Step ``t`` of the LSTM forward pass after the matmul, which left ``U'ᵀ h_{t-1}`` in
    ``P [4H, B]``: with ``a = X[t] + P`` (rows ``i, f, 2g, o``), ``X[t]`` becomes ``σ(i)``,
    ``σ(f)``, ``tanh g = 2 σ(2g) - 1``, ``σ(o)``; ``c_t = σ(f) c_{t-1} + σ(i) tanh g`` goes
    to ``C[t+1]``, ``tanh c_t = 2 σ(2 c_t) - 1`` to ``TC[t]`` and ``h_t = σ(o) tanh c_t``
    to ``S[t+1]``.

    ``X [T, 4H, B]``, ``S, C [T+1, H, B]``, ``TC [T, H, B]``: C-contiguous, one float type.
    """
    x, cp, c, tc, h = X[t], C[t], C[t + 1], TC[t], S[t + 1]
    n = h.shape[0]
    one = X.dtype.type(1)
    for i in range(n):
        for j in range(h.shape[1]):
            ig = _sigmoid(x[i, j] + P[i, j])
            fg = _sigmoid(x[n + i, j] + P[n + i, j])
            gg = _sigmoid(x[2 * n + i, j] + P[2 * n + i, j])
            og = _sigmoid(x[3 * n + i, j] + P[3 * n + i, j])
            gg = gg + gg - one
            cc = fg * cp[i, j] + ig * gg
            th = _sigmoid(cc + cc)
            th = th + th - one
            x[i, j], x[n + i, j], x[2 * n + i, j], x[3 * n + i, j] = ig, fg, gg, og
            c[i, j] = cc
            tc[i, j] = th
            h[i, j] = og * th


@numba.njit(**_JIT)
def lstm_backward(DH, DC, DCIN, SG, C, TC, DG, t):
    r"""Step ``t`` of the LSTM backward pass, given ``dh_t`` in ``DH`` and ``dc'_t`` (from
    step ``t + 1``) in ``DC`` (both ``[H, B]``): ``dc_t = dc'_t + dh_t σ(o)(1 - tanh² c_t)``,
    the gate gradients to ``DG[t]`` (rows ``i, f, g, o``)
    ``dc_t tanh g · i(1-i)``, ``dc_t c_{t-1} f(1-f)``, ``dc_t i (1 - tanh² g) / 2``,
    ``dh_t tanh c_t · o(1-o)``, and ``DC = dc_t σ(f) (+ DCIN[t-1])`` for step ``t - 1``.

    ``DCIN``: ``[T, H, B]`` gradients arriving at the cell state of each step from outside
    (each sequence's last step with variable lengths), or ``[0, H, B]`` for none.
    """
    sg, cp, tc, dg = SG[t], C[t], TC[t], DG[t]
    n = DH.shape[0]
    one = DH.dtype.type(1)
    half = DH.dtype.type(0.5)
    add_in = DCIN.shape[0] > 0 and t > 0
    for i in range(n):
        for j in range(DH.shape[1]):
            dh = DH[i, j]
            ig, fg, gg, og = sg[i, j], sg[n + i, j], sg[2 * n + i, j], sg[3 * n + i, j]
            th = tc[i, j]
            dc = DC[i, j] + dh * og * (one - th * th)
            dg[i, j] = dc * gg * ig * (one - ig)
            dg[n + i, j] = dc * cp[i, j] * fg * (one - fg)
            dg[2 * n + i, j] = half * dc * ig * (one - gg * gg)
            dg[3 * n + i, j] = dh * th * og * (one - og)
            DC[i, j] = dc * fg + DCIN[t - 1, i, j] if add_in else dc * fg
