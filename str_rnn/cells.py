"""Recurrent cells whose input matrix ``W`` and recurrent matrix ``U`` are parameterised.

All cells are batch-first: ``x_t`` is ``[B, input_size]``, ``h`` is ``[B, hidden_size]``.
``W`` maps ``input_size -> G * hidden_size`` and ``U`` maps ``hidden_size -> G * hidden_size``
with the ``G`` gates stacked (``G = 1`` for FastGRNN/FastRNN, 4 for LSTM, 3 for GRU, in
torch's gate order). Each matrix is a :class:`~str_rnn.lowrank.Matrix` chosen with
``matrix="str" | "fixed" | "dense" | "sparse"`` (``rank_w``/``rank_u`` give fixed ranks or
caps for ``str``), or passed in ready-made as ``W=`` / ``U=``.

A cell splits its step in two so that a sequence layer can batch the input projection:
``forward(x_t, state) = recurrence(W(x_t), state, U.chain())``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .lowrank import Matrix, make_matrix


def _apply_chain(h: torch.Tensor, chain: list[torch.Tensor]) -> torch.Tensor:
    for c in chain:
        h = h @ c
    return h


class RNNCell(nn.Module):
    """Base class of the cells: builds ``W`` and ``U``, validates inputs, runs steps."""

    n_gates = 1
    has_cell_state = False

    def __init__(self, input_size: int, hidden_size: int, *, matrix: str = "str", rank_w: int | None = None,
                 rank_u: int | None = None, W: Matrix | None = None, U: Matrix | None = None,
                 **matrix_kwargs):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        self.input_size = input_size
        self.hidden_size = hidden_size
        gh = self.n_gates * hidden_size
        self.W = W if W is not None else make_matrix(
            matrix, input_size, gh, rank=rank_w, weight=self.initial_weight(gh, input_size), **matrix_kwargs)
        self.U = U if U is not None else make_matrix(
            matrix, hidden_size, gh, rank=rank_u, weight=self.initial_weight(gh, hidden_size), **matrix_kwargs)
        for name, m, shape in (("W", self.W, (gh, input_size)), ("U", self.U, (gh, hidden_size))):
            if not isinstance(m, Matrix):
                raise TypeError(f"{name}: expected a str_rnn Matrix module, got {type(m).__name__}")
            if (m.out_features, m.in_features) != shape:
                raise ValueError(f"{name} has shape ({m.out_features}, {m.in_features}); expected {shape}")

    def initial_weight(self, out_features: int, in_features: int) -> torch.Tensor:
        """Dense initialisation of ``W``/``U`` (torch's ``U(-1/sqrt(h), 1/sqrt(h))``)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        return (torch.rand(out_features, in_features) * 2 - 1) * bound

    def init_state(self, batch: int, *, device=None, dtype=torch.float32):
        h = torch.zeros(batch, self.hidden_size, device=device, dtype=dtype)
        return (h, h.clone()) if self.has_cell_state else h

    def check_state(self, state, batch: int):
        parts = state if self.has_cell_state else (state,)
        if self.has_cell_state and not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise ValueError(f"{type(self).__name__} state: expected a tuple (h, c)")
        for p in parts:
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != (batch, self.hidden_size):
                raise ValueError(f"{type(self).__name__} state has shape {tuple(getattr(p, 'shape', ()))}; "
                                 f"expected (batch, hidden_size) = ({batch}, {self.hidden_size})")

    def forward(self, x_t: torch.Tensor, state=None):
        """One step: ``x_t [B, input_size]``, ``state`` (``h`` or ``(h, c)``) -> new state."""
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
            raise TypeError(f"x_t: expected a floating-point tensor, got {getattr(x_t, 'dtype', type(x_t))}")
        if x_t.dim() != 2 or x_t.shape[1] != self.input_size:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (batch, input_size={self.input_size})")
        if state is None:
            state = self.init_state(x_t.shape[0], device=x_t.device, dtype=x_t.dtype)
        self.check_state(state, x_t.shape[0])
        return self.recurrence(self.W(x_t), state, self.U.chain())

    def recurrence(self, wx_t: torch.Tensor, state, u_chain: list[torch.Tensor]):
        """The cell's equations given ``wx_t = W x_t`` and ``U`` as a matmul chain."""
        raise NotImplementedError

    @staticmethod
    def output(state) -> torch.Tensor:
        """The hidden state ``h`` of a state."""
        return state[0] if isinstance(state, tuple) else state

    def elementwise_flops(self) -> int:
        """Approximate non-matmul operations of one step (gates, nonlinearities)."""
        return 10 * self.n_gates * self.hidden_size

    def spec(self) -> dict:
        return {"type": type(self).__name__, "input_size": self.input_size, "hidden_size": self.hidden_size,
                "W": self.W.spec(), "U": self.U.spec()}


class FastGRNNCell(RNNCell):
    r"""FastGRNN (Kusupati et al., NeurIPS 2018).

    .. math::
        pre &= W x_t + U h_{t-1} \\
        z &= \sigma(pre + b_z), \quad \tilde h = \tanh(pre + b_h) \\
        h_t &= (\zeta (1 - z) + \nu) \odot \tilde h + z \odot h_{t-1}

    with ``ζ = sigmoid(zeta)``, ``ν = sigmoid(nu)`` (raw values initialised to 1 and -4),
    ``bias_z``, ``bias_h`` initialised to ones, and ``W``, ``U`` to ``0.1 * randn`` as in
    EdgeML's dense cell.
    """

    def __init__(self, input_size: int, hidden_size: int, **kwargs):
        super().__init__(input_size, hidden_size, **kwargs)
        self.bias_z = nn.Parameter(torch.ones(hidden_size))
        self.bias_h = nn.Parameter(torch.ones(hidden_size))
        self.zeta = nn.Parameter(torch.tensor(1.0))
        self.nu = nn.Parameter(torch.tensor(-4.0))

    def initial_weight(self, out_features, in_features):
        return 0.1 * torch.randn(out_features, in_features)

    def recurrence(self, wx_t, h, u_chain):
        pre = wx_t + _apply_chain(h, u_chain)
        z = torch.sigmoid(pre + self.bias_z)
        h_tilde = torch.tanh(pre + self.bias_h)
        return (torch.sigmoid(self.zeta) * (1 - z) + torch.sigmoid(self.nu)) * h_tilde + z * h


class FastRNNCell(RNNCell):
    r"""FastRNN (Kusupati et al., NeurIPS 2018).

    .. math::
        h_t = \sigma(\beta) h_{t-1} + \sigma(\alpha) \tanh(W x_t + U h_{t-1} + b)

    with raw ``alpha = -3``, ``beta = 3`` and ``bias`` initialised to ones (EdgeML).
    """

    def __init__(self, input_size: int, hidden_size: int, **kwargs):
        super().__init__(input_size, hidden_size, **kwargs)
        self.bias = nn.Parameter(torch.ones(hidden_size))
        self.alpha = nn.Parameter(torch.tensor(-3.0))
        self.beta = nn.Parameter(torch.tensor(3.0))

    def initial_weight(self, out_features, in_features):
        return 0.1 * torch.randn(out_features, in_features)

    def recurrence(self, wx_t, h, u_chain):
        h_tilde = torch.tanh(wx_t + _apply_chain(h, u_chain) + self.bias)
        return torch.sigmoid(self.beta) * h + torch.sigmoid(self.alpha) * h_tilde


class LSTMCell(RNNCell):
    r"""LSTM with torch's gate order ``(i, f, g, o)`` and bias layout.

    .. math::
        (i, f, g, o) &= W x_t + b_{ih} + U h_{t-1} + b_{hh} \\
        c_t &= \sigma(f) c_{t-1} + \sigma(i) \tanh(g), \quad h_t = \sigma(o) \tanh(c_t)

    State is ``(h, c)``. ``W`` is ``4h x input``, ``U`` is ``4h x h``.
    """

    n_gates = 4
    has_cell_state = True

    def __init__(self, input_size: int, hidden_size: int, **kwargs):
        super().__init__(input_size, hidden_size, **kwargs)
        bound = 1.0 / math.sqrt(hidden_size)
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-bound, bound))

    def recurrence(self, wx_t, state, u_chain):
        h, c = state
        gates = wx_t + self.bias_ih + _apply_chain(h, u_chain) + self.bias_hh
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class GRUCell(RNNCell):
    r"""GRU with torch's gate order ``(r, z, n)`` and bias layout.

    .. math::
        r &= \sigma(W_r x + b_{ir} + U_r h + b_{hr}), \quad z = \sigma(W_z x + b_{iz} + U_z h + b_{hz}) \\
        n &= \tanh(W_n x + b_{in} + r \odot (U_n h + b_{hn})), \quad h_t = (1 - z) \odot n + z \odot h_{t-1}

    ``W`` is ``3h x input``, ``U`` is ``3h x h``.
    """

    n_gates = 3

    def __init__(self, input_size: int, hidden_size: int, **kwargs):
        super().__init__(input_size, hidden_size, **kwargs)
        bound = 1.0 / math.sqrt(hidden_size)
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size).uniform_(-bound, bound))

    def recurrence(self, wx_t, h, u_chain):
        xr, xz, xn = (wx_t + self.bias_ih).chunk(3, dim=-1)
        hr, hz, hn = (_apply_chain(h, u_chain) + self.bias_hh).chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


CELLS = {"fastgrnn": FastGRNNCell, "fastrnn": FastRNNCell, "lstm": LSTMCell, "gru": GRUCell}


def cell_class(name: str) -> type[RNNCell]:
    """The cell class called ``name`` (``fastgrnn | fastrnn | lstm | gru``)."""
    try:
        return CELLS[name]
    except KeyError:
        raise ValueError(f"cell={name!r} is not a cell; expected one of {', '.join(CELLS)}") from None
