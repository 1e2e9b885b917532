"""Building blocks of the fused kernels (:mod:`str_rnn.fused`).

* the feature-major input projection :func:`project` (a batched matmul with its own
  backward, no ``[T, out, in]`` intermediate);
* :func:`chain`: a matrix's factors, or their product where the factors would not be
  cheaper (a cost model measured on the benchmark CPU);
* :class:`Chain`: the recurrent matrix as a chain of factors, one step forward or back,
  with the intermediate products kept for the factor gradients; :func:`save` /
  :func:`restore` hand it from a kernel's forward to its backward;
* the chunked backward pass: :func:`chunks`, :class:`RunningGrad` (the running ``dh``),
  :func:`external_grads` (gradients arriving from outputs and the final state);
* :func:`compiled`: the compiled per-step kernels (:mod:`str_rnn.fused_kernels`, numba)
  where they apply;
* small element-wise helpers.

Layout: a step is ``[features, batch]``, a sequence ``[T, features, batch]``.
"""
from __future__ import annotations


import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from . import jit
from .lowrank import Matrix

CHUNK = 16
"""Time steps per chunk of the backward pass."""

USE_COMPILED = True
"""Run the compiled element-wise steps of :mod:`str_rnn.fused_kernels` where they apply
(CPU, float32 or float64, numba importable); False runs the torch code everywhere."""


def compiled(like: torch.Tensor):
    """:mod:`str_rnn.fused_kernels` for tensors like ``like``, or None where it does not
    apply (not on the CPU, not float32/float64, numba missing, :data:`USE_COMPILED` off)."""
    if not USE_COMPILED or like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return None
    return jit.load("fused_kernels")


# ---------------------------------------------------------------------------------------
# feature-major batched linear map (the input projection)
# ---------------------------------------------------------------------------------------
_BMM_OUTER_MAX = 40_000
"""Largest ``m·n`` for which :func:`outer_sum` batches a chunk's products in one ``bmm``."""


def outer_sum(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``acc + Σ_t a[t] b[t]ᵀ`` for ``a [T, m, B]``, ``b [T, n, B]``.

    No copy into a ``[m, T·B]`` layout: for small ``m·n`` one ``bmm`` per chunk of
    :data:`CHUNK` steps and a sum (fewer calls), otherwise one accumulating matmul a step
    (no ``[CHUNK, m, n]`` intermediate).
    """
    steps, m, n = a.shape[0], a.shape[1], b.shape[1]
    if m * n <= _BMM_OUTER_MAX:
        for t0 in range(0, steps, CHUNK):
            part = torch.bmm(a[t0:t0 + CHUNK], b[t0:t0 + CHUNK].mT).sum(0)
            acc = part if acc is None else acc.add_(part)
        return acc
    start = 0
    if acc is None:
        acc = torch.mm(a[0], b[0].mT)
        start = 1
    for t in range(start, steps):
        acc.addmm_(a[t], b[t].mT)
    return acc


def bmm(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x[t]`` for every ``t`` as one ``bmm`` (``torch.matmul`` would fold the batch into
    the rows and copy the transposed result back)."""
    return torch.bmm(m.expand(x.shape[0], -1, -1), x)


class _BatchedLinear(Function):
    """``y[t] = weight @ x[t] + bias`` for ``x [T, in, B]`` -> ``[T, out, B]``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        w = weight.expand(x.shape[0], -1, -1)
        y = torch.bmm(w, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), w, x)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx = bmm(weight.mT, dy) if needs[0] else None
        dw = outer_sum(dy, x) if needs[1] else None
        db = dy.sum((0, 2)) if ctx.has_bias and needs[2] else None
        return dx, dw, db


RECURRENT_FACTORED_MAX = 0.6
"""Keep the recurrent matrix factored while its multiply-adds stay below this share of the
dense matrix's. Measured on the benchmark CPU (hidden 100, batch 100): at rank 24 (share
0.48) a training step is 12-19 % faster factored than dense; at rank 40 (share 0.8) the
step's two small matmuls cost as much as the one dense matmul with one thread and more
with two (the dense product parallelises, the thin ones do not), so it runs dense."""

INPUT_FACTORED_MAX = 0.35
"""The same for the input projection, whose factors have a short inner dimension
(rank x 32 inputs), where matmuls run far below peak: rank 12 and rank 9 of 32 (shares
0.50 and 0.37) were 2-4 % slower factored than dense."""


def chain(matrix: Matrix, max_cost: float = RECURRENT_FACTORED_MAX) -> list[torch.Tensor]:
    """``matrix.chain(max_cost)``: factors only where they cost under ``max_cost`` times the
    dense matrix's multiply-adds (the thresholds above); the dense product is taken by
    autograd, so gradients still reach the factors."""
    return matrix.chain(max_cost)


def project(matrix: Matrix, x: torch.Tensor, bias: torch.Tensor | None = None,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """``scale ⊙ (M x_t + bias)`` for every step of a feature-major ``x [T, in, B]`` -> ``[T, out, B]``.

    The same product as ``matrix(x_t)`` (through :meth:`Matrix.chain`), written in the
    feature-major layout directly; ``scale`` (per output row) is folded into the last
    factor and the bias.
    """
    factors = chain(matrix, INPUT_FACTORED_MAX)
    last = factors[-1].mT
    if scale is not None:
        last = last * scale.unsqueeze(-1)
        bias = bias * scale if bias is not None else None
    for c in factors[:-1]:
        x = _BatchedLinear.apply(x, c.mT, None)
    return _BatchedLinear.apply(x, last, bias)


# ---------------------------------------------------------------------------------------
# shared pieces of the scans (feature-major: a step is [features, batch])
# ---------------------------------------------------------------------------------------
class Chain:
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

    def apply(self, h: torch.Tensor, t: int, out: torch.Tensor) -> torch.Tensor:
        """``out = L_n ⋯ L_1 h`` (no input term: no copy of it into ``out`` first)."""
        return torch.mm(self.left[-1], self.inner(h, t), out=out)

    def pre(self, x_t: torch.Tensor, h: torch.Tensor, t: int, out=None) -> torch.Tensor:
        """``x_t + L_n ⋯ L_1 h``."""
        y = self.inner(h, t)
        return torch.addmm(x_t, self.left[-1], y) if out is None else torch.addmm(x_t, self.left[-1], y, out=out)

    def pre_(self, x_t: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        """``x_t += L_n ⋯ L_1 h`` in place."""
        return x_t.addmm_(self.left[-1], self.inner(h, t))

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
                acc[i] = outer_sum(ins[i], outs[i], acc[i])


def save(ctx, tensors, chain, uh: Chain, dirty: torch.Tensor | None = None) -> None:
    """End of a kernel's forward: save ``tensors``, the chain and its stored products."""
    if dirty is not None:
        ctx.mark_dirty(dirty)
    ctx.save_for_backward(*tensors, *chain, *uh.Y)
    ctx.n_chain = len(chain)
    ctx.set_materialize_grads(False)


def restore(ctx, count: int):
    """Start of a kernel's backward: ``(the first count saved tensors, Chain, chain grads)``;
    the first saved tensor is the states buffer ``[T+1, H, B]``."""
    saved = ctx.saved_tensors
    head, rest, n = saved[:count], saved[count:], ctx.n_chain
    states = head[0]
    return head, Chain(rest[:n], states.shape[0] - 1, states.shape[2], states, rest[n:]), [None] * n


def scale_cols(chain, scale: torch.Tensor):
    """The chain with the output columns of its last factor multiplied by ``scale``."""
    return [*chain[:-1], chain[-1] * scale]


def chunks(steps: int):
    """``(t0, t1)`` chunks of at most :data:`CHUNK` steps, from the end of the sequence."""
    t1 = steps
    while t1 > 0:
        t0 = max(0, t1 - CHUNK)
        yield t0, t1
        t1 = t0


class RunningGrad:
    """The running ``dh`` of the backward loop, written in place chunk by chunk.

    Two ``[CHUNK, H, B]`` buffers alternate, so the step at the start of a chunk writes
    ``dh_{t0-1}`` straight into the next chunk's last slot while the finished chunk's
    ``dh`` stay readable for its parameter gradients. Rows are unbound once: indexing a
    tensor costs about a microsecond, which a loop over steps feels.
    """

    def __init__(self, dh_last: torch.Tensor, steps: int):
        n = min(CHUNK, steps)
        self.bufs = [dh_last.new_empty((n,) + dh_last.shape) for _ in range(2)]
        self.rows = [b.unbind(0) for b in self.bufs]
        self.bufs[0][n - 1] = dh_last
        self.k = 0

    def chunk(self, t0: int, t1: int):
        """For the chunk ``t0 .. t1-1`` (chunks taken from the end): ``(dh [L, H, B], rows,
        outs)``: ``rows[j]`` holds ``dh_{t0+j}``, and step ``t0 + j`` writes ``dh_{t0+j-1}``
        to ``outs[j]`` (None at ``t = 0``: a new tensor)."""
        n = t1 - t0
        rows = self.rows[self.k][:n]
        nxt = None if t0 == 0 else self.rows[1 - self.k][min(CHUNK, t0) - 1]
        cur = self.bufs[self.k][:n]
        self.k = 1 - self.k
        return cur, rows, (nxt,) + rows[:n - 1]


def rows(x, steps: int):
    """``x.unbind(0)``, or ``steps`` Nones for a missing ``x``."""
    return x.unbind(0) if x is not None else (None,) * steps


def final_state(buf: torch.Tensor, last) -> torch.Tensor:
    """The state after each sequence's last step, ``[B, H]`` (a copy); ``buf`` is ``[T+1, H, B]``."""
    if last is None:
        return buf[-1].mT.contiguous()
    return buf[last + 1, :, torch.arange(buf.shape[2], device=buf.device)]


def external_grads(dstates, dfinal, last, like: torch.Tensor):
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


def scatter_final(dfinal, last, like: torch.Tensor) -> torch.Tensor:
    """``[T, H, B]`` zeros with ``dfinal[b]`` at step ``last[b]`` (the LSTM's ``dc_n``)."""
    g = torch.zeros_like(like)
    if dfinal is not None:
        g.permute(0, 2, 1)[last, torch.arange(g.shape[2], device=g.device)] = dfinal
    return g


def tanh_consts(like: torch.Tensor):
    """0-d tensors ``(-1, 2)``: ``tanh(a) = 2 σ(2a) - 1`` is then one ``addcmul``."""
    return like.new_tensor(-1.0), like.new_tensor(2.0)


def one_minus_sq(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale (1 - x²)`` (one pass: the constant enters as a 0-d tensor)."""
    return torch.addcmul(x.new_tensor(scale), x, x, value=-scale)


def dsigmoid(s: torch.Tensor) -> torch.Tensor:
    """``s (1 - s)`` for ``s = σ(a)``."""
    return torch.addcmul(s, s, s, value=-1)


def states_buffer(x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """States buffer ``[T+1, H, B]`` holding ``h0ᵀ`` at index 0."""
    S = x.new_empty((x.shape[0] + 1, h0.shape[1], h0.shape[0]))
    S[0] = h0.mT
    return S


def sum_tb(x: torch.Tensor) -> torch.Tensor:
    return x.sum((0, 2))


def add_or_set(total, part):
    """``total + part`` where ``total`` may still be None."""
    return part if total is None else total + part
