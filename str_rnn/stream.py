r"""Streaming inference: :meth:`str_rnn.rnn.RNN.step` without autograd on small CPU batches.

One step of a small model is a handful of 100-element operations; the time goes into
Python: fetching parameters through ``nn.Module`` attributes, building chains,
converting tensors. A :class:`StreamPlan` does that once and keeps NumPy **views** of the
parameters (``Tensor.numpy()`` shares memory), so a step is only the arithmetic (one
compiled call a layer, :mod:`str_rnn.kernels`; without numba about 15 NumPy calls) and
the plan follows every in-place change of the weights (optimizer steps,
``load_state_dict``, ``p.data.copy_``) by construction.

A plan is reused only while it is exact by construction:

* every recurrent/input matrix's :meth:`~str_rnn.lowrank.Matrix.chain` consists of
  parameters or views of parameters (``Dense``, ``FixedRank``: a compacted model, see
  :func:`str_rnn.compact`), and the parameters have the input's dtype; for the compiled
  step, every matrix is also C- or F-contiguous (read as ``M`` or ``Mᵀ``, see
  :mod:`str_rnn.kernels`) and every vector contiguous, as parameters normally are;
* the parameters are the same tensors in the same memory (checked at every call:
  replacing a parameter, ``p.data = ...``, ``.to()``/``.double()`` all rebuild the plan).

Otherwise (learned-rank or sparse matrices, whose chains are computed from several
parameters; strided parameters) the plan is rebuilt at every call: still correct, only
slower.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import infer as _infer
from .cells import FastGRNNCell, FastRNNCell, GRUCell, RNNCell


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
    return all(type(c) in _infer.PARAMS for c in rnn.layers)


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


class _Layer:
    """One cell's arrays: ``w`` and ``u`` chains and the element-wise parameters, and the
    compiled step (:mod:`str_rnn.kernels`) with its arguments where numba is installed."""

    def __init__(self, cell: RNNCell, dtype: torch.dtype):
        np_dtype = _NUMPY[dtype]
        self.kind = type(cell)
        self.hidden = cell.hidden_size
        params = list(cell.parameters())
        chains = (cell.W.chain(), cell.U.chain())
        extra = [getattr(cell, n) for n in _infer.PARAMS[self.kind]]
        # views (not copies) only when every array is a parameter or a view of one
        self.live = all(_is_view_of_parameter(c, params) for chain in chains for c in chain) and \
            all(t.dtype == dtype for t in (*chains[0], *chains[1], *extra))
        self.w, self.u = ([c.detach().numpy().astype(np_dtype, copy=False) for c in chain] for chain in chains)
        self.extra = [t.detach().numpy().astype(np_dtype, copy=False) for t in extra]
        self.kernel = _infer.kernel(cell, "step")
        if self.kernel is not None:
            # the kernels take C-contiguous arrays (a matrix as M or Mᵀ): any other
            # layout is copied, and a copy does not follow its parameter
            self.live = self.live and _infer.follows(self.w) and _infer.follows(self.u) \
                and all(a.flags.c_contiguous for a in self.extra)
            self.args = (*_infer.operands(self.w), *_infer.operands(self.u),
                         *_infer.vector_operands(self.extra))

    def step(self, x: np.ndarray, h: np.ndarray, out: np.ndarray, c=None, c_out=None) -> None:
        """Write the new ``h`` (and ``c``) of one step into ``out`` (``c_out``)."""
        if self.kernel is not None:
            if c is None:
                self.kernel(x, h, out, *self.args)
            else:
                self.kernel(x, h, c, out, c_out, *self.args)
            return
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
        self.hidden = rnn.hidden_size

    def valid_for(self, rnn, dtype: torch.dtype) -> bool:
        """Whether this plan may serve ``rnn`` now (see the module notes)."""
        return self.reusable and dtype == self.dtype and key(rnn) == self.key

    def step(self, x_t: torch.Tensor, state):
        """One step of every layer: ``x_t [B, F]`` and the state ``rnn.step`` takes
        (``None``, ``[L, B, H]`` or a pair of them) -> ``(h_top, new state)``; or ``None``
        where the state does not fit this plan (the caller's general path then reports or
        handles it)."""
        x = np.ascontiguousarray(_array(x_t))
        shape = (len(self.layers), x.shape[0], self.hidden)
        states = self._states(state, shape, x.dtype)
        if states is None:
            return None
        h, c = states
        h_new = np.empty(shape, x.dtype)
        c_new = None if c is None else np.empty(shape, x.dtype)
        for i, layer in enumerate(self.layers):
            if c is None:
                layer.step(x, h[i], h_new[i])
            else:
                layer.step(x, h[i], h_new[i], c[i], c_new[i])
            x = h_new[i]
        top = torch.from_numpy(x)
        if c is None:
            return top, torch.from_numpy(h_new)
        return top, (torch.from_numpy(h_new), torch.from_numpy(c_new))

    def _states(self, state, shape: tuple, dtype):
        """``(h, c)`` as C-contiguous ``[L, B, H]`` arrays (``c`` None but for an LSTM), or
        ``None`` where ``state`` is not float CPU tensors of that shape."""
        if state is None:
            return np.zeros(shape, dtype), (np.zeros(shape, dtype) if self.has_cell_state else None)
        if not self.has_cell_state:
            h = _state_array(state, shape, dtype)
            return None if h is None else (h, None)
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            return None
        h, c = (_state_array(t, shape, dtype) for t in state)
        return None if h is None or c is None else (h, c)


def _array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array (``detach`` only where needed: it costs)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _state_array(t, shape: tuple, dtype) -> np.ndarray | None:
    """``t`` as a C-contiguous ``dtype`` array of ``shape`` (itself where it is one), or
    ``None`` where it is not a float32/64 CPU tensor of that shape."""
    if not (isinstance(t, torch.Tensor) and t.is_cpu and t.dtype in _NUMPY):
        return None
    a = _array(t)
    if a.shape != shape:
        return None
    return a if a.dtype == dtype and a.flags.c_contiguous else np.ascontiguousarray(a, dtype)
