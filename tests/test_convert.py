"""from_torch exactness, compaction (out of place, same outputs, same count) and save/load."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import str_rnn
from str_rnn import (RNN, Dense, FixedRank, LowRankSTR, SequenceClassifier, SparseSTR, Threshold, compact,
                     count_params, from_torch)
from str_rnn.lowrank import FixedSparse


def _assert_same(a, b, tol=1e-5):
    if isinstance(a, tuple):
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q, atol=tol, rtol=tol)
    else:
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# -- from_torch ----------------------------------------------------------------------------

@pytest.mark.parametrize("matrix", ["str", "dense", "fixed", "sparse"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("torch_cls", [nn.LSTM, nn.GRU])
def test_from_torch_sequence_modules(torch_cls, batch_first, bias, matrix):
    ref = torch_cls(4, 6, num_layers=2, batch_first=batch_first, bias=bias)
    rnn = from_torch(ref, matrix=matrix)
    assert isinstance(rnn, RNN)
    assert (rnn.num_layers, rnn.batch_first, rnn.hidden_size) == (2, batch_first, 6)
    x = torch.randn(3, 5, 4) if batch_first else torch.randn(5, 3, 4)
    h0 = torch.randn(2, 3, 6)
    state = (h0, torch.randn(2, 3, 6)) if torch_cls is nn.LSTM else h0
    with torch.no_grad():
        for args in ((x,), (x, state)):
            out, h_n = rnn(*args)
            ref_out, ref_h = ref(*args)
            _assert_same(out, ref_out)
            _assert_same(h_n, ref_h)


@pytest.mark.parametrize("matrix", ["str", "dense"])
@pytest.mark.parametrize("torch_cls", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_cells(torch_cls, matrix, bias):
    ref = torch_cls(4, 6, bias=bias)
    cell = from_torch(ref, matrix=matrix)
    x = torch.randn(3, 4)
    h = torch.randn(3, 6)
    state = (h, torch.randn(3, 6)) if torch_cls is nn.LSTMCell else h
    with torch.no_grad():
        _assert_same(cell(x, state), ref(x, state))


def test_from_torch_str_sigma_are_singular_values():
    ref = nn.GRU(4, 6)
    rnn = from_torch(ref, s_init=-12.0)
    w = rnn.layers[0].W
    assert isinstance(w, LowRankSTR)
    torch.testing.assert_close(w.gains().detach(), torch.linalg.svdvals(ref.weight_ih_l0.detach()),
                               atol=1e-5, rtol=1e-5)
    assert w.threshold.s.item() == -12.0


def test_from_torch_leaves_the_torch_module_alone():
    ref = nn.LSTM(3, 4)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    rnn = from_torch(ref)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(1.0)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("make, error, match", [
    (lambda: nn.RNN(3, 4), TypeError, r"got RNN"),
    (lambda: nn.Linear(3, 4), TypeError, r"got Linear"),
    (lambda: nn.GRU(3, 4, bidirectional=True), ValueError, r"bidirectional=True"),
    (lambda: nn.LSTM(3, 4, proj_size=2), ValueError, r"proj_size=2"),
])
def test_from_torch_unsupported(make, error, match):
    with pytest.raises(error, match=match):
        from_torch(make())


def test_from_torch_unknown_matrix():
    with pytest.raises(ValueError, match=r"matrix='lowrank'"):
        from_torch(nn.GRUCell(3, 4), matrix="lowrank")


# -- compact -------------------------------------------------------------------------------

def _trained_looking(cell: str, prune_to_rank) -> RNN:
    """Two layers, input 12, hidden 16, thresholds raised to mixed ranks: a matrix that
    compacts to Dense (rank high), to FixedRank (rank low) and to nothing (rank 0)."""
    rnn = RNN(cell, 12, 16, num_layers=2)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move off the initial values
    k = {m: m.max_rank for m in (rnn.layers[0].W, rnn.layers[0].U, rnn.layers[1].W, rnn.layers[1].U)}
    prune_to_rank(rnn.layers[0].W, k[rnn.layers[0].W] - 1)  # dense is cheaper
    prune_to_rank(rnn.layers[0].U, 3)  # factored is cheaper
    prune_to_rank(rnn.layers[1].W, 0)  # pruned away
    prune_to_rank(rnn.layers[1].U, 5)
    return rnn


@pytest.mark.parametrize("cell", ["fastgrnn", "lstm", "gru"])
def test_compact_keeps_outputs_and_counts(cell, prune_to_rank):
    rnn = _trained_looking(cell, prune_to_rank)
    state_before = {k: v.clone() for k, v in rnn.state_dict().items()}
    small = compact(rnn)
    assert isinstance(rnn.layers[0].W, LowRankSTR)  # out of place
    assert isinstance(small.layers[0].W, Dense)
    assert isinstance(small.layers[0].U, FixedRank) and small.layers[0].U.rank == 3
    assert isinstance(small.layers[1].W, FixedSparse) and small.layers[1].W.effective_params == 0
    assert not any(isinstance(m, (LowRankSTR, SparseSTR, Threshold)) for m in small.modules())
    x = torch.randn(4, 6, 12)
    lengths = torch.tensor([6, 2, 5, 1])
    with torch.no_grad():
        for kwargs in ({}, {"lengths": lengths}):
            out, h_n = rnn(x, **kwargs)
            out_s, h_s = small(x, **kwargs)
            _assert_same(out_s, out)
            _assert_same(h_s, h_n)
    n = count_params(rnn)
    assert count_params(small) == n == sum(p.numel() for p in small.parameters())
    assert n < sum(p.numel() for p in rnn.parameters())
    # the copy shares nothing with the original
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    for k, v in rnn.state_dict().items():
        assert torch.equal(v, state_before[k]), k


def test_compact_sparse_matrices_keeps_their_nonzeros():
    rnn = RNN("fastgrnn", 6, 8, matrix="sparse")
    with torch.no_grad():
        rnn.layers[0].W.threshold.s.fill_(-2.5)  # prune about 4 in 5 entries of 0.1 randn
    nnz = rnn.layers[0].W.nnz
    assert 0 < nnz < 48
    small = compact(rnn)
    assert isinstance(small.layers[0].W, FixedSparse) and small.layers[0].W.nnz == nnz
    assert isinstance(small.layers[0].U, Dense)  # nothing pruned: dense is the same count
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        _assert_same(small(x)[0], rnn(x)[0])
    assert count_params(small) == count_params(rnn) == sum(p.numel() for p in small.parameters())


def test_compact_single_matrix_and_idempotence(prune_to_rank):
    m = prune_to_rank(LowRankSTR(10, 12), 2)
    small = compact(m)
    assert isinstance(small, FixedRank) and small.rank == 2
    torch.testing.assert_close(small.weight, m.weight, atol=1e-6, rtol=1e-6)
    again = compact(small)
    assert again is not small and isinstance(again, FixedRank)
    torch.testing.assert_close(again.weight, small.weight)


# -- save / load ---------------------------------------------------------------------------

LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch, str_rnn
    inputs, *folders = sys.argv[1:]
    x, lengths = torch.load(inputs, weights_only=True)
    for folder in folders:
        model = str_rnn.load(folder).eval()
        with torch.no_grad():
            torch.save(model(x, lengths=lengths), folder + "/out.pt")
""")


def test_save_load_compact_classifier_in_a_fresh_process(tmp_path, prune_to_rank):
    """A compact SequenceClassifier saved here gives the same logits when a new Python
    process, which never saw the uncompacted model, loads it (one process for all cells)."""
    x = torch.randn(4, 6, 12)
    lengths = torch.tensor([6, 3, 1, 5])
    torch.save((x, lengths), tmp_path / "inputs.pt")
    expected = {}
    for cell in ("fastgrnn", "lstm", "gru"):
        model = SequenceClassifier(_trained_looking(cell, prune_to_rank), 3, mean=torch.randn(12),
                                   std=torch.rand(12) + 0.5)
        small = compact(model).eval()
        str_rnn.save(small, tmp_path / cell, meta={"seed": 0})
        with torch.no_grad():
            expected[cell] = small(x, lengths=lengths)
            torch.testing.assert_close(expected[cell], model(x, lengths=lengths), atol=1e-5, rtol=1e-5)
    subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "inputs.pt"),
                    *(str(tmp_path / cell) for cell in expected)], check=True, timeout=120)
    for cell, logits in expected.items():
        loaded = torch.load(tmp_path / cell / "out.pt", weights_only=True)
        torch.testing.assert_close(loaded, logits, atol=1e-6, rtol=1e-6)


def test_classifier_standardises_and_reads_the_last_real_step():
    mean, std = torch.randn(3), torch.rand(3) + 0.5
    model = SequenceClassifier(RNN("fastgrnn", 3, 4), 2, mean=mean, std=std)
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        logits = model(x, lengths=torch.tensor([6, 2]))
        z = (x - mean) / std
        for b, n in enumerate([6, 2]):
            _, h_n = model.rnn(z[b:b + 1, :n])
            torch.testing.assert_close(logits[b:b + 1], model.head(h_n[-1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"mean": torch.zeros(4)}, r"mean has shape \(4,\); expected \(input_size,\) = \(3,\)"),
    ({"std": torch.ones(3, 1)}, r"std has shape \(3, 1\)"),
    ({"std": torch.tensor([1.0, 0.0, 1.0])}, r"std positive"),
    ({"num_classes": 1}, r"num_classes=1"),
])
def test_classifier_bad_arguments(kwargs, match):
    kwargs = {"num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        SequenceClassifier(RNN("gru", 3, 4), kwargs.pop("num_classes"), **kwargs)
    with pytest.raises(ValueError, match="batch_first=True"):
        SequenceClassifier(RNN("gru", 3, 4, batch_first=False), 2)


def test_save_load_compact_sparse_model(tmp_path):
    model = SequenceClassifier(RNN("fastgrnn", 6, 8, matrix="sparse"), 3)
    with torch.no_grad():
        model.rnn.layers[0].U.threshold.s.fill_(-2.5)
    small = compact(model)
    assert isinstance(small.rnn.layers[0].U, FixedSparse)
    str_rnn.save(small, tmp_path)
    loaded = str_rnn.load(tmp_path)
    assert isinstance(loaded.rnn.layers[0].U, FixedSparse)
    torch.testing.assert_close(loaded.rnn.layers[0].U.indices, small.rnn.layers[0].U.indices, rtol=0, atol=0)
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)


def test_save_load_in_process_uncompacted(tmp_path):
    model = SequenceClassifier(RNN("gru", 3, 4, num_layers=2, matrix="str", rank_u=3), 2)
    str_rnn.save(model, tmp_path)
    loaded = str_rnn.load(tmp_path)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "model.pt"]  # no temp files left


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        str_rnn.load(tmp_path / "nothing")
