r"""Streaming inference: :meth:`str_rnn.rnn.RNN.step` without autograd on small CPU batches.

One step of a small model is a handful of 100-element operations; the time goes into
Python: fetching parameters through ``nn.Module`` attributes, building chains,
converting tensors. A :class:`StreamPlan` does that once and keeps NumPy **views** of the
parameters (``Tensor.numpy()`` shares memory), so a step is only the arithmetic
(about 15 NumPy calls a layer) and the plan follows every in-place change of the weights
(optimizer steps, ``load_state_dict``, ``p.data.copy_``) by construction.

A plan is reused only while it is exact by construction:

* every recurrent/input matrix's :meth:`~str_rnn.lowrank.Matrix.chain` consists of
  parameters or views of parameters (``Dense``, ``FixedRank``: a compacted model, see
  :func:`str_rnn.compact`), and the parameters have the input's dtype;
* the parameters are the same tensors in the same memory (checked at every call:
  replacing a parameter, ``p.data = ...``, ``.to()``/``.double()`` all rebuild the plan).

Otherwise (learned-rank or sparse matrices, whose chains are computed from several
parameters) the plan is rebuilt at every call: still correct, only slower.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .cells import FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell


_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def key(module: torch.nn.Module) -> tuple:
    """Where ``module``'s parameters live: ``(data_ptr, shape, stride)`` of each, in order.

    Walks the ``_modules`` / ``_parameters`` dicts directly (what ``parameters()`` does,
    without its generator machinery: this runs at every streaming step).
    """
    out, todo = [], [module]
    while todo:
        m = todo.pop()
        for p in m._parameters.values():
            if p is not None:
                out.append((p.data_ptr(), p.shape, p.stride()))
        todo.extend(m._modules.values())
    return tuple(out)


def supports(rnn) -> bool:
    """Whether every layer of ``rnn`` has a streaming kernel here."""
    return all(type(c) in _KINDS for c in rnn.layers)


def _is_view_of_parameter(t: torch.Tensor, params: list[torch.Tensor]) -> bool:
    base = t if t._base is None else t._base
    return any(base is p for p in params)


def _sigmoid_(a: np.ndarray) -> np.ndarray:
    """In place ``σ(a) = ½ tanh(a / 2) + ½``."""
    a *= 0.5
    np.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


def _apply(x: np.ndarray, chain: list[np.ndarray]) -> np.ndarray:
    for c in chain:
        x = x @ c
    return x


def _squash(raw: np.ndarray) -> float:
    """``sigmoid`` of a 0-d parameter view."""
    return 1.0 / (1.0 + math.exp(-float(raw)))


# the element-wise parameters each kernel reads
_KINDS = {FastGRNNCell: ("bias_z", "bias_h", "zeta", "nu"), FastRNNCell: ("bias", "alpha", "beta"),
          GRUCell: ("bias_ih", "bias_hh"), LSTMCell: ("bias_ih", "bias_hh")}


class _Layer:
    """One cell's arrays: ``w`` and ``u`` chains and the element-wise parameters."""

    def __init__(self, cell: RNNCell, dtype: torch.dtype):
        np_dtype = _NUMPY[dtype]
        self.kind = type(cell)
        self.hidden = cell.hidden_size
        params = list(cell.parameters())
        chains = (cell.W.chain(), cell.U.chain())
        extra = [getattr(cell, n) for n in _KINDS[self.kind]]
        # views (not copies) only when every array is a parameter or a view of one
        self.live = all(_is_view_of_parameter(c, params) for chain in chains for c in chain) and \
            all(t.dtype == dtype for t in (*chains[0], *chains[1], *extra))
        self.w, self.u = ([c.detach().numpy().astype(np_dtype, copy=False) for c in chain] for chain in chains)
        self.extra = [t.detach().numpy().astype(np_dtype, copy=False) for t in extra]

    def step(self, x: np.ndarray, h: np.ndarray, out: np.ndarray, c=None, c_out=None) -> None:
        """Write the new ``h`` (and ``c``) of one step into ``out`` (``c_out``)."""
        wx = _apply(x, self.w)
        uh = _apply(h, self.u)
        if self.kind is FastGRNNCell:
            bias_z, bias_h, zeta, nu = self.extra
            zeta, nu = _squash(zeta), _squash(nu)
            uh += wx
            z = _sigmoid_(np.add(uh, bias_z))
            uh += bias_h
            ht = np.tanh(uh, out=uh)
            # h_t = z (h - ζ h~) + (ζ + ν) h~
            np.multiply(ht, -zeta, out=out)
            out += h
            out *= z
            ht *= zeta + nu
            out += ht
        elif self.kind is FastRNNCell:
            bias, alpha, beta = self.extra
            uh += wx
            uh += bias
            np.tanh(uh, out=uh)
            uh *= _squash(alpha)
            np.multiply(h, _squash(beta), out=out)
            out += uh
        elif self.kind is GRUCell:
            b_ih, b_hh = self.extra
            n2 = 2 * self.hidden
            wx += b_ih
            uh += b_hh
            rz = _sigmoid_(np.add(wx[:, :n2], uh[:, :n2]))
            r, z = rz[:, :self.hidden], rz[:, self.hidden:]
            n = np.multiply(r, uh[:, n2:])
            n += wx[:, n2:]
            np.tanh(n, out=n)
            np.subtract(h, n, out=out)
            out *= z
            out += n
        else:  # LSTM
            b_ih, b_hh = self.extra
            hid = self.hidden
            uh += wx
            uh += b_ih
            uh += b_hh
            _sigmoid_(uh[:, :2 * hid])
            _sigmoid_(uh[:, 3 * hid:])
            g = np.tanh(uh[:, 2 * hid:3 * hid])
            np.multiply(uh[:, hid:2 * hid], c, out=c_out)
            g *= uh[:, :hid]
            c_out += g
            np.tanh(c_out, out=out)
            out *= uh[:, 3 * hid:]


class StreamPlan:
    """Everything :meth:`RNN.step` needs, prepared once for a model and an input dtype.

    Args:
        rnn: the :class:`~str_rnn.rnn.RNN` (every layer a FastGRNN, FastRNN, GRU or LSTM cell).
        dtype: ``torch.float32`` or ``torch.float64`` (the input's).
    """

    def __init__(self, rnn, dtype: torch.dtype):
        self.dtype = dtype
        self.key = key(rnn)
        self.layers = [_Layer(cell, dtype) for cell in rnn.layers]
        self.reusable = all(layer.live for layer in self.layers)
        self.has_cell_state = rnn.has_cell_state

    def valid_for(self, rnn, dtype: torch.dtype) -> bool:
        """Whether this plan may serve ``rnn`` now (see the module notes)."""
        return self.reusable and dtype == self.dtype and key(rnn) == self.key

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, states):
        """One step of every layer: ``x_t [B, F]``, per-layer states -> ``(h_top, state)``."""
        x = x_t.detach().numpy()
        first = states[0][0] if self.has_cell_state else states[0]
        shape = (len(self.layers),) + tuple(first.shape)
        h_new = np.empty(shape, x.dtype)
        c_new = np.empty(shape, x.dtype) if self.has_cell_state else None
        for i, (layer, s) in enumerate(zip(self.layers, states)):
            if self.has_cell_state:
                layer.step(x, s[0].detach().numpy(), h_new[i], s[1].detach().numpy(), c_new[i])
            else:
                layer.step(x, s.detach().numpy(), h_new[i])
            x = h_new[i]
        h = torch.from_numpy(h_new)
        if self.has_cell_state:
            return h[-1], (h, torch.from_numpy(c_new))
        return h[-1], h
