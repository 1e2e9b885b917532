r"""Fused time loops: one ``torch.autograd.Function`` per layer with a hand-written
backward through time.

Autograd through a Python time loop records every small operation of every step and
replays them one by one in the backward pass; at hidden size 100 that bookkeeping, not
arithmetic, is most of the cost. Here each layer's sequence is a single autograd node:

* **forward** runs the recurrence with autograd off and writes the states and the gate
  activations straight into preallocated buffers (``out=``, or in place over the input
  projection, which nothing else needs), five to nine tensor operations a step;
* **backward** walks back through time in chunks of :data:`CHUNK` steps: for a chunk it
  first computes the local derivatives that do not depend on the incoming gradient
  (element-wise operations over the whole chunk), then runs the only truly sequential
  part, ``dh_{t-1} = g_{t-1} + Uᵀ (dh_t ⊙ K_t) + dh_t ⊙ D_t``, in three to five
  operations a step, then adds the chunk's share to the parameter gradients
  (``dU = Σ_t dpre_t h_{t-1}ᵀ`` as one batched matmul per chunk). Chunks keep the
  temporaries small and in cache instead of allocating (and page-faulting)
  sequence-sized buffers.

Saved for backward: the states and the gate activations (no autograd graph per step),
about half of what ``torch.nn.GRU`` keeps (see ``benchmarks/README.md``).

**Compiled steps.** A torch operation on a ``[100, 100]`` block costs about 3 µs, mostly
dispatch, so the element-wise part of a step costs more than its data. Where
:func:`str_rnn.fused_ops.compiled` applies (CPU, float32/float64, numba importable) the
FastGRNN and LSTM kernels run it as one compiled pass a step instead
(:mod:`str_rnn.fused_kernels`; the matmuls stay in torch): forward, the gates and the new
state after the matmul; backward, the local derivatives, the step's gradients and (for
FastGRNN) the parameter sums, between two matmuls. Both versions store the same buffers
and give the same results; the torch operations run everywhere else.

**Layout.** Inside the kernels a step's state is a column block ``h: [H, B]`` (feature
major) and a sequence is ``[T, H, B]``; gate pre-activations are ``[T, G·H, B]``. Every
gate of every step is then one contiguous block, so each element-wise operation runs on
contiguous memory (on the benchmark CPU writing to a strided slice costs 3-4x), and
``pre = x_t + Uᵀ h`` is still one matmul. :func:`project` produces this layout directly
(a batched matmul) and the outputs leave as a permuted view.

**Parameters.** The recurrent matrix enters as its chain ``U.chain() = (C_1, ..., C_n)``
(row-vector convention ``h U = h C_1 ⋯ C_n``: the active factors of a learned-rank matrix
or one dense matrix; multiplied out where the factors would not be cheaper, see
:func:`str_rnn.fused_ops.chain`), biases are folded into the input projection, and squashed scalars
enter as tensors (``ζ = sigmoid(zeta)``), all computed by autograd *outside* the
Functions, which therefore hand gradients on to ``A``, ``σ``, ``B``, the thresholds ``s``
and the raw parameters without knowing about them.

**tanh** is evaluated as ``2 σ(2a) - 1``: on the CPU torch's ``tanh`` costs about five
times its ``sigmoid`` (26 µs against 5 µs for 100 x 100 on the benchmark machine). The
factor 2 is folded into the rows of ``W``, ``U`` and the bias that feed a ``tanh``
("primed" pre-activations ``a' = 2a``), so the kernels differentiate w.r.t. ``a'``
(``d tanh(a) / d a' = (1 - tanh² a) / 2``) and autograd takes the factor back.

**Variable lengths.** The loop runs every sequence to the longest length and reads each
sequence's final state at its own last step (``last = lengths - 1``). Steps after a
sequence's end only feed outputs that the caller masks to zero, so their gradient is
exactly zero and the result equals freezing the state (the reference loop's semantics).
"""
from __future__ import annotations

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from . import fused_ops as ops
from .cells import FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell
from .fused_ops import CHUNK, project  # noqa: F401  (re-exported: the kernels' public knobs)


# ---------------------------------------------------------------------------------------
# FastGRNN
# ---------------------------------------------------------------------------------------
class FastGRNNScan(Function):
    r"""FastGRNN: ``pre = W x_t + U h + b_z`` (input ``x`` holds ``W x_t + b_z``),
    ``z = σ(pre)``, ``h̃ = tanh(pre + b_h - b_z) = 2 σ(2 pre + δ) - 1`` with
    ``δ = 2 (b_h - b_z)``, ``h_t = (ζ(1 - z) + ν) h̃ + z h_{t-1}``.

    Backward: with ``K^z = (h_{t-1} - ζ h̃) z(1 - z)`` and ``K^h = (ζ(1 - z) + ν)(1 - h̃²)``,
    ``dpre_t = dh_t (K^z + K^h)``, ``dh_{t-1} = g_{t-1} + Uᵀ dpre_t + dh_t z`` and
    ``dδ = ½ Σ dh K^h``.

    The element-wise work of a step runs compiled where :func:`str_rnn.fused_ops.compiled`
    applies (one pass a step instead of six torch operations), else as torch operations;
    both store the same buffers.
    """

    @staticmethod
    def forward(ctx, x, last, h0, delta, zeta, nu, *chain):
        S = ops.states_buffer(x, h0)
        ZS = x.new_empty((2,) + x.shape)  # z and s = σ(2 pre + δ) of every step; h~ = 2 s - 1
        uh = ops.Chain(chain, x.shape[0], x.shape[2], x)
        kernels = ops.compiled(x)
        if kernels is not None:
            _fastgrnn_forward_compiled(kernels, x, S, ZS, uh, delta, zeta, nu)
        else:
            _fastgrnn_forward_torch(x, S, ZS, uh, delta, zeta, nu)
        ops.save(ctx, (S, ZS, last, zeta, nu), chain, uh)
        return S[1:], ops.final_state(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        (S, ZS, last, zeta, nu), uh, dchain = ops.restore(ctx, 5)
        needs = ctx.needs_input_grad
        g, dh = ops.external_grads(dstates, dfinal, last, S[1:])
        kernels = ops.compiled(S)
        if kernels is not None:
            DPRE, dh, ddelta, dzeta, dnu = _fastgrnn_backward_compiled(kernels, S, ZS, uh, dchain, g, dh, zeta, nu,
                                                                       needs)
        else:
            DPRE, dh, ddelta, dzeta, dnu = _fastgrnn_backward_torch(S, ZS, uh, dchain, g, dh, zeta, nu, needs)
        return (DPRE if needs[0] else None, None, dh.mT if needs[2] else None, ddelta if needs[3] else None,
                dzeta if needs[4] else None, dnu if needs[5] else None, *dchain)


def _fastgrnn_forward_torch(x, S, ZS, uh, delta, zeta, nu):
    """:class:`FastGRNNScan`'s forward loop as torch operations, into ``S`` and ``ZS``."""
    xs = x.unbind(0)
    delta = delta.unsqueeze(-1).expand(x.shape[1:]).contiguous()
    neg_c1 = torch.full_like(delta, 0.0).sub_(zeta + nu)
    Ss, ZSs, Zs, S2s = S.unbind(0), ZS.unbind(1), ZS[0].unbind(0), ZS[1].unbind(0)
    h = Ss[0]
    for t in range(x.shape[0]):
        pre = uh.pre(xs[t], h, t, out=Zs[t])
        torch.add(delta, pre, alpha=2, out=S2s[t])
        ZSs[t].sigmoid_()
        # h_t = z h + w h~ with w = c1 - ζ z, c1 = ζ + ν, h~ = 2s - 1:  z h - w + 2 s w
        neg_w = torch.addcmul(neg_c1, Zs[t], zeta)
        h = torch.addcmul(torch.addcmul(neg_w, Zs[t], h), S2s[t], neg_w, value=-2, out=Ss[t + 1])


def _fastgrnn_forward_compiled(kernels, x, S, ZS, uh, delta, zeta, nu):
    """The same loop with one compiled pass a step after the matmul
    (:func:`str_rnn.fused_kernels.fastgrnn_forward`)."""
    Ss, Zs = S.unbind(0), ZS[0].unbind(0)
    Xn, Sn, Zn, S2n = x.detach().contiguous().numpy(), S.numpy(), ZS[0].numpy(), ZS[1].numpy()
    real = Zn.dtype.type
    dn = delta.detach().contiguous().numpy()
    zeta_, c1 = real(zeta.item()), real((zeta + nu).item())
    for t in range(x.shape[0]):
        uh.apply(Ss[t], t, out=Zs[t])
        kernels.fastgrnn_forward(Xn, Zn, S2n, Sn, dn, zeta_, c1, t)


def _fastgrnn_backward_torch(S, ZS, uh, dchain, g, dh, zeta, nu, needs):
    """:class:`FastGRNNScan`'s backward as torch operations, chunk by chunk: the local
    derivatives of a chunk first, then its steps, then its parameter sums. Returns
    ``(dpre, dh_0, dδ, dζ, dν)``; adds to the chain's gradients ``dchain``."""
    Z = ZS[0]
    steps = Z.shape[0]
    c1 = zeta + nu
    gs = ops.rows(g, steps)
    DPRE = torch.empty_like(S[1:])
    DPs = DPRE.unbind(0)
    DH = ops.RunningGrad(dh, steps)
    ddelta = dnu = dzeta = None
    for t0, t1 in ops.chunks(steps):
        hp, z, s = S[t0:t1], Z[t0:t1], ZS[1, t0:t1]
        # in terms of s (h~ = 2s - 1, 1 - h~² = 4 s(1-s)):
        # K^h = 4 (c1 - ζ z) s(1-s),  K^z = (h + ζ - 2ζ s) z(1-z)
        kh = torch.addcmul(4 * c1, z, -4 * zeta).mul_(ops.dsigmoid(s))
        kz = torch.addcmul(hp, s, -2 * zeta).add_(zeta).mul_(ops.dsigmoid(z))
        k = torch.add(kz, kh)
        dh_c, dhs, outs = DH.chunk(t0, t1)
        ks, zs = k.unbind(0), z.unbind(0)
        for j in range(t1 - t0 - 1, -1, -1):
            t = t0 + j
            dp = torch.mul(dhs[j], ks[j], out=DPs[t])
            back = uh.back(gs[t - 1] if t > 0 else None, dp, t)
            dh = torch.addcmul(back, dhs[j], zs[j], out=outs[j])
        uh.grads(hp, DPRE[t0:t1], t0, t1, needs[6:], dchain)
        if needs[3]:  # dδ = ½ Σ dh K^h
            ddelta = ops.add_or_set(ddelta, ops.sum_tb(kh.mul_(dh_c)))
        if needs[4] or needs[5]:
            # dν = Σ dh h~ = 2 Σ dh s - Σ dh;  dζ = Σ dh (1 - z) h~ = dν - (2 Σ dh z s - Σ dh z)
            flat_dh, flat_s = dh_c.view(-1), s.view(-1)
            s_h = 2 * torch.dot(flat_dh, flat_s) - flat_dh.sum()
            dhz = flat_dh.mul_(z.view(-1))
            dnu = ops.add_or_set(dnu, s_h)
            dzeta = ops.add_or_set(dzeta, s_h - 2 * torch.dot(dhz, flat_s) + dhz.sum())
    return DPRE, dh, 0.5 * ddelta if needs[3] else None, dzeta, dnu


def _fastgrnn_backward_compiled(kernels, S, ZS, uh, dchain, g, dh, zeta, nu, needs):
    """The same backward with one compiled pass a step between the matmuls: ``dh_t`` from
    the matmul's output and ``dh_{t+1} z_{t+1}``, then ``dpre_t`` and the parameter sums
    (into per-element accumulators, summed once at the end); see
    :func:`str_rnn.fused_kernels.fastgrnn_carry_backward`."""
    steps = ZS.shape[1]
    gs = ops.rows(g, steps)
    DPRE = torch.empty_like(S[1:])
    DPs = DPRE.unbind(0)
    DH = dh.clone(memory_format=torch.contiguous_format)  # dh_t, updated in place step by step
    BACK = torch.empty_like(DH)
    ACC = DH.new_zeros((3,) + DH.shape)
    DHn, BACKn, ACCn, DPn = DH.numpy(), BACK.numpy(), ACC.numpy(), DPRE.numpy()
    Sn, Zn, S2n = S.numpy(), ZS[0].numpy(), ZS[1].numpy()
    real = Zn.dtype.type
    zeta_, c1 = real(zeta.item()), real((zeta + nu).item())
    for t0, t1 in ops.chunks(steps):
        for t in range(t1 - 1, t0 - 1, -1):
            if t == steps - 1:
                kernels.fastgrnn_backward(DHn, Zn, S2n, Sn, DPn, ACCn, zeta_, c1, t)
            else:
                kernels.fastgrnn_carry_backward(DHn, BACKn, Zn, S2n, Sn, DPn, ACCn, zeta_, c1, t)
            uh.back(gs[t - 1] if t > 0 else None, DPs[t], t, out=BACK)
        uh.grads(S[t0:t1], DPRE[t0:t1], t0, t1, needs[6:], dchain)
    kernels.fastgrnn_carry(DHn, BACKn, Zn, 0)
    return DPRE, DH, 0.5 * ACC[0].sum(1), ACC[2].sum(), ACC[1].sum()


# ---------------------------------------------------------------------------------------
# FastRNN
# ---------------------------------------------------------------------------------------
class FastRNNScan(Function):
    r"""FastRNN: ``h_t = β h_{t-1} + α tanh(a_t)``, ``a_t = W x_t + b + U h`` given primed
    (doubled) ``x = 2 (W x_t + b)`` and chain ``2 U``; ``α``, ``β`` already squashed.

    Backward: ``da'_t = dh_t α (1 - h̃²) / 2``, ``dh_{t-1} = g_{t-1} + (2U)ᵀ da'_t + β dh_t``.
    """

    @staticmethod
    def forward(ctx, x, last, h0, alpha, beta, *chain):
        neg1, two = ops.tanh_consts(x)
        xs = x.unbind(0)
        uh = ops.Chain(chain, x.shape[0], x.shape[2], x)
        S = ops.states_buffer(x, h0)
        HT = x  # ours (the projection's output): step by step it becomes h~
        Ss = S.unbind(0)
        h = Ss[0]
        for t in range(x.shape[0]):
            ht = torch.addcmul(neg1, uh.pre_(xs[t], h, t).sigmoid_(), two, out=xs[t])
            h = torch.addcmul(torch.mul(h, beta), ht, alpha, out=Ss[t + 1])
        ops.save(ctx, (S, HT, last, alpha, beta), chain, uh, dirty=x)
        return S[1:], ops.final_state(S, last), x

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal, _):
        (S, HT, last, alpha, beta), uh, dchain = ops.restore(ctx, 5)
        steps = HT.shape[0]
        needs = ctx.needs_input_grad
        g, dh = ops.external_grads(dstates, dfinal, last, HT)
        gs = ops.rows(g, steps)
        DPRE = torch.empty_like(HT)
        DPs = DPRE.unbind(0)
        DH = ops.RunningGrad(dh, steps)
        dalpha = dbeta = None
        half_alpha = alpha * 0.5
        for t0, t1 in ops.chunks(steps):
            hp, ht = S[t0:t1], HT[t0:t1]
            ks = ops.one_minus_sq(ht).mul_(half_alpha).unbind(0)
            dh_c, dhs, outs = DH.chunk(t0, t1)
            for j in range(t1 - t0 - 1, -1, -1):
                t = t0 + j
                dp = torch.mul(dhs[j], ks[j], out=DPs[t])
                back = uh.back(gs[t - 1] if t > 0 else None, dp, t)
                dh = torch.addcmul(back, dhs[j], beta, out=outs[j])
            uh.grads(hp, DPRE[t0:t1], t0, t1, needs[5:], dchain)
            if needs[3]:
                dalpha = ops.add_or_set(dalpha, (dh_c * ht).sum())
            if needs[4]:
                dbeta = ops.add_or_set(dbeta, (dh_c * hp).sum())
        return (DPRE if needs[0] else None, None, dh.mT if needs[2] else None, dalpha, dbeta, *dchain)


# ---------------------------------------------------------------------------------------
# GRU (torch's gate order r, z, n)
# ---------------------------------------------------------------------------------------
class GRUScan(Function):
    r"""GRU, torch's equations with primed ``n`` rows: input ``x = (W_r x + b_ir + b_hr,
    W_z x + b_iz + b_hz, 2 (W_n x + b_in))``, chain ``U`` with its ``n`` rows doubled,
    ``bias_n = 2 b_hn``. Per step ``(r, z) = σ(x_{rz} + U'_{rz} h)``,
    ``h'_n = U'_n h + bias_n``, ``n = 2 σ(x'_n + r h'_n) - 1``, ``h_t = n + z (h_{t-1} - n)``.

    Backward: with ``K^n = (1 - z)(1 - n²) / 2``, the gradient w.r.t. ``(h_r, h_z, h'_n)``
    is ``dh_t (K^n h'_n r(1 - r),  (h_{t-1} - n) z(1 - z),  K^n r)`` and
    ``dh_{t-1} = g_{t-1} + U'ᵀ d(h_r, h_z, h'_n) + dh_t z``; ``d x'_n = dh_t K^n``.
    Only ``h'_n`` of the recurrent product is stored (``r`` and ``z`` are).
    """

    @staticmethod
    def forward(ctx, x, last, h0, bias_n, *chain):
        hidden = h0.shape[1]
        h2 = 2 * hidden
        neg1, two = ops.tanh_consts(x)
        bias_n = bias_n.unsqueeze(-1).expand(hidden, x.shape[2]).contiguous()
        S = ops.states_buffer(x, h0)
        # x is ours (the projection's output): step by step its rows become r, z and n
        RZ, N = x[:, :h2], x[:, h2:]
        HN = torch.empty_like(S[1:])
        Ss, RZs, HNs, Ns = S.unbind(0), RZ.unbind(0), HN.unbind(0), N.unbind(0)
        Rs, Zs = RZ[:, :hidden].unbind(0), RZ[:, hidden:].unbind(0)
        uh = ops.Chain(chain, x.shape[0], x.shape[2], x)
        last_rz, last_n = chain[-1][:, :h2].mT, chain[-1][:, h2:].mT
        h = Ss[0]
        for t in range(x.shape[0]):
            y = uh.inner(h, t)
            RZs[t].addmm_(last_rz, y).sigmoid_()
            hn = torch.addmm(bias_n, last_n, y, out=HNs[t])
            n = torch.addcmul(neg1, Ns[t].addcmul_(Rs[t], hn).sigmoid_(), two, out=Ns[t])
            h = torch.addcmul(n, Zs[t], torch.sub(h, n), out=Ss[t + 1])
        ops.save(ctx, (S, x, HN, last), chain, uh, dirty=x)
        return S[1:], ops.final_state(S, last), x

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal, _):
        (S, RZN, HN, last), uh, dchain = ops.restore(ctx, 4)
        steps, hidden, batch = HN.shape
        RZ, N = RZN[:, :2 * hidden], RZN[:, 2 * hidden:]
        needs = ctx.needs_input_grad
        g, dh = ops.external_grads(dstates, dfinal, last, N)
        gs = ops.rows(g, steps)
        DHG = N.new_empty(steps, 3, hidden, batch)  # d(h_r, h_z, h'_n), then d x'
        DHG2 = DHG.view(steps, 3 * hidden, batch)
        DHGs, DHG2s = DHG.unbind(0), DHG2.unbind(0)
        DH = ops.RunningGrad(dh, steps)
        dbias_n = None
        for t0, t1 in ops.chunks(steps):
            hp, r, z, n = S[t0:t1], RZ[t0:t1, :hidden], RZ[t0:t1, hidden:], N[t0:t1]
            kn = torch.mul(z, -0.5).add_(0.5).mul_(ops.one_minus_sq(n))
            K = n.new_empty(t1 - t0, 3, hidden, batch)
            torch.mul(kn, HN[t0:t1], out=K[:, 0]).mul_(ops.dsigmoid(r))
            torch.sub(hp, n, out=K[:, 1]).mul_(ops.dsigmoid(z))
            torch.mul(kn, r, out=K[:, 2])
            dh_c, dhs, outs = DH.chunk(t0, t1)
            Ks, zs = K.unbind(0), z.unbind(0)
            for j in range(t1 - t0 - 1, -1, -1):
                t = t0 + j
                torch.mul(dhs[j], Ks[j], out=DHGs[t])
                back = uh.back(gs[t - 1] if t > 0 else None, DHG2s[t], t)
                dh = torch.addcmul(back, dhs[j], zs[j], out=outs[j])
            uh.grads(hp, DHG2[t0:t1], t0, t1, needs[4:], dchain)
            if needs[3]:
                dbias_n = ops.add_or_set(dbias_n, ops.sum_tb(DHG[t0:t1, 2]))
            # d x' differs from d(h_r, h_z, h'_n) only in the n rows: dh K^n without r
            torch.mul(dh_c, kn, out=DHG[t0:t1, 2])
        return (DHG2 if needs[0] else None, None, dh.mT if needs[2] else None, dbias_n, *dchain)


# ---------------------------------------------------------------------------------------
# LSTM (torch's gate order i, f, g, o)
# ---------------------------------------------------------------------------------------
class LSTMScan(Function):
    r"""LSTM, torch's equations with primed ``g`` rows: input ``x = W x_t + b_ih + b_hh``
    with its ``g`` rows doubled, chain ``U`` likewise; one ``σ`` of ``x_t + U' h`` gives
    ``σ(i), σ(f), σ(2g), σ(o)`` and ``tanh g = 2 σ(2g) - 1``;
    ``c_t = σ(f) c_{t-1} + σ(i) tanh g``, ``h_t = σ(o) tanh c_t``.

    Backward: ``dc_t = dc'_t + dh_t σ(o)(1 - tanh² c_t)`` (``dc'`` from step ``t+1``), gate
    gradients ``dc_t (tanh g · i(1-i), c_{t-1} f(1-f), i (1 - tanh² g) / 2)`` and
    ``dh_t tanh c_t · o(1-o)``; ``dc'_{t-1} = dc_t σ(f)``, ``dh_{t-1} = g_{t-1} + U'ᵀ dgates``.
    """

    @staticmethod
    def forward(ctx, x, last, h0, c0, *chain):
        uh = ops.Chain(chain, x.shape[0], x.shape[2], x)
        S, C = ops.states_buffer(x, h0), ops.states_buffer(x, c0)
        TC = torch.empty_like(S[1:])  # tanh(c_t)
        # x is ours (the projection's output, needed by nobody else): step by step its
        # pre-activations become σ(i), σ(f), tanh(g), σ(o), saving a [T, 4H, B] buffer
        kernels = ops.compiled(x) if x.is_contiguous() else None  # (NumPy writes into x)
        if kernels is not None:
            _lstm_forward_compiled(kernels, x, S, C, TC, uh)
        else:
            _lstm_forward_torch(x, S, C, TC, uh)
        ops.save(ctx, (S, C, x, TC, last), chain, uh, dirty=x)
        return S[1:], ops.final_state(S, last), ops.final_state(C, last), x

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dh_final, dc_final, _):
        (S, C, SG, TC, last), uh, dchain = ops.restore(ctx, 5)
        needs = ctx.needs_input_grad
        g, dh = ops.external_grads(dstates, dh_final, last, TC)
        if last is None:
            dc_in = None
            dc = dc_final.mT if dc_final is not None else torch.zeros_like(TC[0])
        else:
            dc_in = ops.scatter_final(dc_final, last, TC)
            dc = dc_in[-1]
        kernels = ops.compiled(SG) if SG.is_contiguous() else None
        if kernels is not None:
            DG2, dh, dc = _lstm_backward_compiled(kernels, S, C, SG, TC, uh, dchain, g, dh, dc_in, dc, needs)
        else:
            DG2, dh, dc = _lstm_backward_torch(S, C, SG, TC, uh, dchain, g, dh, dc_in, dc, needs)
        return (DG2 if needs[0] else None, None, dh.mT if needs[2] else None, dc.mT if needs[3] else None,
                *dchain)


def _lstm_forward_torch(x, S, C, TC, uh):
    """:class:`LSTMScan`'s forward loop as torch operations (gates into ``x`` in place)."""
    hidden = S.shape[1]
    neg1, two = ops.tanh_consts(x)
    xs = x.unbind(0)
    Ss, Cs, TCs = S.unbind(0), C.unbind(0), TC.unbind(0)
    Is, Fs, Gs, Os = (x[:, j * hidden:(j + 1) * hidden].unbind(0) for j in range(4))
    h, c = Ss[0], Cs[0]
    for t in range(x.shape[0]):
        uh.pre_(xs[t], h, t).sigmoid_()
        torch.addcmul(neg1, Gs[t], two, out=Gs[t])
        c = torch.addcmul(torch.mul(Fs[t], c), Is[t], Gs[t], out=Cs[t + 1])
        tc = torch.addcmul(neg1, torch.add(c, c).sigmoid_(), two, out=TCs[t])
        h = torch.mul(Os[t], tc, out=Ss[t + 1])


def _lstm_forward_compiled(kernels, x, S, C, TC, uh):
    """The same loop with one compiled pass a step after the matmul
    (:func:`str_rnn.fused_kernels.lstm_forward`)."""
    P = x.new_empty(x.shape[1:])
    Ss = S.unbind(0)
    Xn, Pn, Sn, Cn, TCn = x.detach().numpy(), P.numpy(), S.numpy(), C.numpy(), TC.numpy()
    for t in range(x.shape[0]):
        uh.apply(Ss[t], t, out=P)
        kernels.lstm_forward(Xn, Pn, Sn, Cn, TCn, t)


def _lstm_backward_torch(S, C, SG, TC, uh, dchain, g, dh, dc_in, dc, needs):
    """:class:`LSTMScan`'s backward as torch operations, chunk by chunk. Returns
    ``(d gates, dh_0, dc_0)``; adds to the chain's gradients ``dchain``."""
    steps, hidden, batch = TC.shape
    gs = ops.rows(g, steps)
    dc_in = ops.rows(dc_in, steps)
    DG = TC.new_empty(steps, 4, hidden, batch)
    DG2 = DG.view(steps, 4 * hidden, batch)
    DG3s, DGos, DG2s = DG[:, :3].unbind(0), DG[:, 3].unbind(0), DG2.unbind(0)
    DH = ops.RunningGrad(dh, steps)
    DCs = TC.new_empty(min(CHUNK, steps), hidden, batch).unbind(0)
    for t0, t1 in ops.chunks(steps):
        i, f, gg, o = (SG[t0:t1, j * hidden:(j + 1) * hidden] for j in range(4))
        tc = TC[t0:t1]
        # dc gets dh σ(o)(1 - tanh² c); gate factors K = (i, f, g, o) blocks
        A = ops.one_minus_sq(tc).mul_(o)
        K = tc.new_empty(t1 - t0, 4, hidden, batch)
        torch.mul(gg, ops.dsigmoid(i), out=K[:, 0])
        torch.mul(C[t0:t1], ops.dsigmoid(f), out=K[:, 1])
        torch.mul(i, ops.one_minus_sq(gg, 0.5), out=K[:, 2])
        torch.mul(tc, ops.dsigmoid(o), out=K[:, 3])
        _, dhs, outs = DH.chunk(t0, t1)
        K3s, Kos, As, fs = K[:, :3].unbind(0), K[:, 3].unbind(0), A.unbind(0), f.unbind(0)
        for j in range(t1 - t0 - 1, -1, -1):
            t = t0 + j
            dc_t = torch.addcmul(dc, dhs[j], As[j], out=DCs[j])
            torch.mul(dc_t, K3s[j], out=DG3s[t])
            torch.mul(dhs[j], Kos[j], out=DGos[t])
            if t > 0 and dc_in[t - 1] is not None:
                dc = torch.addcmul(dc_in[t - 1], dc_t, fs[j])
            else:
                dc = torch.mul(dc_t, fs[j])
            dh = uh.back(gs[t - 1] if t > 0 else None, DG2s[t], t, out=outs[j])
        uh.grads(S[t0:t1], DG2[t0:t1], t0, t1, needs[4:], dchain)
    return DG2, dh, dc


def _lstm_backward_compiled(kernels, S, C, SG, TC, uh, dchain, g, dh, dc_in, dc, needs):
    """The same backward with one compiled pass a step before the matmul
    (:func:`str_rnn.fused_kernels.lstm_backward`); ``dh_{t-1}`` is the matmul's output."""
    steps = TC.shape[0]
    gs = ops.rows(g, steps)
    DG2 = SG.new_empty(SG.shape)
    DG2s = DG2.unbind(0)
    DH = dh.clone(memory_format=torch.contiguous_format)
    DC = dc.clone(memory_format=torch.contiguous_format)
    DCIN = dc_in if dc_in is not None else TC.new_empty((0,) + TC.shape[1:])
    DHn, DCn, DCINn, DGn = DH.numpy(), DC.numpy(), DCIN.numpy(), DG2.numpy()
    SGn, Cn, TCn = SG.numpy(), C.numpy(), TC.numpy()
    for t0, t1 in ops.chunks(steps):
        for t in range(t1 - 1, t0 - 1, -1):
            kernels.lstm_backward(DHn, DCn, DCINn, SGn, Cn, TCn, DGn, t)
            uh.back(gs[t - 1] if t > 0 else None, DG2s[t], t, out=DH)
        uh.grads(S[t0:t1], DG2[t0:t1], t0, t1, needs[4:], dchain)
    return DG2, DH, DC


# ---------------------------------------------------------------------------------------
# dispatch: per cell, the projection (autograd) and the kernel's arguments
# ---------------------------------------------------------------------------------------
def _fastgrnn(cell: FastGRNNCell, x, h0, last):
    xin = project(cell.W, x, cell.bias_z)
    return FastGRNNScan.apply(xin, last, h0, 2 * (cell.bias_h - cell.bias_z), torch.sigmoid(cell.zeta),
                              torch.sigmoid(cell.nu), *ops.chain(cell.U))


def _fastrnn(cell: FastRNNCell, x, h0, last):
    two = cell.bias.new_full((cell.hidden_size,), 2.0)
    xin = project(cell.W, x, cell.bias, two)
    states, h_n, _ = FastRNNScan.apply(xin, last, h0, torch.sigmoid(cell.alpha), torch.sigmoid(cell.beta),
                                       *ops.scale_cols(ops.chain(cell.U), two))
    return states, h_n


def _gate_scale(cell: RNNCell, gate: int) -> torch.Tensor:
    """Ones, with 2 on the rows of gate number ``gate`` (the one that feeds a tanh)."""
    h = cell.hidden_size
    scale = cell.bias_ih.new_ones(cell.n_gates * h)
    scale[gate * h:(gate + 1) * h] = 2.0
    return scale


def _gru(cell: GRUCell, x, h0, last):
    h = cell.hidden_size
    scale = _gate_scale(cell, 2)
    # b_hr, b_hz sit outside the r* product: fold them into the input bias
    bias = cell.bias_ih + torch.cat([cell.bias_hh[:2 * h], cell.bias_hh.new_zeros(h)])
    xin = project(cell.W, x, bias, scale)
    states, h_n, _ = GRUScan.apply(xin, last, h0, 2 * cell.bias_hh[2 * h:], *ops.scale_cols(ops.chain(cell.U), scale))
    return states, h_n


def _lstm(cell: LSTMCell, x, state, last):
    scale = _gate_scale(cell, 2)
    xin = project(cell.W, x, cell.bias_ih + cell.bias_hh, scale)
    states, h_n, c_n, _ = LSTMScan.apply(xin, last, state[0], state[1], *ops.scale_cols(ops.chain(cell.U), scale))
    return states, (h_n, c_n)


# exact types only: a subclass may change the equations, and then takes the reference loop
KERNELS = {FastGRNNCell: _fastgrnn, FastRNNCell: _fastrnn, GRUCell: _gru, LSTMCell: _lstm}


def supports(cell: RNNCell) -> bool:
    """Whether ``cell`` has a fused kernel (its exact type is one of the four cells)."""
    return type(cell) in KERNELS


def fused_scan(cell: RNNCell, x: torch.Tensor, state, last: torch.Tensor | None = None):
    """Run one layer (input projection and recurrence) over a feature-major sequence.

    Args:
        cell: a cell for which :func:`supports` is true.
        x: the layer's input, ``[T, input_size, B]`` (any strides).
        state: initial state ``h`` or ``(h, c)``, ``[B, H]`` each.
        last: ``[B]`` index of each sequence's last real step (on ``x``'s device), or
            ``None`` when every sequence runs all ``T`` steps.

    Returns:
        ``(states [T, H, B], final state)``: ``states[t]`` is ``h_{t+1}`` for every
        sequence, also past its end (the caller masks those outputs); the final state
        (``[B, H]``, or a pair for the LSTM) is taken at ``last``.

    Raises:
        TypeError: the cell has no fused kernel.
    """
    run = KERNELS.get(type(cell))
    if run is None:
        raise TypeError(f"fused_scan: no fused kernel for {type(cell).__name__}; "
                        f"expected one of {', '.join(k.__name__ for k in KERNELS)}")
    return run(cell, x, state, last)
