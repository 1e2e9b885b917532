"""Cells against their equations written out here, against torch's cells, and their initial scale."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from str_rnn import CELLS, RNN, Dense, FastGRNNCell, FixedRank, LowRankSTR, SparseSTR, from_torch
from str_rnn.cells import cell_class

MATRICES = {
    "str": {"matrix": "str"},
    "gate": {"matrix": "str", "init": "gate"},
    "fixed": {"matrix": "fixed", "rank_w": 2, "rank_u": 3},
    "dense": {"matrix": "dense"},
    "sparse": {"matrix": "sparse"},
}


# -- plain references: one step of each cell from its dense W, U and raw parameters ---------

def ref_fastgrnn(cell, x, h):
    pre = x @ cell.W.weight.T + h @ cell.U.weight.T
    z = torch.sigmoid(pre + cell.bias_z)
    h_tilde = torch.tanh(pre + cell.bias_h)
    zeta, nu = torch.sigmoid(cell.zeta), torch.sigmoid(cell.nu)
    return (zeta * (1 - z) + nu) * h_tilde + z * h


def ref_fastrnn(cell, x, h):
    h_tilde = torch.tanh(x @ cell.W.weight.T + h @ cell.U.weight.T + cell.bias)
    return torch.sigmoid(cell.beta) * h + torch.sigmoid(cell.alpha) * h_tilde


def ref_lstm(cell, x, state):
    h, c = state
    n = cell.hidden_size
    wx = x @ cell.W.weight.T + cell.bias_ih
    uh = h @ cell.U.weight.T + cell.bias_hh
    i, f, g, o = (wx[:, k * n:(k + 1) * n] + uh[:, k * n:(k + 1) * n] for k in range(4))
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def ref_gru(cell, x, h):
    n = cell.hidden_size
    wx = x @ cell.W.weight.T + cell.bias_ih
    uh = h @ cell.U.weight.T + cell.bias_hh
    r = torch.sigmoid(wx[:, :n] + uh[:, :n])
    z = torch.sigmoid(wx[:, n:2 * n] + uh[:, n:2 * n])
    cand = torch.tanh(wx[:, 2 * n:] + r * uh[:, 2 * n:])
    return (1 - z) * cand + z * h


REFERENCES = {"fastgrnn": ref_fastgrnn, "fastrnn": ref_fastrnn, "lstm": ref_lstm, "gru": ref_gru}


def _randomise(cell):
    """Move every scalar/bias off its initial value so that each term of the equation matters."""
    with torch.no_grad():
        for name, p in cell.named_parameters():
            if "." not in name:  # the cell's own parameters, not W's or U's
                p.add_(0.5 * torch.randn_like(p))
    return cell


def _random_state(cell, batch):
    h = torch.randn(batch, cell.hidden_size)
    return (h, torch.randn(batch, cell.hidden_size)) if cell.has_cell_state else h


def _close(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("matrix", list(MATRICES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_cell_step_matches_equations(cell, matrix):
    c = _randomise(cell_class(cell)(5, 6, **MATRICES[matrix]))
    x = torch.randn(3, 5)
    state = _random_state(c, 3)
    with torch.no_grad():
        _close(c(x, state), REFERENCES[cell](c, x, state))
        # the default state is zeros
        zeros = c.init_state(3)
        _close(c(x), REFERENCES[cell](c, x, zeros))


@pytest.mark.parametrize("matrix", ["str", "fixed", "dense"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_rnn_matches_equations_over_steps(cell, matrix, rnn_path):
    """Two stacked layers over 6 steps against the equations, along every time loop."""
    fused, context, batch = rnn_path
    rnn = RNN(cell, 4, 5, num_layers=2, fused=fused, **MATRICES[matrix])
    for layer in rnn.layers:
        _randomise(layer)
    x = torch.randn(batch, 6, 4)
    with context():
        out, h_n = rnn(x)
    with torch.no_grad():
        inputs, finals = x, []
        for layer in rnn.layers:
            state, outs = layer.init_state(batch), []
            for t in range(6):
                state = REFERENCES[cell](layer, inputs[:, t], state)
                outs.append(state[0] if isinstance(state, tuple) else state)
            inputs = torch.stack(outs, 1)
            finals.append(state)
    torch.testing.assert_close(out, inputs, atol=1e-5, rtol=1e-5)
    if rnn.has_cell_state:
        _close(h_n, (torch.stack([s[0] for s in finals]), torch.stack([s[1] for s in finals])))
    else:
        _close(h_n, torch.stack(finals))


@pytest.mark.parametrize("matrix", ["str", "dense"])
@pytest.mark.parametrize("torch_cls", [nn.LSTMCell, nn.GRUCell])
def test_lstm_gru_cells_match_torch(torch_cls, matrix):
    ref = torch_cls(5, 7)
    cell = from_torch(ref, matrix=matrix)
    x = torch.randn(4, 5)
    state = _random_state(cell, 4)
    with torch.no_grad():
        _close(cell(x, state), ref(x, state))
        _close(cell(x), ref(x))


def test_fastgrnn_parameters_and_initial_values():
    c = FastGRNNCell(3, 4)
    params = dict(c.named_parameters())
    for name in ("bias_z", "bias_h", "zeta", "nu"):
        assert name in params
    torch.testing.assert_close(c.bias_z.data, torch.ones(4))
    torch.testing.assert_close(c.bias_h.data, torch.ones(4))
    assert c.zeta.shape == () and c.zeta.item() == 1.0
    assert c.nu.shape == () and c.nu.item() == -4.0


def test_fastrnn_parameters_and_initial_values():
    c = cell_class("fastrnn")(3, 4)
    torch.testing.assert_close(c.bias.data, torch.ones(4))
    assert (c.alpha.item(), c.beta.item()) == (-3.0, 3.0)


@pytest.mark.parametrize("cell, gates", [("lstm", 4), ("gru", 3)])
def test_lstm_gru_layout(cell, gates):
    c = cell_class(cell)(5, 6)
    assert (c.W.out_features, c.W.in_features) == (gates * 6, 5)
    assert (c.U.out_features, c.U.in_features) == (gates * 6, 6)
    bound = 1 / math.sqrt(6)
    for b in (c.bias_ih, c.bias_hh):
        assert b.shape == (gates * 6,) and b.abs().max() <= bound


# -- initial scale: every parameterisation starts where the dense cell starts ----------------

SCALE_KINDS = {
    "dense": {"matrix": "dense"},
    "sparse": {"matrix": "sparse"},
    "str_svd": {"matrix": "str", "init": "svd"},
    "str_gate": {"matrix": "str", "init": "gate"},
    "str_capped": {"matrix": "str", "rank_w": 3, "rank_u": 3},
    "fixed_1": {"matrix": "fixed", "rank_w": 1, "rank_u": 1},
    "fixed_4": {"matrix": "fixed", "rank_w": 4, "rank_u": 4},
    "fixed_12": {"matrix": "fixed", "rank_w": 12, "rank_u": 12},
}


def _dense_std(cell: str, hidden: int) -> float:
    """Entry std of the dense cell's W and U: 0.1 randn (FastGRNN/FastRNN, EdgeML) or
    U(-1/sqrt(h), 1/sqrt(h)) (LSTM/GRU, torch), whose std is 1/sqrt(3h)."""
    return 0.1 if cell in ("fastgrnn", "fastrnn") else 1 / math.sqrt(3 * hidden)


@pytest.mark.parametrize("kind", list(SCALE_KINDS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_initial_scale_matches_dense_cell(cell, kind):
    hidden, n_in = 24, 16
    torch.manual_seed(1)
    c = cell_class(cell)(n_in, hidden, **SCALE_KINDS[kind])
    torch.manual_seed(1)
    dense = cell_class(cell)(n_in, hidden, matrix="dense")
    std = _dense_std(cell, hidden)
    for name in ("W", "U"):
        w = getattr(c, name).weight.detach()
        expected_fro = std * math.sqrt(w.numel())
        assert w.std().item() == pytest.approx(std, rel=0.15), f"{name} std"
        assert torch.linalg.matrix_norm(w).item() == pytest.approx(expected_fro, rel=0.15), f"{name} norm"
        # same seed, same dense draw: the norm is preserved exactly, not just on average
        w_dense = getattr(dense, name).weight.detach()
        assert torch.linalg.matrix_norm(w).item() == pytest.approx(torch.linalg.matrix_norm(w_dense).item(),
                                                                   rel=1e-4)


def test_full_rank_str_starts_at_the_dense_matrix():
    torch.manual_seed(3)
    c = FastGRNNCell(6, 8, matrix="str")
    torch.manual_seed(3)
    d = FastGRNNCell(6, 8, matrix="dense")
    assert isinstance(c.W, LowRankSTR) and isinstance(c.U, LowRankSTR)
    torch.testing.assert_close(c.W.weight, d.W.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.U.weight, d.U.weight, atol=1e-5, rtol=1e-5)


# -- construction and bad input -----------------------------------------------------------

@pytest.mark.parametrize("cell", list(CELLS))
def test_ready_made_matrices(cell):
    g = cell_class(cell).n_gates
    W, U = FixedRank(3, 4 * g, 2), SparseSTR(4, 4 * g)
    c = cell_class(cell)(3, 4, W=W, U=U)
    assert c.W is W and c.U is U
    with pytest.raises(ValueError, match=r"U has shape"):
        cell_class(cell)(3, 4, U=Dense(5, 4 * g))
    with pytest.raises(TypeError, match="U: expected a str_rnn Matrix"):
        cell_class(cell)(3, 4, U=nn.Linear(4, 4 * g))


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("call, error, match", [
    (lambda c: c(torch.randn(2, 4)), ValueError, r"x_t has shape \(2, 4\).*input_size=3"),
    (lambda c: c(torch.randn(3)), ValueError, r"x_t has shape \(3,\)"),
    (lambda c: c(torch.ones(2, 3, dtype=torch.int64)), TypeError, r"x_t.*int64"),
    (lambda c: c(torch.randn(2, 3), c.init_state(3)), ValueError, r"\(batch, hidden_size\) = \(2, 5\)"),
])
def test_cell_bad_input(cell, call, error, match):
    c = cell_class(cell)(3, 5)
    with pytest.raises(error, match=match):
        call(c)


@pytest.mark.parametrize("kwargs, match", [
    ({"matrix": "fixed", "rank_w": -1, "rank_u": 2}, r"rank=-1 out of range for a 5x3 matrix; expected an integer in \[0, 3\]"),
    ({"matrix": "fixed", "rank_w": 2, "rank_u": 9}, r"rank=9"),
    ({"matrix": "str", "rank_u": 9}, r"max_rank=9"),
    ({"matrix": "fixed"}, r"matrix='fixed' needs a rank"),
    ({"matrix": "lowrank"}, r"matrix='lowrank'"),
])
def test_cell_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastGRNNCell(3, 5, **kwargs)


def test_unknown_cell_and_sizes():
    with pytest.raises(ValueError, match="cell='rnn'"):
        cell_class("rnn")
    with pytest.raises(ValueError, match="hidden_size=0"):
        FastGRNNCell(3, 0)
