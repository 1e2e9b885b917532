"""Ranks, parameter counts, bytes, FLOPs, summaries and optimiser groups."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from str_rnn import (CELLS, RNN, LowRankSTR, SequenceClassifier, count_params, flops, matrices,
                     model_size_bytes, param_groups, ranks, summary, thresholds)

GATES = {"fastgrnn": 1, "fastrnn": 1, "lstm": 4, "gru": 3}
# the cell's own parameters besides W and U, hidden size h
EXTRAS = {"fastgrnn": lambda h: 2 * h + 2, "fastrnn": lambda h: h + 2, "lstm": lambda h: 8 * h,
          "gru": lambda h: 6 * h}


def _matrix_params(kind: str, n_in: int, n_out: int, r: int) -> int:
    """Hand count of one compacted matrix."""
    if kind == "dense":
        return n_in * n_out
    if kind == "fixed":
        return r * (n_in + n_out)
    return min(r * (n_in + n_out), n_in * n_out)  # str


@pytest.mark.parametrize("kind", ["dense", "fixed", "str"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_count_params_by_hand(cell, kind):
    n_in, h, r = 3, 4, 2
    g = GATES[cell]
    rnn = RNN(cell, n_in, h, matrix=kind, rank_w=r if kind != "dense" else None,
              rank_u=r if kind != "dense" else None)
    expected = (_matrix_params(kind, n_in, g * h, r) + _matrix_params(kind, h, g * h, r) + EXTRAS[cell](h))
    assert count_params(rnn) == expected
    assert model_size_bytes(rnn) == 4 * expected
    assert model_size_bytes(rnn, bits=8) == expected
    # a classifier adds its linear head
    clf = SequenceClassifier(rnn, 5)
    assert count_params(clf) == expected + h * 5 + 5


@pytest.mark.parametrize("cell, torch_cls", [("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_dense_count_equals_torch(cell, torch_cls):
    rnn = RNN(cell, 7, 9, num_layers=2, matrix="dense")
    assert count_params(rnn) == sum(p.numel() for p in torch_cls(7, 9, num_layers=2).parameters())


def test_count_params_follows_learned_rank(prune_to_rank):
    rnn = RNN("fastgrnn", 8, 10)
    w, u = rnn.layers[0].W, rnn.layers[0].U
    prune_to_rank(w, 2)
    prune_to_rank(u, 0)
    # W: 2 (8 + 10); U: nothing; biases 20, zeta, nu; thresholds not counted
    assert count_params(rnn) == 2 * 18 + 0 + 22
    assert ranks(rnn) == {"layers.0.W": (2, 8), "layers.0.U": (0, 10)}


def test_count_params_sparse_counts_nonzeros():
    rnn = RNN("fastrnn", 4, 5, matrix="sparse")
    with torch.no_grad():
        rnn.layers[0].U.threshold.s.fill_(-2.0)
    nnz = int((rnn.layers[0].U.weight != 0).sum())
    assert nnz < 25
    assert count_params(rnn) == 20 + nnz + 5 + 2


def test_ranks_and_thresholds_names():
    rnn = RNN("gru", 3, 4, num_layers=2, rank_u=3)
    assert ranks(rnn) == {"layers.0.W": (3, 3), "layers.0.U": (3, 3),
                          "layers.1.W": (4, 4), "layers.1.U": (3, 3)}
    th = thresholds(rnn)
    assert set(th) == {f"layers.{i}.{m}.threshold" for i in (0, 1) for m in "WU"}
    assert all(v == pytest.approx(4.54e-5, rel=1e-2) for v in th.values())
    assert set(matrices(rnn)) == set(ranks(rnn))


def test_flops_grow_with_length_and_fall_with_rank(prune_to_rank):
    rnn = RNN("fastgrnn", 16, 32, num_layers=2)
    f1, f2, f3 = flops(rnn, 1), flops(rnn, 2), flops(rnn, 3)
    assert 0 < f1 < f2 < f3
    assert f3 - f2 == f2 - f1  # linear in the sequence length
    before = flops(rnn, 10)
    prune_to_rank(rnn.layers[0].U, 4)
    after_u = flops(rnn, 10)
    prune_to_rank(rnn.layers[1].U, 1)
    after_both = flops(rnn, 10)
    assert before > after_u > after_both
    # U of 32x32 at rank 4: 2 * 4 * 64 per step instead of 2 * 32 * 32
    assert before - after_u == 10 * 2 * (32 * 32 - 4 * 64)
    # the classifier's head is counted once
    clf = SequenceClassifier(rnn, 4)
    assert flops(clf, 10) == after_both + 2 * 32 * 4 + 4


def test_summary_and_reprs_show_every_rank(prune_to_rank):
    rnn = RNN("lstm", 6, 8, num_layers=2)
    prune_to_rank(rnn.layers[1].U, 3)
    text = summary(SequenceClassifier(rnn, 3), seq_len=20)
    for name, m in matrices(rnn).items():
        assert f"rnn.{name}" in text
        assert f"{m.rank}/{m.max_rank}" in text
    assert f"{count_params(SequenceClassifier(rnn, 3)):,}" in text
    assert "FLOPs per sequence of 20 steps" in text
    rep = repr(rnn)
    for m in matrices(rnn).values():
        assert f"rank={m.rank}/{m.max_rank}" in repr(m)
    assert rep.count("rank=") == 4 and "rank=3/8" in rep


@pytest.mark.parametrize("matrix", ["str", "fixed", "dense", "sparse"])
def test_param_groups_partition(matrix):
    model = SequenceClassifier(RNN("fastgrnn", 4, 6, num_layers=2, matrix=matrix, rank_w=2, rank_u=2), 3)
    groups = param_groups(model, 1e-4, threshold_decay=1e-2, spectrum_decay=1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    sigmas = {id(m.sigma) for m in model.modules() if isinstance(m, LowRankSTR)}
    s = {id(p) for n, p in model.named_parameters() if n.endswith("threshold.s")}
    assert by_name["weights"]["weight_decay"] == 1e-4
    if matrix in ("str", "sparse"):
        assert {id(p) for p in by_name["thresholds"]["params"]} == s and len(s) == 4
        assert by_name["thresholds"]["weight_decay"] == 1e-2
    if matrix == "str":
        assert {id(p) for p in by_name["spectra"]["params"]} == sigmas and len(sigmas) == 4
        assert by_name["spectra"]["weight_decay"] == 1e-3
    else:
        assert "spectra" not in by_name
    if matrix in ("fixed", "dense"):
        assert set(by_name) == {"weights"}
    # usable as-is by torch's optimisers
    torch.optim.AdamW(groups, lr=1e-3)


def test_param_groups_defaults_and_frozen():
    model = RNN("gru", 3, 4)
    model.layers[0].bias_hh.requires_grad_(False)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert all(g["weight_decay"] == 0.1 for g in groups.values())
    assert all(p is not model.layers[0].bias_hh for g in groups.values() for p in g["params"])


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_decay": -1.0}, r"weight_decay=-1.0"),
    ({"weight_decay": 0.0, "threshold_decay": -0.5}, r"threshold_decay=-0.5"),
    ({"weight_decay": "0.1"}, r"weight_decay='0.1'"),
])
def test_param_groups_bad_decay(kwargs, match):
    with pytest.raises(ValueError, match=match):
        param_groups(RNN("gru", 3, 4), **kwargs)
