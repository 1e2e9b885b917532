r"""Fused time loops: one ``torch.autograd.Function`` per layer with a hand-written
backward through time.

Autograd through a Python time loop records every small operation of every step and
replays them one by one in the backward pass; at hidden size 100 that bookkeeping, not
arithmetic, is most of the cost. Here each layer's sequence is a single autograd node:

* **forward** runs the recurrence with autograd off and writes the states and the gate
  activations straight into preallocated buffers (``out=``), five to nine tensor
  operations a step;
* **backward** walks back through time in chunks of :data:`CHUNK` steps: for a chunk it
  first computes the local derivatives that do not depend on the incoming gradient
  (element-wise operations over the whole chunk), then runs the only truly sequential
  part, ``dh_{t-1} = g_{t-1} + U (dh_t ⊙ K_t) + dh_t ⊙ D_t``, in three to five operations
  a step, then adds the chunk's share to the parameter gradients (``dU = Σ_t dpre_t
  h_{t-1}ᵀ`` as one accumulating matmul a step). Chunks keep the temporaries small and
  in cache instead of allocating (and page-faulting) sequence-sized buffers.

**Layout.** Inside the kernels a step's state is a column block ``h: [H, B]`` (feature
major) and a sequence is ``[T, H, B]``; gate pre-activations are ``[T, G·H, B]``. Every
gate of every step is then one contiguous block, so each element-wise operation runs on
contiguous memory (on the benchmark CPU writing to a strided slice costs 3-4x), and
``pre = x_t + Uᵀ h`` is still one matmul. :func:`project` produces this layout directly
(a batched matmul) and the outputs leave as a permuted view.

**Parameters.** The recurrent matrix enters as its chain ``U.chain() = (C_1, ..., C_n)``
(row-vector convention ``h U = h C_1 ⋯ C_n``: the active factors of a learned-rank matrix
or one dense matrix), biases are folded into the input projection, and squashed scalars
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

from .cells import FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell
from .lowrank import Matrix

CHUNK = 16
"""Time steps per chunk of the backward pass."""


# ---------------------------------------------------------------------------------------
# feature-major batched linear map (the input projection)
# ---------------------------------------------------------------------------------------
def _outer_sum(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``acc + Σ_t a[t] b[t]ᵀ`` for ``a [T, m, B]``, ``b [T, n, B]``: one accumulating matmul
    a step (no copy into a ``[m, T·B]`` layout and no ``[T, m, n]`` intermediate)."""
    start = 0
    if acc is None:
        acc = torch.mm(a[0], b[0].mT)
        start = 1
    for t in range(start, a.shape[0]):
        acc.addmm_(a[t], b[t].mT)
    return acc


def _bmm(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x[t]`` for every ``t`` as one ``bmm`` (``torch.matmul`` would fold the batch into
    the rows and copy the transposed result back)."""
    return torch.bmm(m.expand(x.shape[0], -1, -1), x)


class _BatchedLinear(Function):
    """``y[t] = weight @ x[t] + bias`` for ``x [T, in, B]`` -> ``[T, out, B]``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = _bmm(weight, x)
        if bias is not None:
            y.add_(bias.unsqueeze(-1))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx = _bmm(weight.mT, dy) if needs[0] else None
        dw = _outer_sum(dy, x) if needs[1] else None
        db = dy.sum((0, 2)) if ctx.has_bias and needs[2] else None
        return dx, dw, db


def project(matrix: Matrix, x: torch.Tensor, bias: torch.Tensor | None = None,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """``scale ⊙ (M x_t + bias)`` for every step of a feature-major ``x [T, in, B]`` -> ``[T, out, B]``.

    The same product as ``matrix(x_t)`` (through :meth:`Matrix.chain`), written in the
    feature-major layout directly; ``scale`` (per output row) is folded into the last
    factor and the bias.
    """
    chain = matrix.chain()
    last = chain[-1].mT
    if scale is not None:
        last = last * scale.unsqueeze(-1)
        bias = bias * scale if bias is not None else None
    for c in chain[:-1]:
        x = _BatchedLinear.apply(x, c.mT, None)
    return _BatchedLinear.apply(x, last, bias)


# ---------------------------------------------------------------------------------------
# shared pieces of the scans (feature-major: a step is [features, batch])
# ---------------------------------------------------------------------------------------
class _Chain:
    r"""The recurrent chain ``(C_1, ..., C_n)`` inside a kernel, and what its products leave.

    Forward: ``pre = x_t + L_n (⋯ (L_1 h))`` with ``L_i = C_iᵀ``; the intermediate products
    ``y_i = L_i ⋯ L_1 h`` (``i < n``) of every step are written to ``Y[i-1] [T, r_i, B]``.
    Backward: ``dh = C_1 (⋯ (C_n dpre))``, the intermediates ``e_i = C_{i+1} ⋯ C_n dpre``
    to ``E[i-1]``. The chain's gradients are then sums of outer products of stored
    columns, ``dC_i = Σ_t y_{i-1} e_iᵀ`` (``y_0 = h_{t-1}``, ``e_n = dpre``), with no
    product recomputed: training costs ``3 r (in + out)`` multiply-adds a column against
    ``3 in·out`` for the dense matrix, the same break-even as the forward pass.
    """

    def __init__(self, chain, steps: int, batch: int, like: torch.Tensor, Y=None):
        self.chain = chain
        self.left = [c.mT for c in chain]
        self.right = list(reversed(chain))
        if Y is None:
            Y = [like.new_empty(steps, c.shape[1], batch) for c in chain[:-1]]
        self.Y = list(Y)
        self.Ys = [y.unbind(0) for y in self.Y]
        self.E = self.Es = None

    def inner(self, h: torch.Tensor, t: int) -> torch.Tensor:
        """``L_{n-1} ⋯ L_1 h``, storing each product for step ``t``."""
        for m, ys in zip(self.left[:-1], self.Ys):
            h = torch.mm(m, h, out=ys[t])
        return h

    def pre(self, x_t: torch.Tensor, h: torch.Tensor, t: int, out=None) -> torch.Tensor:
        """``x_t + L_n ⋯ L_1 h``."""
        y = self.inner(h, t)
        return torch.addmm(x_t, self.left[-1], y) if out is None else torch.addmm(x_t, self.left[-1], y, out=out)

    def back(self, g_t, d: torch.Tensor, t: int, out=None) -> torch.Tensor:
        """``g_t + C_1 ⋯ C_n d`` (``g_t`` may be None), storing the intermediates for step ``t``."""
        if self.E is None:
            self.E = [d.new_empty((len(y),) + y.shape[1:]) for y in self.Y]
            self.Es = [e.unbind(0) for e in self.E]
        for m, es in zip(self.right[:-1], reversed(self.Es)):
            d = torch.mm(m, d, out=es[t])
        if g_t is None:
            return torch.mm(self.chain[0], d) if out is None else torch.mm(self.chain[0], d, out=out)
        return torch.addmm(g_t, self.chain[0], d) if out is None else torch.addmm(g_t, self.chain[0], d, out=out)

    def grads(self, hprev: torch.Tensor, dpre: torch.Tensor, t0: int, t1: int, needs, acc: list) -> None:
        """Add steps ``t0 .. t1-1`` to the gradients ``acc`` of the chain (where ``needs``)."""
        ins = [hprev] + [y[t0:t1] for y in self.Y]
        outs = [e[t0:t1] for e in self.E or ()] + [dpre]
        for i, need in enumerate(needs):
            if need:
                acc[i] = _outer_sum(ins[i], outs[i], acc[i])


def _scale_cols(chain, scale: torch.Tensor):
    """The chain with the output columns of its last factor multiplied by ``scale``."""
    return [*chain[:-1], chain[-1] * scale]


def _chunks(steps: int):
    """``(t0, t1)`` chunks of at most :data:`CHUNK` steps, from the end of the sequence."""
    t1 = steps
    while t1 > 0:
        t0 = max(0, t1 - CHUNK)
        yield t0, t1
        t1 = t0


class _DH:
    """The running ``dh`` of the backward loop, written in place chunk by chunk.

    Two ``[CHUNK, H, B]`` buffers alternate, so the step at the start of a chunk writes
    ``dh_{t0-1}`` straight into the next chunk's last slot while the finished chunk's
    ``dh`` stay readable for its parameter gradients.
    """

    def __init__(self, dh_last: torch.Tensor, steps: int):
        self.bufs = [dh_last.new_empty((min(CHUNK, steps),) + dh_last.shape) for _ in range(2)]
        self.k = 0
        self.cur = self.bufs[0][: min(CHUNK, steps)]
        self.cur[-1] = dh_last

    def target(self, j: int, t0: int):
        """Where step ``t0 + j`` writes ``dh_{t0+j-1}``: in this chunk, the next one, or new."""
        if j > 0:
            return self.cur[j - 1]
        if t0 == 0:
            return None
        return self.bufs[1 - self.k][min(CHUNK, t0) - 1]

    def advance(self, t0: int) -> None:
        self.k = 1 - self.k
        self.cur = self.bufs[self.k][: min(CHUNK, t0)]


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
            dh = dfinal.mT if dfinal is not None else torch.zeros_like(like[0])
        else:
            dh = g[-1] + dfinal.mT if dfinal is not None else g[-1]
        return g, dh
    g = dstates.clone(memory_format=torch.contiguous_format) if dstates is not None else torch.zeros_like(like)
    if dfinal is not None:
        batch = torch.arange(g.shape[2], device=g.device)
        g.permute(0, 2, 1).index_put_((last, batch), dfinal, accumulate=True)
    return g, g[-1]


def _scatter_final(dfinal, last, like: torch.Tensor) -> torch.Tensor:
    """``[T, H, B]`` zeros with ``dfinal[b]`` at step ``last[b]`` (the LSTM's ``dc_n``)."""
    g = torch.zeros_like(like)
    if dfinal is not None:
        g.permute(0, 2, 1)[last, torch.arange(g.shape[2], device=g.device)] = dfinal
    return g


def _tanh_consts(like: torch.Tensor):
    """0-d tensors ``(-1, 2)``: ``tanh(a) = 2 σ(2a) - 1`` is then one ``addcmul``."""
    return like.new_tensor(-1.0), like.new_tensor(2.0)


def _one_minus_sq(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale (1 - x²)``."""
    return torch.addcmul(torch.full_like(x, scale), x, x, value=-scale)


def _dsigmoid(s: torch.Tensor) -> torch.Tensor:
    """``s (1 - s)`` for ``s = σ(a)``."""
    return torch.addcmul(s, s, s, value=-1)


def _states(x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """States buffer ``[T+1, H, B]`` holding ``h0ᵀ`` at index 0."""
    S = x.new_empty((x.shape[0] + 1, h0.shape[1], h0.shape[0]))
    S[0] = h0.mT
    return S


def _sum_tb(x: torch.Tensor) -> torch.Tensor:
    return x.sum((0, 2))


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
    """

    @staticmethod
    def forward(ctx, x, last, h0, delta, zeta, nu, *chain):
        xs = x.unbind(0)
        delta = delta.unsqueeze(-1).expand(x.shape[1:]).contiguous()
        neg_zeta, c1 = -zeta, zeta + nu
        neg1, two = _tanh_consts(x)
        S = _states(x, h0)
        Z, HT = torch.empty_like(x), torch.empty_like(x)
        Ss, Zs, HTs = S.unbind(0), Z.unbind(0), HT.unbind(0)
        uh = _Chain(chain, x.shape[0], x.shape[2], x)
        h = Ss[0]
        for t in range(x.shape[0]):
            pre = uh.pre(xs[t], h, t)
            torch.sigmoid(pre, out=Zs[t])
            ht = torch.addcmul(neg1, torch.add(delta, pre, alpha=2).sigmoid_(), two, out=HTs[t])
            # h_t = c1 h~ + z (h - ζ h~),  c1 = ζ + ν
            u = torch.addcmul(h, ht, neg_zeta)
            h = torch.addcmul(torch.mul(ht, c1), Zs[t], u, out=Ss[t + 1])
        ctx.save_for_backward(S, Z, HT, last, zeta, nu, *chain, *uh.Y)
        ctx.n_chain = len(chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        S, Z, HT, last, zeta, nu, *rest = ctx.saved_tensors
        steps = Z.shape[0]
        needs = ctx.needs_input_grad
        neg_zeta, c1 = -zeta, zeta + nu
        g, dh = _external_grads(dstates, dfinal, last, Z)
        DPRE = torch.empty_like(Z)
        DH = _DH(dh, steps)
        uh, dchain = _Chain(rest[:ctx.n_chain], steps, Z.shape[2], Z, rest[ctx.n_chain:]), [None] * ctx.n_chain
        sum_kz = sum_dp = dnu = dzeta = None
        for t0, t1 in _chunks(steps):
            hp, z, ht = S[t0:t1], Z[t0:t1], HT[t0:t1]
            kz = torch.addcmul(hp, ht, neg_zeta).mul_(_dsigmoid(z))
            k = torch.addcmul(c1, z, neg_zeta).mul_(_one_minus_sq(ht)).add_(kz)
            for j in range(t1 - t0 - 1, -1, -1):
                t = t0 + j
                dp = torch.mul(DH.cur[j], k[j], out=DPRE[t])
                back = uh.back(g[t - 1] if g is not None and t > 0 else None, dp, t)
                dh = torch.addcmul(back, DH.cur[j], z[j], out=DH.target(j, t0))
            dh_c, dp_c = DH.cur, DPRE[t0:t1]
            uh.grads(hp, dp_c, t0, t1, needs[6:], dchain)
            if needs[3]:
                sum_kz = _acc(sum_kz, _sum_tb(dh_c * kz))
                sum_dp = _acc(sum_dp, _sum_tb(dp_c))
            if needs[4] or needs[5]:
                dht = dh_c.mul_(ht)
                s_ht = dht.sum()
                dnu = _acc(dnu, s_ht)
                dzeta = _acc(dzeta, s_ht - dht.mul_(z).sum())
            DH.advance(t0)
        ddelta = 0.5 * (sum_dp - sum_kz) if needs[3] else None
        return (DPRE if needs[0] else None, None, dh.mT if needs[2] else None, ddelta,
                dzeta if needs[4] else None, dnu if needs[5] else None, *dchain)


def _acc(total, part):
    return part if total is None else total + part


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
        neg1, two = _tanh_consts(x)
        xs = x.unbind(0)
        uh = _Chain(chain, x.shape[0], x.shape[2], x)
        S = _states(x, h0)
        HT = torch.empty_like(x)
        Ss, HTs = S.unbind(0), HT.unbind(0)
        h = Ss[0]
        for t in range(x.shape[0]):
            ht = torch.addcmul(neg1, uh.pre(xs[t], h, t).sigmoid_(), two, out=HTs[t])
            h = torch.addcmul(torch.mul(h, beta), ht, alpha, out=Ss[t + 1])
        ctx.save_for_backward(S, HT, last, alpha, beta, *chain, *uh.Y)
        ctx.n_chain = len(chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        S, HT, last, alpha, beta, *rest = ctx.saved_tensors
        steps = HT.shape[0]
        needs = ctx.needs_input_grad
        g, dh = _external_grads(dstates, dfinal, last, HT)
        DPRE = torch.empty_like(HT)
        DH = _DH(dh, steps)
        uh, dchain = _Chain(rest[:ctx.n_chain], steps, HT.shape[2], HT, rest[ctx.n_chain:]), [None] * ctx.n_chain
        dalpha = dbeta = None
        half_alpha = alpha * 0.5
        for t0, t1 in _chunks(steps):
            hp, ht = S[t0:t1], HT[t0:t1]
            k = _one_minus_sq(ht).mul_(half_alpha)
            for j in range(t1 - t0 - 1, -1, -1):
                t = t0 + j
                dp = torch.mul(DH.cur[j], k[j], out=DPRE[t])
                back = uh.back(g[t - 1] if g is not None and t > 0 else None, dp, t)
                dh = torch.addcmul(back, DH.cur[j], beta, out=DH.target(j, t0))
            uh.grads(hp, DPRE[t0:t1], t0, t1, needs[5:], dchain)
            if needs[3]:
                dalpha = _acc(dalpha, (DH.cur * ht).sum())
            if needs[4]:
                dbeta = _acc(dbeta, (DH.cur * hp).sum())
            DH.advance(t0)
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
        neg1, two = _tanh_consts(x)
        xrz, xn = x[:, :h2].unbind(0), x[:, h2:].unbind(0)
        bias_n = bias_n.unsqueeze(-1).expand(hidden, x.shape[2]).contiguous()
        S = _states(x, h0)
        RZ = x.new_empty((x.shape[0], h2, x.shape[2]))  # r, z
        HN, N = torch.empty_like(S[1:]), torch.empty_like(S[1:])
        Ss, RZs, HNs, Ns = S.unbind(0), RZ.unbind(0), HN.unbind(0), N.unbind(0)
        Rs, Zs = RZ[:, :hidden].unbind(0), RZ[:, hidden:].unbind(0)
        uh = _Chain(chain, x.shape[0], x.shape[2], x)
        last_rz, last_n = chain[-1][:, :h2].mT, chain[-1][:, h2:].mT
        h = Ss[0]
        for t in range(x.shape[0]):
            y = uh.inner(h, t)
            torch.addmm(xrz[t], last_rz, y, out=RZs[t]).sigmoid_()
            hn = torch.addmm(bias_n, last_n, y, out=HNs[t])
            n = torch.addcmul(neg1, torch.addcmul(xn[t], Rs[t], hn).sigmoid_(), two, out=Ns[t])
            h = torch.addcmul(n, Zs[t], torch.sub(h, n), out=Ss[t + 1])
        ctx.save_for_backward(S, RZ, HN, N, last, *chain, *uh.Y)
        ctx.n_chain = len(chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dfinal):
        S, RZ, HN, N, last, *rest = ctx.saved_tensors
        steps, hidden, batch = N.shape
        needs = ctx.needs_input_grad
        g, dh = _external_grads(dstates, dfinal, last, N)
        DHG = N.new_empty(steps, 3, hidden, batch)  # d(h_r, h_z, h'_n), then d x'
        DHG2 = DHG.view(steps, 3 * hidden, batch)
        DH = _DH(dh, steps)
        uh, dchain = _Chain(rest[:ctx.n_chain], steps, batch, N, rest[ctx.n_chain:]), [None] * ctx.n_chain
        dbias_n = None
        for t0, t1 in _chunks(steps):
            hp, r, z, n = S[t0:t1], RZ[t0:t1, :hidden], RZ[t0:t1, hidden:], N[t0:t1]
            kn = torch.mul(z, -0.5).add_(0.5).mul_(_one_minus_sq(n))
            K = n.new_empty(t1 - t0, 3, hidden, batch)
            torch.mul(kn, HN[t0:t1], out=K[:, 0]).mul_(_dsigmoid(r))
            torch.sub(hp, n, out=K[:, 1]).mul_(_dsigmoid(z))
            torch.mul(kn, r, out=K[:, 2])
            for j in range(t1 - t0 - 1, -1, -1):
                t = t0 + j
                torch.mul(DH.cur[j], K[j], out=DHG[t])
                back = uh.back(g[t - 1] if g is not None and t > 0 else None, DHG2[t], t)
                dh = torch.addcmul(back, DH.cur[j], z[j], out=DH.target(j, t0))
            uh.grads(hp, DHG2[t0:t1], t0, t1, needs[4:], dchain)
            if needs[3]:
                dbias_n = _acc(dbias_n, _sum_tb(DHG[t0:t1, 2]))
            # d x' differs from d(h_r, h_z, h'_n) only in the n rows: dh K^n without r
            torch.mul(DH.cur, kn, out=DHG[t0:t1, 2])
            DH.advance(t0)
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
        hidden = h0.shape[1]
        neg1, two = _tanh_consts(x)
        xs = x.unbind(0)
        uh = _Chain(chain, x.shape[0], x.shape[2], x)
        S, C = _states(x, h0), _states(x, c0)
        SG = torch.empty_like(x)           # σ(i), σ(f), tanh(g), σ(o)
        TC = torch.empty_like(S[1:])       # tanh(c_t)
        Ss, Cs, SGs, TCs = S.unbind(0), C.unbind(0), SG.unbind(0), TC.unbind(0)
        Is, Fs, Gs, Os = (SG[:, j * hidden:(j + 1) * hidden].unbind(0) for j in range(4))
        h, c = Ss[0], Cs[0]
        for t in range(x.shape[0]):
            torch.sigmoid(uh.pre(xs[t], h, t), out=SGs[t])
            torch.addcmul(neg1, Gs[t], two, out=Gs[t])
            c = torch.addcmul(torch.mul(Fs[t], c), Is[t], Gs[t], out=Cs[t + 1])
            tc = torch.addcmul(neg1, torch.add(c, c).sigmoid_(), two, out=TCs[t])
            h = torch.mul(Os[t], tc, out=Ss[t + 1])
        ctx.save_for_backward(S, C, SG, TC, last, *chain, *uh.Y)
        ctx.n_chain = len(chain)
        ctx.set_materialize_grads(False)
        return S[1:], _final(S, last), _final(C, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates, dh_final, dc_final):
        S, C, SG, TC, last, *rest = ctx.saved_tensors
        steps, hidden, batch = TC.shape
        needs = ctx.needs_input_grad
        g, dh = _external_grads(dstates, dh_final, last, TC)
        if last is None:
            dc_in = None
            dc = dc_final.mT if dc_final is not None else torch.zeros_like(TC[0])
        else:
            dc_in = _scatter_final(dc_final, last, TC)
            dc = dc_in[-1]
        DG = TC.new_empty(steps, 4, hidden, batch)
        DG2 = DG.view(steps, 4 * hidden, batch)
        DH = _DH(dh, steps)
        DC = TC.new_empty(min(CHUNK, steps), hidden, batch)
        uh, dchain = _Chain(rest[:ctx.n_chain], steps, batch, TC, rest[ctx.n_chain:]), [None] * ctx.n_chain
        for t0, t1 in _chunks(steps):
            i, f, gg, o = (SG[t0:t1, j * hidden:(j + 1) * hidden] for j in range(4))
            tc = TC[t0:t1]
            # dc gets dh σ(o)(1 - tanh² c); gate factors K = (i, f, g, o) blocks
            A = _one_minus_sq(tc).mul_(o)
            K = tc.new_empty(t1 - t0, 4, hidden, batch)
            torch.mul(gg, _dsigmoid(i), out=K[:, 0])
            torch.mul(C[t0:t1], _dsigmoid(f), out=K[:, 1])
            torch.mul(i, _one_minus_sq(gg, 0.5), out=K[:, 2])
            torch.mul(tc, _dsigmoid(o), out=K[:, 3])
            for j in range(t1 - t0 - 1, -1, -1):
                t = t0 + j
                torch.addcmul(dc, DH.cur[j], A[j], out=DC[j])
                torch.mul(DC[j], K[j, :3], out=DG[t, :3])
                torch.mul(DH.cur[j], K[j, 3], out=DG[t, 3])
                if dc_in is None or t == 0:
                    dc = torch.mul(DC[j], f[j])
                else:
                    dc = torch.addcmul(dc_in[t - 1], DC[j], f[j])
                dh = uh.back(g[t - 1] if g is not None and t > 0 else None, DG2[t], t, out=DH.target(j, t0))
            uh.grads(S[t0:t1], DG2[t0:t1], t0, t1, needs[4:], dchain)
            DH.advance(t0)
        return (DG2 if needs[0] else None, None, dh.mT if needs[2] else None, dc.mT if needs[3] else None,
                *dchain)


# ---------------------------------------------------------------------------------------
# dispatch: per cell, the projection (autograd) and the kernel's arguments
# ---------------------------------------------------------------------------------------
def _fastgrnn(cell: FastGRNNCell, x, h0, last):
    xin = project(cell.W, x, cell.bias_z)
    return FastGRNNScan.apply(xin, last, h0, 2 * (cell.bias_h - cell.bias_z), torch.sigmoid(cell.zeta),
                              torch.sigmoid(cell.nu), *cell.U.chain())


def _fastrnn(cell: FastRNNCell, x, h0, last):
    two = cell.bias.new_full((cell.hidden_size,), 2.0)
    xin = project(cell.W, x, cell.bias, two)
    return FastRNNScan.apply(xin, last, h0, torch.sigmoid(cell.alpha), torch.sigmoid(cell.beta),
                             *_scale_cols(cell.U.chain(), two))


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
    return GRUScan.apply(xin, last, h0, 2 * cell.bias_hh[2 * h:], *_scale_cols(cell.U.chain(), scale))


def _lstm(cell: LSTMCell, x, state, last):
    scale = _gate_scale(cell, 2)
    xin = project(cell.W, x, cell.bias_ih + cell.bias_hh, scale)
    states, h_n, c_n = LSTMScan.apply(xin, last, state[0], state[1], *_scale_cols(cell.U.chain(), scale))
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
