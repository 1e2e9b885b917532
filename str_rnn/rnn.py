"""Sequence layer: stacked cells run over time, with the interface of ``torch.nn.GRU``.

For each layer the input projection ``W x_t`` of *all* time steps is one matmul before the
time loop; only ``U h_{t-1}`` is sequential, and ``U`` is prepared once per call (its
active factors, or one dense matrix when that is cheaper, see
:meth:`str_rnn.lowrank.Matrix.chain`).

Two implementations of the time loop, with equal outputs and gradients:

* the **fused** path (default, ``RNN(..., fused=True)``): one autograd node per layer with
  a hand-written backward through time (:mod:`str_rnn.fused`, its per-step element-wise
  work compiled by numba where available); when no gradient is needed and the batch is
  small (CPU), compiled loops for whole sequences (:mod:`str_rnn.infer`,
  :mod:`str_rnn.kernels`) and a prepared plan for :meth:`RNN.step` (:mod:`str_rnn.stream`);
* the **reference** loop :func:`scan` (``fused=False``): plain autograd through every
  step, the definition the fused path is tested against.

The flag is per model (no global switch). Outputs of the fused path are views of
feature-major ``[T, H, B]`` buffers (non-contiguous, as ``torch.nn.GRU``'s batch-first
outputs are too); call ``.contiguous()`` before ``.view``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import fused as _fused
from . import infer as _infer
from . import native as _native
from . import stream as _stream
from .cells import CELLS, RNNCell, cell_class


def _check_lengths(lengths, batch: int, steps: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths).to("cpu", torch.int64)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths has shape {tuple(lengths.shape)}; expected (batch,) = ({batch},)")
    if batch and (lengths.min() < 1 or lengths.max() > steps):
        raise ValueError(f"lengths must lie in [1, {steps}] (the padded sequence length); "
                         f"got min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths


def scan(cell: RNNCell, wx: torch.Tensor, state, lengths: torch.Tensor | None = None):
    """Reference time loop of one layer (plain autograd through every step).

    Args:
        cell: the layer's cell.
        wx: ``W x_t`` for all steps, ``[B, T, G * hidden]``.
        state: initial state (``h`` or ``(h, c)``), ``[B, hidden]`` each.
        lengths: true lengths ``[B]`` (CPU int64) or ``None``; a sequence's state stops
            changing after its last real step and its outputs there are zero.

    Returns:
        ``(outputs [B, T, hidden], final state)``.
    """
    u_chain = cell.U.chain()
    steps = wx.shape[1]
    masks = None
    if lengths is not None and bool((lengths < steps).any()):
        t = torch.arange(steps).unsqueeze(1)
        masks = (t < lengths.unsqueeze(0)).to(wx.device).unsqueeze(-1)  # [T, B, 1]
    outputs = []
    for t in range(steps):
        new = cell.recurrence(wx[:, t], state, u_chain)
        if masks is not None:
            keep = masks[t]
            if isinstance(new, tuple):
                new = tuple(torch.where(keep, n, o) for n, o in zip(new, state))
            else:
                new = torch.where(keep, new, state)
            outputs.append(RNNCell.output(new) * keep)
        else:
            outputs.append(RNNCell.output(new))
        state = new
    return torch.stack(outputs, dim=1), state


class RNN(nn.Module):
    """Multi-layer recurrent network of FastGRNN / FastRNN / LSTM / GRU cells.

    Args:
        cell: ``"fastgrnn" | "fastrnn" | "lstm" | "gru"``.
        input_size: features per step.
        hidden_size: hidden units per layer.
        num_layers: stacked layers (layer ``l > 0`` reads layer ``l - 1``'s outputs).
        batch_first: input and output are ``[B, T, F]`` (default) or ``[T, B, F]``.
        fused: run the fused time loop (default) or, with ``False``, the reference loop
            :func:`scan` (plain autograd through every step; slower, same results).
        **cell_kwargs: passed to every cell: ``matrix``, ``rank_w``, ``rank_u``, ``init``,
            ``g``, ``s_init`` (see :class:`str_rnn.cells.RNNCell`).

    ``forward(x, state=None, lengths=None) -> (output, h_n)`` like ``torch.nn.GRU``;
    for LSTM ``h_n`` is ``(h_n, c_n)``; each is ``[num_layers, B, hidden]``. ``x`` may be a
    ``PackedSequence`` (then ``output`` is one too) or a padded tensor with ``lengths``.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, *, num_layers: int = 1,
                 batch_first: bool = True, fused: bool = True, **cell_kwargs):
        super().__init__()
        cls = cell_class(cell)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r}: expected a positive integer")
        cells = [cls(input_size if i == 0 else hidden_size, hidden_size, **cell_kwargs) for i in range(num_layers)]
        self._setup(cell, cells, batch_first, fused)

    def _setup(self, cell: str, cells: list[RNNCell], batch_first: bool, fused: bool):
        if not isinstance(fused, bool):
            raise ValueError(f"fused={fused!r}: expected True or False")
        self.fused = fused
        self.cell = cell
        self.layers = nn.ModuleList(cells)
        self.input_size = cells[0].input_size
        self.hidden_size = cells[0].hidden_size
        self.num_layers = len(cells)
        self.batch_first = batch_first
        self.has_cell_state = cells[0].has_cell_state

    @classmethod
    def from_cells(cls, cells: list[RNNCell], *, batch_first: bool = True, fused: bool = True) -> "RNN":
        """Stack ready-made cells (all of one type, sizes chained) into a sequence layer."""
        if not cells:
            raise ValueError("cells: expected at least one cell")
        names = {name for name, c in CELLS.items() if type(cells[0]) is c}
        if not names or any(type(c) is not type(cells[0]) for c in cells):
            raise ValueError("cells: expected cells of one str_rnn cell type")
        for i in range(1, len(cells)):
            if cells[i].input_size != cells[0].hidden_size or cells[i].hidden_size != cells[0].hidden_size:
                raise ValueError(f"cells[{i}] has sizes ({cells[i].input_size}, {cells[i].hidden_size}); "
                                 f"expected ({cells[0].hidden_size}, {cells[0].hidden_size})")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(names.pop(), list(cells), batch_first, fused)
        return self

    def _initial_states(self, state, batch: int, ref: torch.Tensor):
        if state is None:
            return [c.init_state(batch, device=ref.device, dtype=ref.dtype) for c in self.layers]
        expected = (self.num_layers, batch, self.hidden_size)
        parts = state if self.has_cell_state else (state,)
        if self.has_cell_state and not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise ValueError("state: expected a tuple (h_0, c_0) for an LSTM")
        for p in parts:
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != expected:
                raise ValueError(f"state has shape {tuple(getattr(p, 'shape', ()))}; "
                                 f"expected (num_layers, batch, hidden_size) = {expected}")
        if self.has_cell_state:
            return [(state[0][i], state[1][i]) for i in range(self.num_layers)]
        return [state[i] for i in range(self.num_layers)]

    def _stack_states(self, states):
        if self.has_cell_state:
            return torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])
        return torch.stack(states)

    def forward(self, x, state=None, lengths=None):
        packed = isinstance(x, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths: give either a PackedSequence or lengths, not both")
            x, lengths = pad_packed_sequence(x, batch_first=True)
        elif not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor or PackedSequence, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            layout = "(batch, steps, features)" if self.batch_first or packed else "(steps, batch, features)"
            raise ValueError(f"x has shape {tuple(x.shape)}; expected {layout} with features = "
                             f"input_size = {self.input_size}")
        if not packed and self.batch_first is False:
            x = x.transpose(0, 1)
        batch, steps = x.shape[0], x.shape[1]
        if lengths is not None:
            lengths = _check_lengths(lengths, batch, steps)
        states = self._initial_states(state, batch, x)
        if self._use_fused(batch, steps):
            x, finals = self._forward_fused(x, states, lengths)
        else:
            finals = []
            for cell, s in zip(self.layers, states):
                x, s = scan(cell, cell.W(x), s, lengths)
                finals.append(s)
        h_n = self._stack_states(finals)
        if packed:
            return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), h_n
        return (x if self.batch_first else x.transpose(0, 1)), h_n

    def _use_fused(self, batch: int, steps: int) -> bool:
        return self.fused and batch > 0 and steps > 0 and all(_fused.supports(c) for c in self.layers)

    def _forward_fused(self, x: torch.Tensor, states, lengths):
        """All layers over batch-first ``x [B, T, F]``; returns ``(outputs [B, T, H], finals)``.

        Sequences shorter than ``T`` run to the longest length only; their outputs past
        their own end are zero and their final state is read at their last step. An LSTM
        whose matrices are effectively dense runs torch's own fused kernel on whole CPU
        sequences (:mod:`str_rnn.native`); otherwise, with gradients, the layers run
        feature-major (``[T, F, B]``, :mod:`str_rnn.fused`), and without them small CPU
        batches take :mod:`str_rnn.infer` (time-major ``[T, B, F]``).
        """
        steps = x.shape[1]
        last = keep = None
        run = steps
        if lengths is not None and bool((lengths < steps).any()):
            run = int(lengths.max())
            last = (lengths - 1).to(x.device)
            keep = (torch.arange(run).unsqueeze(1) < lengths.unsqueeze(0)).to(device=x.device, dtype=x.dtype)
            x = x[:, :run]
        finals = []
        grad = _infer.needs_grad(self, x, states)
        native = _native.lstm(self, x, states, grad) if self.cell == "lstm" and last is None else None
        if native is not None:
            x, finals = native
        elif not grad and _infer.supports(self, x.shape[0], x):
            x = x.transpose(0, 1)  # [T, B, F]
            for cell, s in zip(self.layers, states):
                x, s = _infer.scan(cell, x, s, last)
                x = x * keep.unsqueeze(-1) if keep is not None else x
                finals.append(s)
            x = x.transpose(0, 1)
        else:
            x = x.permute(1, 2, 0)  # [T, F, B]
            for cell, s in zip(self.layers, states):
                x, s = _fused.fused_scan(cell, x, s, last)
                x = x * keep.unsqueeze(1) if keep is not None else x
                finals.append(s)
            x = x.permute(2, 0, 1)
        if run < steps:
            x = F.pad(x, (0, 0, 0, steps - run))
        return x, finals

    def step(self, x_t: torch.Tensor, state=None):
        """Streaming inference: advance every layer by one step.

        Without gradients on a small float CPU batch this runs a prepared plan
        (:class:`str_rnn.stream.StreamPlan`: compiled or NumPy steps, kept on the model and
        rebuilt whenever its parameters move or are replaced); otherwise every cell steps
        with autograd.

        Args:
            x_t: ``[B, input_size]``.
            state: ``None`` or the state returned by the previous call (``[L, B, H]``,
                or ``(h, c)`` for an LSTM).

        Returns:
            ``(h_t [B, hidden] of the top layer, new state)``.
        """
        plan = self._stream_plan(x_t, state)
        if plan is not None:
            out = plan.step(x_t, state)
            if out is not None:
                return out
        states = self._initial_states(state, x_t.shape[0], x_t)
        out, new = x_t, []
        for cell, s in zip(self.layers, states):
            s = cell(out, s)
            new.append(s)
            out = RNNCell.output(s)
        return out, self._stack_states(new)

    def _stream_plan(self, x_t: torch.Tensor, state):
        """The prepared step for ``x_t`` (:mod:`str_rnn.stream`), or None where it does not
        apply: reference loop requested, gradients needed, not a small float CPU batch.

        Runs at every streaming step, so the cheap tests come first and the gradient test
        (which walks the parameters) only where autograd is on at all."""
        if not (self.fused and isinstance(x_t, torch.Tensor) and x_t.dtype in (torch.float32, torch.float64)
                and x_t.is_cpu and x_t.dim() == 2 and x_t.shape[0] <= _infer.MAX_BATCH):
            return None
        if torch.is_grad_enabled() and _infer.needs_grad(self, x_t, self._initial_states(state, x_t.shape[0], x_t)):
            return None
        if x_t.shape[1] != self.input_size:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (batch, input_size={self.input_size})")
        plan = self.__dict__.get("_stream_cache")
        if plan is None or not plan.valid_for(self, x_t.dtype):
            if not _stream.supports(self):
                return None
            # held in __dict__, not as a submodule or buffer: never saved, copied or moved
            plan = self.__dict__["_stream_cache"] = _stream.StreamPlan(self, x_t.dtype)
        return plan

    def __getstate__(self):
        # the streaming plan holds views of this model's parameters: never copy or pickle it
        state = self.__dict__.copy()
        state.pop("_stream_cache", None)
        return state

    def spec(self) -> dict:
        return {"type": "RNN", "cell": self.cell, "batch_first": self.batch_first,
                "layers": [c.spec() for c in self.layers]}

    def extra_repr(self) -> str:
        return (f"cell={self.cell}, input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, batch_first={self.batch_first}")
