r"""Fused time loops: one ``torch.autograd.Function`` per layer with a hand-written
backward through time.

Autograd through a Python time loop records every small operation of every step and
replays them one by one in the backward pass; at hidden size 100 that bookkeeping, not
arithmetic, is most of the cost. Here each layer's whole sequence is a single autograd
node:

* **forward** runs the recurrence with autograd off and writes the states and the gate
  activations straight into preallocated buffers (``out=``), six to nine tensor
  operations a step;
* **backward** first computes, for all steps at once, the local derivatives that do not
  depend on the incoming gradient (large element-wise operations), then runs the only
  truly sequential part, ``dh_{t-1} = g_{t-1} + U (dh_t ⊙ K_t) + dh_t ⊙ D_t``, in three
  to five operations a step, and finally gets the recurrent weight gradient
  ``dU = Σ_t dpre_t h_{t-1}ᵀ`` with one accumulating matmul per step instead of a graph
  node per step.

**Layout.** Inside the kernels a step's state is a column block ``h: [H, B]`` (feature
major) and a sequence is ``[T, H, B]``; gate pre-activations are ``[T, G·H, B]``. Then
every gate of every step is one contiguous block, so each element-wise operation runs on
contiguous memory (on this CPU writing to a strided slice costs 3-4x), and
``pre = x_t + Uᵀ-chain · h`` is still a single matmul. The input projection produces
this layout directly as a batched matmul (:func:`project`), and the outputs leave as a
permuted view.

The recurrent matrix enters as its chain ``U.chain() = (C_1, ..., C_n)`` (row-vector
convention ``h U = h C_1 ⋯ C_n``: the active factors of a learned-rank matrix, or one
dense matrix), and the element-wise parameters as plain tensors (``ζ = sigmoid(zeta)``
and so on), all computed *outside* the Function; autograd carries their gradients on to
``A``, ``σ``, ``B``, the thresholds ``s`` and the raw parameters.

**Variable lengths.** The loop runs every sequence to the longest length and reads each
sequence's final state at its own last step (``last = lengths - 1``). Steps after a
sequence's end only feed outputs that the caller masks to zero, so their gradient is
exactly zero and the result equals freezing the state (the reference loop's semantics).

**tanh** is evaluated as ``2 σ(2a) - 1`` in the forward loops (the factor 2 folded into
the inputs and the recurrent matrix where possible): on the CPU, torch's ``tanh`` costs
about five times its ``sigmoid`` (26 µs against 5 µs for 100 x 100 on the benchmark
machine).
"""
from __future__ import annotations

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .cells import FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell
from .lowrank import Matrix


# ---------------------------------------------------------------------------------------
# shared pieces (feature-major: a step is [features, batch])
# ---------------------------------------------------------------------------------------
def project(matrix: Matrix, x: torch.Tensor) -> torch.Tensor:
    """``M x_t`` for every step of a feature-major sequence ``x [T, in, B]`` -> ``[T, out, B]``.

    The same product as ``matrix(x_t)`` (through :meth:`Matrix.chain`), as batched
    matmuls that write the feature-major layout directly.
    """
    for c in matrix.chain():
        x = torch.matmul(c.mT, x)
    return x


def _pre(x_t: torch.Tensor, h: torch.Tensor, left, out=None) -> torch.Tensor:
    """``x_t + L_n ⋯ L_1 h`` with ``left = (L_1, ..., L_n) = (C_1ᵀ, ..., C_nᵀ)``."""
    for m in left[:-1]:
        h = torch.mm(m, h)
    if out is None:
        return torch.addmm(x_t, left[-1], h)
    return torch.addmm(x_t, left[-1], h, out=out)


def _pre_grad(g_t, d: torch.Tensor, right, out=None) -> torch.Tensor:
    """``g_t + C_1 ⋯ C_n d`` with ``right = (C_n, ..., C_1)``; ``g_t`` may be None."""
    for m in right[:-1]:
        d = torch.mm(m, d)
    if g_t is None:
        return torch.mm(right[-1], d) if out is None else torch.mm(right[-1], d, out=out)
    return torch.addmm(g_t, right[-1], d) if out is None else torch.addmm(g_t, right[-1], d, out=out)


def _outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_t a[t] b[t]ᵀ`` for ``a [T, m, B]``, ``b [T, n, B]`` (one accumulating matmul a step:
    no copy to a ``[m, T·B]`` layout, no ``[T, m, n]`` intermediate)."""
    acc = torch.mm(a[0], b[0].mT)
    for t in range(1, a.shape[0]):
        acc.addmm_(a[t], b[t].mT)
    return acc


def _chain_grads(hprev: torch.Tensor, dpre: torch.Tensor, chain, needs) -> list:
    """Gradients of ``(C_1, ..., C_n)`` given ``dpre [T, G·H, B]``.

    With ``P_0 = H_prev`` and ``P_i = C_iᵀ P_{i-1}``: ``dC_i = Σ_t P_{i-1}[t] dP_i[t]ᵀ``
    and ``dP_{i-1} = C_i dP_i``, starting from ``dP_n = dpre``.
    """
    n = len(chain)
    grads = [None] * n
    if not any(needs):
        return grads
    ps = [hprev]
    for c in chain[:-1]:
        ps.append(torch.matmul(c.mT, ps[-1]))
    d = dpre
    for i in range(n - 1, -1, -1):
        if needs[i]:
            grads[i] = _outer_sum(ps[i], d)
        if i > 0 and any(needs[:i]):
            d = torch.matmul(chain[i], d)
    return grads


def _col(v: torch.Tensor) -> torch.Tensor:
    """A per-feature vector as a column ``[n, 1]`` that broadcasts over the batch."""
    return v.unsqueeze(-1)


def _final(buf: torch.Tensor, last) -> torch.Tensor:
    """The state after each sequence's last step, ``[B, H]`` (a copy); ``buf`` is ``[T+1, H, B]``."""
    if last is None:
        return buf[-1].mT.contiguous()
    return buf[last + 1, :, torch.arange(buf.shape[2], device=buf.device)]


def _external_grads(dstates, dfinal, last, like: torch.Tensor):
    """Per-step gradient w.r.t. ``h_{t+1}`` from outside the recurrence.

    Returns ``(g, dh_T)``: ``g [T, H, B]`` or None (no gradient from the outputs), and the
    gradient entering the last step ``[H, B]``. With ``last`` the final-state gradient is
    scattered into ``g`` at each sequence's last step instead.
    """
    if last is None:
        g = dstates.contiguous() if dstates is not None else None
        if g is None:
            dh = dfinal.mT.contiguous() if dfinal is not None else torch.zeros_like(like[0])
        else:
            dh = g[-1] + dfinal.mT if dfinal is not None else g[-1].clone()
        return g, dh
    g = dstates.clone(memory_format=torch.contiguous_format) if dstates is not None else torch.zeros_like(like)
    if dfinal is not None:
        batch = torch.arange(g.shape[2], device=g.device)
        g.permute(0, 2, 1).index_put_((last, batch), dfinal, accumulate=True)
    return g, g[-1].clone()


def _scatter_final(dfinal, last, like: torch.Tensor) -> torch.Tensor:
    """``[T, H, B]`` zeros with ``dfinal[b]`` at step ``last[b]`` (the LSTM's ``dc_n``)."""
    g = torch.zeros_like(like)
    if dfinal is not None:
        g.permute(0, 2, 1)[last, torch.arange(g.shape[2], device=g.device)] = dfinal
    return g


def _tanh_consts(like: torch.Tensor):
    """0-d tensors ``(-1, 2)``: ``tanh(a) = 2 σ(2a) - 1`` is then one ``addcmul``."""
    return like.new_tensor(-1.0), like.new_tensor(2.0)


def _sum_tb(x: torch.Tensor) -> torch.Tensor:
    """Sum of a ``[T, n, B]`` tensor over time and batch -> ``[n]``."""
    return x.sum((0, 2))


def _one_minus_sq(x: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(torch.ones_like(x), x, x, value=-1)


def _dsigmoid(s: torch.Tensor) -> torch.Tensor:
    """``s (1 - s)`` for ``s = σ(a)``."""
    return torch.addcmul(s, s, s, value=-1)


def _buffers(wx: torch.Tensor, h0: torch.Tensor):
    """States buffer ``[T+1, H, B]`` holding ``h0ᵀ`` at index 0."""
    S = wx.new_empty((wx.shape[0] + 1, h0.shape[1], h0.shape[0]))
    S[0] = h0.mT
    return S


# ---------------------------------------------------------------------------------------
# FastGRNN
# ---------------------------------------------------------------------------------------
class FastGRNNScan(Function):
    r"""FastGRNN over a sequence: ``pre = wx_t + U h``, ``z = σ(pre + b_z)``,
    ``h̃ = tanh(pre + b_h)``, ``h_t = (ζ(1 - z) + ν) h̃ + z h_{t-1}``.

    Backward: with ``K^z = (h_{t-1} - ζ h̃) z(1 - z)`` and ``K^h = (ζ(1 - z) + ν)(1 - h̃²)``,
    ``dpre_t = dh_t (K^z + K^h)`` and ``dh_{t-1} = g_{t-1} + Uᵀ dpre_t + dh_t z``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, bias_z, bias_h, zeta, nu, *chain):
        xz = (wx + _col(bias_z)).unbind(0)
        # h~ = tanh(pre + b_h) = 2 σ(2 (pre + b_z) + 2 (b_h - b_z)) - 1
        db2 = _col(2 * (bias_h - bias_z)).expand(wx.shape[1:]).contiguous()
        neg_zeta, c1 = -zeta, zeta + nu
        neg1, two = _tanh_consts(wx)
        S = _buffers(wx, h0)
        Z, HT = torch.empty_like(S[1:]), torch.empty_like(S[1:])
        Ss, Zs, HTs = S.unbind(0), Z.unbind(0), HT.unbind(0)
        left = [c.mT for c in chain]
        h = Ss[0]
        for t in range(wx.shape[0]):
            pre = _pre(xz[t], h, left)  # pre + b_z
            torch.sigmoid(pre, out=Zs[t])
            ht = torch.addcmul(neg1, torch.add(db2, pre, alpha=2).sigmoid_(), two, out=HTs[t])
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
        kz = torch.addcmul(hprev, HT, neg_zeta).mul_(_dsigmoid(Z))
        k = torch.addcmul(zeta + nu, Z, neg_zeta).mul_(_one_minus_sq(HT)).add_(kz)
        g, dh = _external_grads(dstates, dfinal, last, Z)
        gs = g.unbind(0) if g is not None else (None,) * steps
        DH, DPRE = torch.empty_like(Z), torch.empty_like(Z)
        DH[-1] = dh
        DHs, DPs, Ks, Zs = DH.unbind(0), DPRE.unbind(0), k.unbind(0), Z.unbind(0)
        right = list(reversed(chain))
        for t in range(steps - 1, -1, -1):
            dp = torch.mul(DHs[t], Ks[t], out=DPs[t])
            back = _pre_grad(gs[t - 1] if t > 0 else None, dp, right)
            dh = torch.addcmul(back, DHs[t], Zs[t], out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dbz = _sum_tb(DH * kz) if needs[3] or needs[4] else None
        dbh = _sum_tb(DPRE) - dbz if needs[4] else None
        dzeta = dnu = None
        if needs[5] or needs[6]:
            dht = DH.mul_(HT)  # DH is not needed any more
            dnu = dht.sum()
            dzeta = dnu - dht.mul_(Z).sum()
        dchain = _chain_grads(hprev, DPRE, chain, needs[7:])
        return (DPRE if needs[0] else None, None, dh.mT if needs[2] else None, dbz if needs[3] else None,
                dbh, dzeta if needs[5] else None, dnu if needs[6] else None, *dchain)


# ---------------------------------------------------------------------------------------
# FastRNN
# ---------------------------------------------------------------------------------------
class FastRNNScan(Function):
    r"""FastRNN over a sequence: ``h_t = β h_{t-1} + α tanh(wx_t + b + U h)`` with the
    already squashed ``α = sigmoid(alpha)``, ``β = sigmoid(beta)``.

    Backward: ``dpre_t = dh_t α (1 - h̃²)``, ``dh_{t-1} = g_{t-1} + Uᵀ dpre_t + β dh_t``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, bias, alpha, beta, *chain):
        neg1, two = _tanh_consts(wx)
        # the tanh argument doubled: inputs, and the last factor of the chain
        xs = torch.add(wx, _col(bias)).mul_(2).unbind(0)
        left = [c.mT for c in chain[:-1]] + [chain[-1].mT * 2]
        S = _buffers(wx, h0)
        HT = torch.empty_like(S[1:])
        Ss, HTs = S.unbind(0), HT.unbind(0)
        h = Ss[0]
        for t in range(wx.shape[0]):
            ht = torch.addcmul(neg1, _pre(xs[t], h, left).sigmoid_(), two, out=HTs[t])
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
        k = _one_minus_sq(HT).mul_(alpha)
        g, dh = _external_grads(dstates, dfinal, last, HT)
        gs = g.unbind(0) if g is not None else (None,) * steps
        DH, DPRE = torch.empty_like(HT), torch.empty_like(HT)
        DH[-1] = dh
        DHs, DPs, Ks = DH.unbind(0), DPRE.unbind(0), k.unbind(0)
        right = list(reversed(chain))
        for t in range(steps - 1, -1, -1):
            dp = torch.mul(DHs[t], Ks[t], out=DPs[t])
            back = _pre_grad(gs[t - 1] if t > 0 else None, dp, right)
            dh = torch.addcmul(back, DHs[t], beta, out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dbias = _sum_tb(DPRE) if needs[3] else None
        dalpha = (DH * HT).sum() if needs[4] else None
        dbeta = (DH * hprev).sum() if needs[5] else None
        dchain = _chain_grads(hprev, DPRE, chain, needs[6:])
        return (DPRE if needs[0] else None, None, dh.mT if needs[2] else None, dbias, dalpha, dbeta, *dchain)


# ---------------------------------------------------------------------------------------
# GRU (torch's gate order r, z, n)
# ---------------------------------------------------------------------------------------
class GRUScan(Function):
    r"""GRU over a sequence, torch's equations: ``(h_r, h_z, h_n) = U h + b_hh``,
    ``r = σ(x_r + h_r)``, ``z = σ(x_z + h_z)``, ``n = tanh(x_n + r h_n)``,
    ``h_t = n + z (h_{t-1} - n)``, where ``x = wx_t + b_ih``.

    Backward: with ``K^n = (1 - z)(1 - n²)``, the gradient w.r.t. ``(h_r, h_z, h_n)`` is
    ``dh_t (K^n h_n r(1 - r),  (h_{t-1} - n) z(1 - z),  K^n r)`` and
    ``dh_{t-1} = g_{t-1} + Uᵀ d(h_r, h_z, h_n) + dh_t z``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, bias_ih, bias_hh, *chain):
        hidden = h0.shape[1]
        h2 = 2 * hidden
        neg1, two = _tanh_consts(wx)
        # x_n doubled: n = tanh(x_n + r h_n) = 2 σ(2 x_n + 2 r h_n) - 1
        x = torch.add(wx, _col(bias_ih))
        x[:, h2:] *= 2
        xrz, xn2 = x[:, :h2].unbind(0), x[:, h2:].unbind(0)
        bhh = _col(bias_hh)
        S = _buffers(wx, h0)
        HG = torch.empty_like(wx)                       # U h + b_hh, all three gates
        RZ = wx.new_empty((wx.shape[0], h2, wx.shape[2]))  # r, z
        N = torch.empty_like(S[1:])
        Ss, HGs, RZs, Ns = S.unbind(0), HG.unbind(0), RZ.unbind(0), N.unbind(0)
        HGrz, HGn = HG[:, :h2].unbind(0), HG[:, h2:].unbind(0)
        Rs, Zs = RZ[:, :hidden].unbind(0), RZ[:, hidden:].unbind(0)
        left = [c.mT for c in chain]
        h = Ss[0]
        for t in range(wx.shape[0]):
            _pre(bhh, h, left, out=HGs[t])
            torch.add(xrz[t], HGrz[t], out=RZs[t]).sigmoid_()
            n = torch.addcmul(neg1, torch.addcmul(xn2[t], Rs[t], HGn[t], value=2).sigmoid_(), two, out=Ns[t])
            h = torch.addcmul(n, Zs[t], torch.sub(h, n), out=Ss[t + 1])
        ctx.save_for_backward(S, HG, RZ, N, last, *chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        S, HG, RZ, N, last, *chain = ctx.saved_tensors
        steps, hidden, batch = N.shape
        hprev = S[:-1]
        R, Z = RZ[:, :hidden], RZ[:, hidden:]
        # K[t] = (K^n h_n r(1-r), (h - n) z(1-z), K^n r) stacked along features
        kn = _one_minus_sq(N).mul_(1 - Z)
        K = N.new_empty(steps, 3, hidden, batch)
        torch.mul(kn, HG[:, 2 * hidden:], out=K[:, 0]).mul_(_dsigmoid(R))
        torch.sub(hprev, N, out=K[:, 1]).mul_(_dsigmoid(Z))
        torch.mul(kn, R, out=K[:, 2])
        g, dh = _external_grads(dstates, dfinal, last, N)
        gs = g.unbind(0) if g is not None else (None,) * steps
        DH = torch.empty_like(N)
        DH[-1] = dh
        DHG = torch.empty_like(K)
        DHs, DHGs, Ks = DH.unbind(0), DHG.unbind(0), K.unbind(0)
        DHG2s = DHG.view(steps, 3 * hidden, batch).unbind(0)
        Zs = Z.unbind(0)
        right = list(reversed(chain))
        for t in range(steps - 1, -1, -1):
            torch.mul(DHs[t], Ks[t], out=DHGs[t])
            back = _pre_grad(gs[t - 1] if t > 0 else None, DHG2s[t], right)
            dh = torch.addcmul(back, DHs[t], Zs[t], out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dhg = DHG.view(steps, 3 * hidden, batch)
        dchain = _chain_grads(hprev, dhg, chain, needs[5:])
        dbias_hh = _sum_tb(dhg) if needs[4] else None
        dx = None
        if needs[0] or needs[3]:
            # d(x_r, x_z) = d(h_r, h_z); d x_n = dh K^n (without the factor r)
            torch.mul(DH, kn, out=DHG[:, 2])
            dx = dhg
        return (dx if needs[0] else None, None, dh.mT if needs[2] else None,
                _sum_tb(dx) if needs[3] else None, dbias_hh, *dchain)


# ---------------------------------------------------------------------------------------
# LSTM (torch's gate order i, f, g, o)
# ---------------------------------------------------------------------------------------
class LSTMScan(Function):
    r"""LSTM over a sequence, torch's equations: ``(i, f, g, o) = wx_t + b + U h``
    (``b = b_ih + b_hh``), ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``, ``h_t = σ(o) tanh(c_t)``.

    Backward: ``dc_t = dc'_t + dh_t σ(o)(1 - tanh²c_t)`` (``dc'`` from step ``t+1``),
    gate gradients ``dc_t (tanh g · i(1-i), c_{t-1} f(1-f), i(1 - tanh²g))`` and
    ``dh_t tanh c_t · o(1-o)``; ``dc'_{t-1} = dc_t σ(f)``, ``dh_{t-1} = g_{t-1} + Uᵀ dgates``.
    """

    @staticmethod
    def forward(ctx, wx, last, h0, c0, bias, *chain):
        hidden = h0.shape[1]
        gs = slice(2 * hidden, 3 * hidden)
        neg1, two = _tanh_consts(wx)
        # g rows doubled: one sigmoid gives σ(i), σ(f), σ(2g), σ(o); tanh g = 2 σ(2g) - 1
        x = torch.add(wx, _col(bias))
        x[:, gs] *= 2
        xs = x.unbind(0)
        last_factor = chain[-1].clone()
        last_factor[:, gs] *= 2
        left = [c.mT for c in chain[:-1]] + [last_factor.mT]
        S, C = _buffers(wx, h0), _buffers(wx, c0)
        SG = torch.empty_like(wx)          # σ(i), σ(f), tanh(g), σ(o)
        TC = torch.empty_like(S[1:])       # tanh(c_t)
        Ss, Cs, SGs, TCs = S.unbind(0), C.unbind(0), SG.unbind(0), TC.unbind(0)
        Is, Fs, Gs, Os = (SG[:, j * hidden:(j + 1) * hidden].unbind(0) for j in range(4))
        h, c = Ss[0], Cs[0]
        for t in range(wx.shape[0]):
            torch.sigmoid(_pre(xs[t], h, left), out=SGs[t])
            torch.addcmul(neg1, Gs[t], two, out=Gs[t])
            c = torch.addcmul(torch.mul(Fs[t], c), Is[t], Gs[t], out=Cs[t + 1])
            tc = torch.addcmul(neg1, torch.add(c, c).sigmoid_(), two, out=TCs[t])
            h = torch.mul(Os[t], tc, out=Ss[t + 1])
        ctx.save_for_backward(S, C, SG, TC, last, *chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last), _final(C, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dh_final, dc_final):
        S, C, SG, TC, last, *chain = ctx.saved_tensors
        steps, hidden, batch = TC.shape
        hprev, cprev = S[:-1], C[:-1]
        I, F, G, O = (SG[:, j * hidden:(j + 1) * hidden] for j in range(4))
        # dc gets dh σ(o)(1 - tanh² c); gate factors K[t] = (i, f, g, o) blocks
        A = _one_minus_sq(TC).mul_(O)
        K = TC.new_empty(steps, 4, hidden, batch)
        torch.mul(G, _dsigmoid(I), out=K[:, 0])
        torch.mul(cprev, _dsigmoid(F), out=K[:, 1])
        torch.mul(I, _one_minus_sq(G), out=K[:, 2])
        torch.mul(TC, _dsigmoid(O), out=K[:, 3])
        g, dh = _external_grads(dstates, dh_final, last, TC)
        gs = g.unbind(0) if g is not None else (None,) * steps
        if last is None:
            dc_in = None
            dc = dc_final.mT.contiguous() if dc_final is not None else torch.zeros_like(TC[0])
        else:
            dc_in = _scatter_final(dc_final, last, TC).unbind(0)
            dc = dc_in[-1]
        DH, DC = torch.empty_like(TC), torch.empty_like(TC)
        DH[-1] = dh
        DG = torch.empty_like(K)
        DHs, DCs = DH.unbind(0), DC.unbind(0)
        DG2s = DG.view(steps, 4 * hidden, batch).unbind(0)
        DG3s, DGos = DG[:, :3].unbind(0), DG[:, 3].unbind(0)
        K3s, Kos, As, Fs = K[:, :3].unbind(0), K[:, 3].unbind(0), A.unbind(0), F.unbind(0)
        right = list(reversed(chain))
        for t in range(steps - 1, -1, -1):
            torch.addcmul(dc, DHs[t], As[t], out=DCs[t])
            torch.mul(DCs[t], K3s[t], out=DG3s[t])
            torch.mul(DHs[t], Kos[t], out=DGos[t])
            if dc_in is None or t == 0:
                dc = torch.mul(DCs[t], Fs[t])
            else:
                dc = torch.addcmul(dc_in[t - 1], DCs[t], Fs[t])
            dh = _pre_grad(gs[t - 1] if t > 0 else None, DG2s[t], right, out=DHs[t - 1] if t > 0 else None)
        needs = ctx.needs_input_grad
        dgates = DG.view(steps, 4 * hidden, batch)
        dchain = _chain_grads(hprev, dgates, chain, needs[5:])
        return (dgates if needs[0] else None, None, dh.mT if needs[2] else None, dc.mT if needs[3] else None,
                _sum_tb(dgates) if needs[4] else None, *dchain)


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


def fused_scan(cell: RNNCell, wx: torch.Tensor, state, last: torch.Tensor | None = None):
    """Run one layer over a feature-major sequence with its fused kernel.

    Args:
        cell: a cell for which :func:`supports` is true.
        wx: ``W x_t`` for all steps, ``[T, G·H, B]`` (see :func:`project`).
        state: initial state ``h`` or ``(h, c)``, ``[B, H]`` each.
        last: ``[B]`` index of each sequence's last real step (on ``wx``'s device), or
            ``None`` when every sequence runs all ``T`` steps.

    Returns:
        ``(states [T, H, B], final state)``: ``states[t]`` is ``h_{t+1}`` for every
        sequence, also past its end (the caller masks those outputs); the final state
        (``[B, H]``, or a pair for the LSTM) is taken at ``last``.

    Raises:
        TypeError: the cell has no fused kernel.
    """
    entry = KERNELS.get(type(cell))
    if entry is None:
        raise TypeError(f"fused_scan: no fused kernel for {type(cell).__name__}; "
                        f"expected one of {', '.join(k.__name__ for k in KERNELS)}")
    kernel, args = entry
    chain = cell.U.chain()
    if cell.has_cell_state:
        h0, c0 = state
        states, h_n, c_n = kernel.apply(wx, last, h0, c0, *args(cell), *chain)
        return states, (h_n, c_n)
    states, h_n = kernel.apply(wx, last, state, *args(cell), *chain)
    return states, h_n
