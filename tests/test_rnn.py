"""The sequence layer: torch-like shapes, true lengths, packed input, streaming, gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from str_rnn import CELLS, RNN

B, T, F, H = 3, 7, 4, 5


def _h(state):
    return state[0] if isinstance(state, tuple) else state


def _assert_state_close(a, b, **tol):
    tol = {"atol": 1e-5, "rtol": 1e-5, **tol}
    if isinstance(a, tuple):
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q, **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_shapes_like_torch(cell, batch_first, num_layers):
    rnn = RNN(cell, F, H, num_layers=num_layers, batch_first=batch_first)
    torch_cls = nn.LSTM if cell == "lstm" else nn.GRU
    ref = torch_cls(F, H, num_layers=num_layers, batch_first=batch_first)
    x = torch.randn(B, T, F) if batch_first else torch.randn(T, B, F)
    out, h_n = rnn(x)
    ref_out, ref_h = ref(x)
    assert out.shape == ref_out.shape
    assert isinstance(h_n, tuple) == isinstance(ref_h, tuple)
    if isinstance(ref_h, tuple):
        assert [t.shape for t in h_n] == [t.shape for t in ref_h]
    else:
        assert h_n.shape == ref_h.shape == (num_layers, B, H)
    # the top layer's last output is its final state
    last = out[:, -1] if batch_first else out[-1]
    torch.testing.assert_close(last, _h(h_n)[-1])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_initial_state_is_used(cell, batch_first):
    rnn = RNN(cell, F, H, num_layers=2, batch_first=batch_first)
    x = torch.randn(B, T, F) if batch_first else torch.randn(T, B, F)
    h0 = torch.randn(2, B, H)
    state = (h0, torch.randn(2, B, H)) if cell == "lstm" else h0
    zero = (torch.zeros(2, B, H), torch.zeros(2, B, H)) if cell == "lstm" else torch.zeros(2, B, H)
    _assert_state_close(rnn(x, zero)[1], rnn(x)[1])
    assert not torch.allclose(_h(rnn(x, state)[1]), _h(rnn(x)[1]))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_lengths_equal_running_each_sequence_alone(cell, batch_first, rnn_path):
    fused, context, batch = rnn_path
    rnn = RNN(cell, F, H, num_layers=2, batch_first=batch_first, fused=fused)
    x = torch.randn(batch, T, F)
    lengths = torch.randint(1, T + 1, (batch,))
    lengths[:3] = torch.tensor([T - 1, 2, 5])  # batch 3: the last padded step is never run
    xin = x if batch_first else x.transpose(0, 1)
    with context():
        out, h_n = rnn(xin, lengths=lengths)
        out_bf = out if batch_first else out.transpose(0, 1)
        assert out_bf.shape == (batch, T, H)  # padded back to the input's length
        for b, n in enumerate(lengths.tolist()[:4]):
            alone = x[b:b + 1, :n]
            out_b, h_b = rnn(alone if batch_first else alone.transpose(0, 1))
            out_b = out_b if batch_first else out_b.transpose(0, 1)
            torch.testing.assert_close(out_bf[b:b + 1, :n], out_b, atol=1e-5, rtol=1e-5)
            if isinstance(h_n, tuple):
                _assert_state_close(tuple(s[:, b:b + 1] for s in h_n), h_b)
            else:
                _assert_state_close(h_n[:, b:b + 1], h_b)
            # outputs past the true length are zero
            assert (out_bf[b, n:] == 0).all()
        # lengths as a list mean the same; full lengths mean no lengths
        _assert_state_close(rnn(xin, lengths=lengths.tolist())[1], h_n)
        _assert_state_close(rnn(xin, lengths=[T] * batch)[1], rnn(xin)[1])


@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_sequence_equals_lengths(cell, rnn_path):
    fused, context, batch = rnn_path
    rnn = RNN(cell, F, H, num_layers=2, fused=fused)
    x = torch.randn(batch, T, F)
    lengths = torch.randint(1, T + 1, (batch,))
    lengths[:3] = torch.tensor([4, T, 1])
    with context():
        out, h_n = rnn(x, lengths=lengths)
        packed_out, packed_h = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    assert isinstance(packed_out, nn.utils.rnn.PackedSequence)
    padded, out_lengths = pad_packed_sequence(packed_out, batch_first=True, total_length=T)
    assert out_lengths.tolist() == lengths.tolist()
    torch.testing.assert_close(padded, out, atol=1e-6, rtol=1e-6)
    _assert_state_close(packed_h, h_n, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), lengths=lengths)


@pytest.mark.parametrize("matrix", ["str", "fixed", "dense", "sparse"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_step_streaming_equals_forward(cell, matrix, rnn_path):
    fused, context, batch = rnn_path
    rnn = RNN(cell, F, H, num_layers=2, matrix=matrix, rank_w=2, rank_u=3, fused=fused)
    x = torch.randn(batch, T, F)
    with context():
        out, h_n = rnn(x)
    with torch.no_grad():
        state, outs = None, []
        for t in range(T):
            y, state = rnn.step(x[:, t], state)
            outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), out, atol=1e-5, rtol=1e-5)
    _assert_state_close(state, h_n)


@pytest.mark.parametrize("cell", list(CELLS))
def test_gradients_reach_every_factor(cell, prune_to_rank):
    """Gradients of the fused loop reach A, σ, B and s, and equal the reference loop's."""
    grads = {}
    x = torch.randn(B, T, F)
    h0 = torch.randn(2, B, H)
    state = (h0, torch.randn(2, B, H)) if cell == "lstm" else h0
    for fused in (True, False):
        torch.manual_seed(1)
        rnn = RNN(cell, F, H, num_layers=2, fused=fused)
        prune_to_rank(rnn.layers[0].U, 3)  # a partially pruned matrix takes the factored path
        out, h_n = rnn(x, state, lengths=torch.tensor([T, 3, 5]))
        (out.pow(2).sum() + _h(h_n).sum()).backward()
        for name, p in rnn.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            if name.endswith((".A", ".B", ".sigma", ".s")):
                assert p.grad.abs().sum() > 0, name
        # pruned directions get no loss gradient (no straight-through)
        u = rnn.layers[0].U
        pruned = u.gains() == 0
        assert pruned.any()
        assert (u.sigma.grad[pruned] == 0).all()
        grads[fused] = {name: p.grad for name, p in rnn.named_parameters()}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-4, msg=name)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda r: r(torch.randn(B, T, F + 1)), ValueError, r"x has shape \(3, 7, 5\).*input_size = 4"),
    (lambda r: r(torch.randn(B, F)), ValueError, r"x has shape \(3, 4\)"),
    (lambda r: r(torch.ones(B, T, F, dtype=torch.int64)), TypeError, r"x: .*int64"),
    (lambda r: r([[0.0] * F]), TypeError, r"x: .*list"),
    (lambda r: r(torch.randn(B, T, F), torch.zeros(2, B, H + 1)), ValueError,
     r"state has shape \(2, 3, 6\).*\(2, 3, 5\)"),
    (lambda r: r(torch.randn(B, T, F), torch.zeros(1, B, H)), ValueError, r"state has shape \(1, 3, 5\)"),
    (lambda r: r(torch.randn(B, T, F), lengths=[T, 0, 2]), ValueError, r"lengths.*\[1, 7\].*min 0"),
    (lambda r: r(torch.randn(B, T, F), lengths=[T, T + 1, 2]), ValueError, r"lengths.*\[1, 7\].*max 8"),
    (lambda r: r(torch.randn(B, T, F), lengths=[T, 2]), ValueError, r"lengths has shape \(2,\)"),
    (lambda r: r.step(torch.randn(B, F + 1)), ValueError, r"input_size=4"),
    (lambda r: r.step(torch.randn(B, F), torch.zeros(2, B + 1, H)), ValueError, r"state has shape \(2, 4, 5\)"),
])
def test_rnn_bad_input(call, error, match):
    rnn = RNN("gru", F, H, num_layers=2)
    with pytest.raises(error, match=match):
        call(rnn)


def test_lstm_state_must_be_a_pair():
    rnn = RNN("lstm", F, H)
    with pytest.raises(ValueError, match=r"\(h_0, c_0\)"):
        rnn(torch.randn(B, T, F), torch.zeros(1, B, H))


@pytest.mark.parametrize("args, kwargs, match", [
    (("rnn", F, H), {}, r"cell='rnn'"),
    (("gru", F, H), {"num_layers": 0}, r"num_layers=0"),
    (("gru", 0, H), {}, r"input_size=0"),
    (("gru", F, H), {"matrix": "svd"}, r"matrix='svd'"),
    (("gru", F, H), {"matrix": "fixed"}, r"needs a rank"),
    (("gru", F, H), {"matrix": "fixed", "rank_w": -1, "rank_u": 2}, r"rank=-1"),
    (("gru", F, H), {"matrix": "fixed", "rank_w": 2, "rank_u": 6}, r"rank=6"),
])
def test_rnn_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RNN(*args, **kwargs)


def test_rnn_time_major_rejects_1d_input_clearly():
    rnn = RNN("gru", F, H, batch_first=False)
    with pytest.raises(ValueError, match="x has shape"):
        rnn(torch.randn(F))


def test_from_cells_checks_its_cells():
    a = RNN("gru", F, H).layers[0]
    b = RNN("lstm", H, H).layers[0]
    with pytest.raises(ValueError, match="one str_rnn cell type"):
        RNN.from_cells([a, b])
    with pytest.raises(ValueError, match=r"cells\[1\] has sizes \(4, 5\)"):
        RNN.from_cells([a, RNN("gru", F, H).layers[0]])
    with pytest.raises(ValueError, match="at least one"):
        RNN.from_cells([])
    rnn = RNN.from_cells([a, RNN("gru", H, H).layers[0]], batch_first=False)
    assert (rnn.cell, rnn.num_layers, rnn.batch_first) == ("gru", 2, False)
