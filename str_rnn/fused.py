r"""Fused time loops: one ``torch.autograd.Function`` per layer with a hand-written
backward through time.

Autograd through a Python time loop records every small operation of every step and
replays them one by one in the backward pass; at hidden size 100 that bookkeeping, not
arithmetic, is most of the cost. Here each layer's whole sequence is a single autograd
node:

* **forward** runs the recurrence with autograd off and writes the states and the gate
  activations straight into preallocated ``[T, B, ·]`` buffers (``out=``), about seven
  tensor operations a step;
* **backward** first computes, for all steps at once, the local derivatives that do not
  depend on the incoming gradient (big element-wise operations), then runs the only truly
  sequential part, ``dh_{t-1} = g_{t-1} + (dh_t ⊙ K_t) Uᵀ + dh_t ⊙ D_t``, in three to five
  operations a step, and finally gets every weight gradient from one large matmul over
  all steps (``dU = Σ_t h_{t-1}ᵀ dpre_t = H_prevᵀ · DPRE``) instead of one per step.

The recurrent matrix enters as its chain ``U.chain() = (C_1, ..., C_n)`` with
``h U = h C_1 ⋯ C_n`` (the active factors of a learned-rank matrix, or one dense
matrix), and the element-wise parameters enter as plain tensors (``ζ = sigmoid(zeta)``
and so on), both computed *outside* the Function; autograd then carries their
gradients on to ``A``, ``σ``, ``B``, the thresholds ``s`` and the raw parameters.

Variable lengths: the loop runs every sequence to the longest length and reads each
sequence's final state at its own last step (``last = lengths - 1``). Steps after a
sequence's end only feed outputs that the caller masks to zero, so their gradient is
exactly zero and the result equals freezing the state (the reference loop's semantics).

Time-major layout throughout: ``wx`` is ``[T, B, G·H]`` and the returned states
``[T, B, H]`` (``states[t] = h_{t+1}``).
"""
from __future__ import annotations

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .cells import FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell


# ---------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------
def _pre(bias_t: torch.Tensor, h: torch.Tensor, chain, out=None) -> torch.Tensor:
    """``bias_t + h @ C_1 @ ... @ C_n`` (the last product fused with the addition)."""
    for c in chain[:-1]:
        h = torch.mm(h, c)
    if out is None:
        return torch.addmm(bias_t, h, chain[-1])
    return torch.addmm(bias_t, h, chain[-1], out=out)


def _pre_grad(g_t, d: torch.Tensor, chain_t, out=None) -> torch.Tensor:
    """``g_t + d @ C_nᵀ @ ... @ C_1ᵀ`` with ``chain_t = (C_nᵀ, ..., C_1ᵀ)``; ``g_t`` may be None."""
    for c in chain_t[:-1]:
        d = torch.mm(d, c)
    if g_t is None:
        return torch.mm(d, chain_t[-1], out=out) if out is not None else torch.mm(d, chain_t[-1])
    if out is None:
        return torch.addmm(g_t, d, chain_t[-1])
    return torch.addmm(g_t, d, chain_t[-1], out=out)


def _chain_grads(hprev: torch.Tensor, dpre: torch.Tensor, chain, needs) -> list:
    """Gradients of ``(C_1, ..., C_n)`` from all steps at once.

    With ``P_0 = H_prev`` and ``P_i = P_{i-1} C_i`` (``[T·B, ·]``), ``dC_i = P_{i-1}ᵀ dP_i``
    and ``dP_{i-1} = dP_i C_iᵀ``, starting from ``dP_n = DPRE``.
    """
    n = len(chain)
    if not any(needs):
        return [None] * n
    h2 = hprev.reshape(-1, hprev.shape[-1])
    ps = [h2]
    for c in chain[:-1]:
        ps.append(ps[-1] @ c)
    grads = [None] * n
    d = dpre.reshape(-1, dpre.shape[-1])
    for i in range(n - 1, -1, -1):
        if needs[i]:
            grads[i] = ps[i].mT @ d
        if i > 0 and any(needs[:i]):
            d = d @ chain[i].mT
    return grads


def _final(states_buf: torch.Tensor, last) -> torch.Tensor:
    """The state after each sequence's last step: ``states_buf[last + 1, b]`` (a copy)."""
    if last is None:
        return states_buf[-1].clone()
    batch = torch.arange(states_buf.shape[1], device=states_buf.device)
    return states_buf[last + 1, batch]


def _external_grads(dstates, dfinal, last, like: torch.Tensor):
    """Per-step gradient of the loss w.r.t. ``h_{t+1}`` from outside the recurrence.

    Returns ``(g, dh_T)``: ``g`` is ``[T, B, H]`` or None (no gradient from the outputs),
    ``dh_T`` the gradient entering the last step. With ``last`` the final-state gradient
    is scattered into ``g`` at each sequence's last step instead.
    """
    if last is None:
        if dstates is None:
            dh = dfinal.clone() if dfinal is not None else torch.zeros_like(like[0])
        elif dfinal is None:
            dh = dstates[-1].clone()
        else:
            dh = dstates[-1] + dfinal
        return dstates, dh
    g = dstates.clone() if dstates is not None else torch.zeros_like(like)
    if dfinal is not None:
        batch = torch.arange(g.shape[1], device=g.device)
        g.index_put_((last, batch), dfinal, accumulate=True)
    return g, g[-1].clone()


def _scatter_final(dfinal, last, like: torch.Tensor):
    """``[T, B, H]`` zeros with ``dfinal[b]`` at step ``last[b]`` (the LSTM's ``dc_n``)."""
    g = torch.zeros_like(like)
    if dfinal is not None:
        g[last, torch.arange(g.shape[1], device=g.device)] = dfinal
    return g


def _sum_bt(x: torch.Tensor) -> torch.Tensor:
    """Sum over the time and batch dimensions of a ``[T, B, ...]`` tensor."""
    return x.sum((0, 1))


# ---------------------------------------------------------------------------------------
# FastGRNN
# ---------------------------------------------------------------------------------------
class FastGRNNScan(Function):
    r"""FastGRNN over a sequence: ``pre = wx_t + h U``, ``z = σ(pre + b_z)``,
    ``h̃ = tanh(pre + b_h)``, ``h_t = (ζ(1 - z) + ν) h̃ + z h_{t-1}``.

    Backward: with ``K^z = (h_{t-1} - ζ h̃) z(1 - z)`` and ``K^h = (ζ(1 - z) + ν)(1 - h̃²)``,
    ``dpre_t = dh_t (K^z + K^h)`` and ``dh_{t-1} = g_{t-1} + dpre_t Uᵀ + dh_t z``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, bias_z, bias_h, zeta, nu, *chain):
        steps = wx.shape[0]
        xz = (wx + bias_z).unbind(0)
        dbias = bias_h - bias_z
        neg_zeta, c1 = -zeta, zeta + nu
        S = wx.new_empty((steps + 1,) + h0.shape)
        S[0] = h0
        Z, HT = torch.empty_like(S[1:]), torch.empty_like(S[1:])
        Ss, Zs, HTs = S.unbind(0), Z.unbind(0), HT.unbind(0)
        h = Ss[0]
        for t in range(steps):
            pre = _pre(xz[t], h, chain)
            torch.sigmoid(pre, out=Zs[t])
            ht = torch.tanh(pre.add_(dbias), out=HTs[t])
            # h_t = c1 h~ + z (h - ζ h~),  c1 = ζ + ν
            u = torch.addcmul(h, ht, neg_zeta)
            h = torch.addcmul(torch.mul(ht, c1), Zs[t], u, out=Ss[t + 1])
        ctx.save_for_backward(S, Z, HT, last, zeta, nu, *chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        S, Z, HT, last, zeta, nu, *chain = ctx.saved_tensors
        steps = Z.shape[0]
        hprev = S[:-1]
        neg_zeta = -zeta
        # local derivatives of all steps at once
        kz = torch.addcmul(hprev, HT, neg_zeta).mul_(torch.addcmul(Z, Z, Z, value=-1))
        k = torch.addcmul(zeta + nu, Z, neg_zeta).mul_(torch.addcmul(torch.ones_like(HT), HT, HT, value=-1))
        k.add_(kz)
        g, dh = _external_grads(dstates, dfinal, last, Z)
        gs = g.unbind(0) if g is not None else (None,) * steps
        DH, DPRE = torch.empty_like(Z), torch.empty_like(Z)
        DH[-1] = dh
        DHs, DPs, Ks, Zs = DH.unbind(0), DPRE.unbind(0), k.unbind(0), Z.unbind(0)
        chain_t = [c.mT for c in reversed(chain)]
        for t in range(steps - 1, -1, -1):
            dp = torch.mul(DHs[t], Ks[t], out=DPs[t])
            back = _pre_grad(gs[t - 1] if t > 0 else None, dp, chain_t)
            dh = torch.addcmul(back, DHs[t], Zs[t], out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dwx = DPRE if needs[0] else None
        dbz = _sum_bt(DH * kz) if needs[3] or needs[4] else None
        dbh = _sum_bt(DPRE) - dbz if needs[4] else None
        dzeta = dnu = None
        if needs[5] or needs[6]:
            dht = DH.mul_(HT)  # DH is not needed any more
            dnu = dht.sum()
            dzeta = dnu - dht.mul_(Z).sum()
        dchain = _chain_grads(hprev, DPRE, chain, needs[7:])
        return (dwx, None, dh if needs[2] else None, dbz if needs[3] else None, dbh,
                dzeta if needs[5] else None, dnu if needs[6] else None, *dchain)


# ---------------------------------------------------------------------------------------
# FastRNN
# ---------------------------------------------------------------------------------------
class FastRNNScan(Function):
    r"""FastRNN over a sequence: ``h_t = β h_{t-1} + α tanh(wx_t + b + h U)`` with the
    already squashed ``α = sigmoid(alpha)``, ``β = sigmoid(beta)``.

    Backward: ``dpre_t = dh_t α (1 - h̃²)``, ``dh_{t-1} = g_{t-1} + dpre_t Uᵀ + β dh_t``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, bias, alpha, beta, *chain):
        steps = wx.shape[0]
        xs = (wx + bias).unbind(0)
        S = wx.new_empty((steps + 1,) + h0.shape)
        S[0] = h0
        HT = torch.empty_like(S[1:])
        Ss, HTs = S.unbind(0), HT.unbind(0)
        h = Ss[0]
        for t in range(steps):
            ht = torch.tanh(_pre(xs[t], h, chain), out=HTs[t])
            h = torch.addcmul(torch.mul(h, beta), ht, alpha, out=Ss[t + 1])
        ctx.save_for_backward(S, HT, last, alpha, beta, *chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        S, HT, last, alpha, beta, *chain = ctx.saved_tensors
        steps = HT.shape[0]
        hprev = S[:-1]
        k = torch.addcmul(torch.ones_like(HT), HT, HT, value=-1).mul_(alpha)
        g, dh = _external_grads(dstates, dfinal, last, HT)
        gs = g.unbind(0) if g is not None else (None,) * steps
        DH, DPRE = torch.empty_like(HT), torch.empty_like(HT)
        DH[-1] = dh
        DHs, DPs, Ks = DH.unbind(0), DPRE.unbind(0), k.unbind(0)
        chain_t = [c.mT for c in reversed(chain)]
        for t in range(steps - 1, -1, -1):
            dp = torch.mul(DHs[t], Ks[t], out=DPs[t])
            back = _pre_grad(gs[t - 1] if t > 0 else None, dp, chain_t)
            dh = torch.addcmul(back, DHs[t], beta, out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dbias = _sum_bt(DPRE) if needs[3] else None
        dalpha = (DH * HT).sum() if needs[4] else None
        dbeta = (DH * hprev).sum() if needs[5] else None
        dchain = _chain_grads(hprev, DPRE, chain, needs[6:])
        return (DPRE if needs[0] else None, None, dh if needs[2] else None, dbias, dalpha, dbeta, *dchain)


# ---------------------------------------------------------------------------------------
# GRU (torch's gate order r, z, n)
# ---------------------------------------------------------------------------------------
class GRUScan(Function):
    r"""GRU over a sequence, torch's equations: ``(h_r, h_z, h_n) = h U + b_hh``,
    ``r = σ(x_r + h_r)``, ``z = σ(x_z + h_z)``, ``n = tanh(x_n + r h_n)``,
    ``h_t = n + z (h_{t-1} - n)``, where ``x = wx_t + b_ih``.

    Backward: with ``K^n = (1 - z)(1 - n²)``, the gradient w.r.t. ``(h_r, h_z, h_n)`` is
    ``dh_t (K^n h_n r(1 - r),  (h_{t-1} - n) z(1 - z),  K^n r)`` and
    ``dh_{t-1} = g_{t-1} + d(h_r, h_z, h_n) Uᵀ + dh_t z``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, bias_ih, bias_hh, *chain):
        steps, hidden = wx.shape[0], h0.shape[-1]
        x = wx + bias_ih
        xrz, xn = x[..., :2 * hidden].unbind(0), x[..., 2 * hidden:].unbind(0)
        S = wx.new_empty((steps + 1,) + h0.shape)
        S[0] = h0
        HG = torch.empty_like(x)                       # h U + b_hh, all three gates
        RZ = x.new_empty(x.shape[:-1] + (2 * hidden,))  # sigmoid outputs r, z
        N = torch.empty_like(S[1:])
        Ss, HGs, RZs, Ns = S.unbind(0), HG.unbind(0), RZ.unbind(0), N.unbind(0)
        HGrz, HGn = HG[..., :2 * hidden].unbind(0), HG[..., 2 * hidden:].unbind(0)
        Rs, Zs = RZ[..., :hidden].unbind(0), RZ[..., hidden:].unbind(0)
        h = Ss[0]
        for t in range(steps):
            _pre(bias_hh, h, chain, out=HGs[t])
            torch.add(xrz[t], HGrz[t], out=RZs[t]).sigmoid_()
            n = torch.addcmul(xn[t], Rs[t], HGn[t], out=Ns[t]).tanh_()
            h = torch.addcmul(n, Zs[t], torch.sub(h, n), out=Ss[t + 1])
        ctx.save_for_backward(S, HG, RZ, N, last, *chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        S, HG, RZ, N, last, *chain = ctx.saved_tensors
        steps, batch, hidden = N.shape
        hprev = S[:-1]
        R, Z = RZ[..., :hidden], RZ[..., hidden:]
        # K[t] = (K^n h_n r(1-r), (h - n) z(1-z), K^n r), laid out [T, B, 3, H]
        kn = torch.addcmul(torch.ones_like(N), N, N, value=-1).mul_(1 - Z)
        K = N.new_empty(steps, batch, 3, hidden)
        torch.mul(kn, HG[..., 2 * hidden:], out=K[:, :, 0]).mul_(torch.addcmul(R, R, R, value=-1))
        torch.sub(hprev, N, out=K[:, :, 1]).mul_(torch.addcmul(Z, Z, Z, value=-1))
        torch.mul(kn, R, out=K[:, :, 2])
        g, dh = _external_grads(dstates, dfinal, last, N)
        gs = g.unbind(0) if g is not None else (None,) * steps
        DH = torch.empty_like(N)
        DH[-1] = dh
        DHG = torch.empty_like(K)
        DHs, DH3s = DH.unbind(0), DH.unsqueeze(2).unbind(0)
        DHGs, DHG2s, Ks = DHG.unbind(0), DHG.view(steps, batch, 3 * hidden).unbind(0), K.unbind(0)
        Zs = Z.unbind(0)
        chain_t = [c.mT for c in reversed(chain)]
        for t in range(steps - 1, -1, -1):
            torch.mul(DH3s[t], Ks[t], out=DHGs[t])
            back = _pre_grad(gs[t - 1] if t > 0 else None, DHG2s[t], chain_t)
            dh = torch.addcmul(back, DHs[t], Zs[t], out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dhg = DHG.view(steps, batch, 3 * hidden)
        dchain = _chain_grads(hprev, dhg, chain, needs[5:])
        dbias_hh = _sum_bt(dhg) if needs[4] else None
        dx = None
        if needs[0] or needs[3]:
            # d(x_r, x_z) = d(h_r, h_z); d x_n = dh K^n (without the factor r)
            torch.mul(DH, kn, out=DHG[:, :, 2])
            dx = dhg
        return (dx if needs[0] else None, None, dh if needs[2] else None,
                _sum_bt(dx) if needs[3] else None, dbias_hh, *dchain)


# ---------------------------------------------------------------------------------------
# LSTM (torch's gate order i, f, g, o)
# ---------------------------------------------------------------------------------------
class LSTMScan(Function):
    r"""LSTM over a sequence, torch's equations: ``(i, f, g, o) = wx_t + b + h U``
    (``b = b_ih + b_hh``), ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``, ``h_t = σ(o) tanh(c_t)``.

    Backward: ``dc_t = dc'_t + dh_t σ(o)(1 - tanh²c_t)`` (``dc'`` from step ``t+1``),
    gate gradients ``dc_t (tanh g · i(1-i), c_{t-1} f(1-f), i(1 - tanh²g))`` and
    ``dh_t tanh c_t · o(1-o)``; ``dc'_{t-1} = dc_t σ(f)``, ``dh_{t-1} = g_{t-1} + dgates Uᵀ``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, c0, bias, *chain):
        steps, hidden = wx.shape[0], h0.shape[-1]
        xs = (wx + bias).unbind(0)
        S = wx.new_empty((steps + 1,) + h0.shape)
        C = torch.empty_like(S)
        S[0], C[0] = h0, c0
        SG = torch.empty_like(wx)          # σ(i), σ(f), tanh(g), σ(o)
        TC = torch.empty_like(S[1:])       # tanh(c_t)
        Ss, Cs, SGs, TCs = S.unbind(0), C.unbind(0), SG.unbind(0), TC.unbind(0)
        gate = [SG[..., j * hidden:(j + 1) * hidden].unbind(0) for j in range(4)]
        Is, Fs, Gs, Os = gate
        h, c = Ss[0], Cs[0]
        for t in range(steps):
            pre = _pre(xs[t], h, chain)
            torch.sigmoid(pre, out=SGs[t])
            torch.tanh(pre[:, 2 * hidden:3 * hidden], out=Gs[t])
            c = torch.addcmul(torch.mul(Fs[t], c), Is[t], Gs[t], out=Cs[t + 1])
            h = torch.mul(Os[t], torch.tanh(c, out=TCs[t]), out=Ss[t + 1])
        ctx.save_for_backward(S, C, SG, TC, last, *chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last), _final(C, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dh_final, dc_final):
        S, C, SG, TC, last, *chain = ctx.saved_tensors
        steps, batch, hidden = TC.shape
        hprev, cprev = S[:-1], C[:-1]
        I, F, G, O = (SG[..., j * hidden:(j + 1) * hidden] for j in range(4))
        ones = torch.ones_like(TC)
        # dc gets dh σ(o)(1 - tanh² c); the gate factors, laid out [T, B, 4, H]
        A = torch.addcmul(ones, TC, TC, value=-1).mul_(O)
        K = TC.new_empty(steps, batch, 4, hidden)
        torch.mul(G, torch.addcmul(I, I, I, value=-1), out=K[:, :, 0])
        torch.mul(cprev, torch.addcmul(F, F, F, value=-1), out=K[:, :, 1])
        torch.mul(I, torch.addcmul(ones, G, G, value=-1), out=K[:, :, 2])
        torch.mul(TC, torch.addcmul(O, O, O, value=-1), out=K[:, :, 3])
        del ones
        g, dh = _external_grads(dstates, dh_final, last, TC)
        gs = g.unbind(0) if g is not None else (None,) * steps
        if last is None:
            dc_in = (None,) * steps
            dc = dc_final if dc_final is not None else torch.zeros_like(TC[0])
        else:
            dc_in = _scatter_final(dc_final, last, TC).unbind(0)
            dc = dc_in[-1]
        DH, DC = torch.empty_like(TC), torch.empty_like(TC)
        DH[-1] = dh
        DG = torch.empty_like(K)
        DHs, DCs, DC3s = DH.unbind(0), DC.unbind(0), DC.unsqueeze(2).unbind(0)
        DGs, DG2s = DG.unbind(0), DG.view(steps, batch, 4 * hidden).unbind(0)
        DG3s, DGos = DG[:, :, :3].unbind(0), DG[:, :, 3].unbind(0)
        K3s, Kos, As, Fs = K[:, :, :3].unbind(0), K[:, :, 3].unbind(0), A.unbind(0), F.unbind(0)
        chain_t = [c.mT for c in reversed(chain)]
        for t in range(steps - 1, -1, -1):
            torch.addcmul(dc, DHs[t], As[t], out=DCs[t])
            torch.mul(DC3s[t], K3s[t], out=DG3s[t])
            torch.mul(DHs[t], Kos[t], out=DGos[t])
            dc = torch.mul(DCs[t], Fs[t]) if dc_in[t - 1] is None or t == 0 else \
                torch.addcmul(dc_in[t - 1], DCs[t], Fs[t])
            dh = _pre_grad(gs[t - 1] if t > 0 else None, DG2s[t], chain_t, out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dgates = DG.view(steps, batch, 4 * hidden)
        dchain = _chain_grads(hprev, dgates, chain, needs[5:])
        return (dgates if needs[0] else None, None, dh if needs[2] else None, dc if needs[3] else None,
                _sum_bt(dgates) if needs[4] else None, *dchain)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------
def _fastgrnn_args(cell: FastGRNNCell):
    return (cell.bias_z, cell.bias_h, torch.sigmoid(cell.zeta), torch.sigmoid(cell.nu))


def _fastrnn_args(cell: FastRNNCell):
    return (cell.bias, torch.sigmoid(cell.alpha), torch.sigmoid(cell.beta))


def _gru_args(cell: GRUCell):
    return (cell.bias_ih, cell.bias_hh)


def _lstm_args(cell: LSTMCell):
    return (cell.bias_ih + cell.bias_hh,)


# exact types only: a subclass may change the equations, and then takes the reference loop
KERNELS = {
    FastGRNNCell: (FastGRNNScan, _fastgrnn_args),
    FastRNNCell: (FastRNNScan, _fastrnn_args),
    GRUCell: (GRUScan, _gru_args),
    LSTMCell: (LSTMScan, _lstm_args),
}


def supports(cell: RNNCell) -> bool:
    """Whether ``cell`` has a fused kernel (its exact type is one of the four cells)."""
    return type(cell) in KERNELS


def fused_scan(cell: RNNCell, wx: torch.Tensor, state, last: torch.Tensor | None = None, chain=None):
    """Run one layer over a sequence with its fused kernel.

    Args:
        cell: a cell for which :func:`supports` is true.
        wx: ``W x_t`` for all steps, time-major ``[T, B, G·H]``.
        state: initial state ``h`` or ``(h, c)``, ``[B, H]`` each.
        last: ``[B]`` index of each sequence's last real step (on ``wx``'s device), or
            ``None`` when every sequence runs all ``T`` steps.
        chain: the recurrent matrix as a chain (default ``cell.U.chain()``).

    Returns:
        ``(states [T, B, H], final state)``; ``states[t]`` is ``h_{t+1}`` for every
        sequence, also past its end (the caller masks those outputs); the final state is
        taken at ``last``.

    Raises:
        TypeError: the cell has no fused kernel.
    """
    entry = KERNELS.get(type(cell))
    if entry is None:
        raise TypeError(f"fused_scan: no fused kernel for {type(cell).__name__}; "
                        f"expected one of {', '.join(k.__name__ for k in KERNELS)}")
    kernel, args = entry
    if chain is None:
        chain = cell.U.chain()
    if cell.has_cell_state:
        h0, c0 = state
        states, h_n, c_n = kernel.apply(wx, last, h0, c0, *args(cell), *chain)
        return states, (h_n, c_n)
    states, h_n = kernel.apply(wx, last, state, *args(cell), *chain)
    return states, h_n
