"""Matrix parameterisations: exactness of from_dense, ranks, chains, re-orthogonalisation."""
from __future__ import annotations

import pytest
import torch

from str_rnn import RNN, Dense, FixedRank, LowRankSTR, SparseSTR, make_matrix
from str_rnn.lowrank import FixedSparse

SHAPES = [(5, 7), (7, 5), (6, 6)]  # (in_features, out_features)


def _exact_kinds():
    return {
        "dense": lambda w: Dense.from_dense(w),
        "fixed_full": lambda w: FixedRank.from_dense(w, rank=min(w.shape)),
        "fixed_auto": lambda w: FixedRank.from_dense(w),
        "str_svd": lambda w: LowRankSTR.from_dense(w, init="svd"),
        "str_gate": lambda w: LowRankSTR.from_dense(w, init="gate"),
        "str_sigmoid": lambda w: LowRankSTR.from_dense(w, g="sigmoid", s_init=-12.0),
        "sparse": lambda w: SparseSTR.from_dense(w),
        "fixed_sparse": lambda w: FixedSparse.from_dense(w),
    }


@pytest.mark.parametrize("kind", list(_exact_kinds()))
@pytest.mark.parametrize("shape", SHAPES)
def test_from_dense_is_exact(kind, shape):
    n_in, n_out = shape
    w = torch.randn(n_out, n_in)
    m = _exact_kinds()[kind](w)
    assert (m.in_features, m.out_features) == (n_in, n_out)
    torch.testing.assert_close(m.weight, w, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, n_in)
    torch.testing.assert_close(m(x), x @ w.T, atol=1e-5, rtol=1e-5)
    assert m.rank == min(shape)


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("cls", [FixedRank, LowRankSTR])
def test_truncated_from_dense_is_eckart_young(cls, rank):
    """The rank-r matrix from ``from_dense`` is the best rank-r approximation: its error
    is the norm of the tail singular values."""
    w = torch.randn(7, 5, dtype=torch.float64)
    m = FixedRank.from_dense(w, rank=rank) if cls is FixedRank else LowRankSTR.from_dense(w, max_rank=rank)
    tail = torch.linalg.svdvals(w)[rank:].norm()
    err = torch.linalg.matrix_norm(m.weight.detach().double() - w)
    assert err.item() == pytest.approx(tail.item(), rel=1e-5)
    assert m.rank == rank
    assert torch.linalg.matrix_rank(m.weight.detach()) == rank


def test_fixed_rank_from_dense_keeps_numerical_rank():
    w = torch.randn(8, 2) @ torch.randn(2, 6)
    m = FixedRank.from_dense(w)
    assert m.rank == 2
    assert m.W1.shape == (8, 2) and m.W2.shape == (2, 6)
    torch.testing.assert_close(m.weight, w, atol=1e-5, rtol=1e-5)


def test_fixed_rank_from_factors():
    w1, w2 = torch.randn(6, 2), torch.randn(2, 9)
    m = FixedRank.from_factors(w1, w2)
    assert (m.rank, m.in_features, m.out_features) == (2, 9, 6)
    torch.testing.assert_close(m.weight, w1 @ w2)


@pytest.mark.parametrize("r", [0, 1, 3, 5])
def test_lowrank_str_rank_follows_threshold(r, prune_to_rank):
    m = prune_to_rank(LowRankSTR(5, 8), r)
    gains = m.gains().detach()
    assert m.rank == r == int((gains != 0).sum())
    assert m.effective_params == min(r * (5 + 8), 5 * 8)
    left, right = m.active_factors()
    assert left.shape == (8, r) and right.shape == (5, r)
    torch.testing.assert_close(left @ right.mT, m.weight)
    if r:
        assert torch.linalg.matrix_rank(m.weight.detach()) == r
    else:
        assert (m.weight == 0).all()


@pytest.mark.parametrize("r", [0, 1, 2, 6])
def test_chain_equals_dense_product(r, prune_to_rank):
    """Every form of ``chain()`` (factored below the break-even rank, dense above) gives
    ``x @ weight.T``, and ``flops`` follows the form that is used."""
    m = prune_to_rank(LowRankSTR(12, 10), r)
    x = torch.randn(4, 12)
    chain = m.chain()
    y = x
    for c in chain:
        y = y @ c
    torch.testing.assert_close(y, x @ m.weight.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x), x @ m.weight.T, atol=1e-5, rtol=1e-5)
    assert m.flops() == 2 * min(r * (12 + 10), 12 * 10)
    assert len(chain) == (2 if r * 22 < 120 else 1)


def test_fixed_rank_chain_and_params():
    m = FixedRank(20, 16, 3)
    assert m.effective_params == 3 * 36 == sum(p.numel() for p in m.parameters())
    assert len(m.chain()) == 2 and m.flops() == 2 * 3 * 36
    x = torch.randn(2, 20)
    torch.testing.assert_close(m(x), x @ m.weight.T, atol=1e-5, rtol=1e-5)
    zero = FixedRank(20, 16, 0)  # rank 0: empty factors, M = 0, nothing to store or compute
    assert zero.effective_params == zero.flops() == sum(p.numel() for p in zero.parameters()) == 0
    assert torch.equal(zero(x), torch.zeros(2, 16))
    assert FixedRank.from_dense(torch.zeros(16, 20)).rank == 0


def test_sparse_str_prunes_entries():
    w = torch.randn(6, 5)
    m = SparseSTR.from_dense(w)
    with torch.no_grad():
        m.threshold.s.fill_(0.0)  # threshold 1: prunes |w| < 1 (after the init shift)
    kept = w.abs() + torch.exp(torch.tensor(-10.0)) > 1
    assert m.nnz == int(kept.sum()) == m.effective_params
    assert ((m.weight != 0) == kept).all()
    assert f"nnz={m.nnz}/30" in repr(m)


def test_fixed_sparse_holds_only_nonzeros():
    w = torch.randn(6, 5) * (torch.rand(6, 5) > 0.6)
    m = FixedSparse.from_dense(w)
    assert m.nnz == int((w != 0).sum()) == m.effective_params == sum(p.numel() for p in m.parameters())
    torch.testing.assert_close(m.weight, w)
    empty = FixedSparse(5, 6, 0)
    assert empty.rank == 0 and empty.effective_params == 0 and (empty(torch.randn(2, 5)) == 0).all()
    with pytest.raises(ValueError, match="nnz=31"):
        FixedSparse(5, 6, 31)


@pytest.mark.parametrize("kind", list(_exact_kinds()))
@pytest.mark.parametrize("factor", [0.3, 2.0])
def test_scale_multiplies_the_matrix_and_keeps_its_pattern(kind, factor, prune_to_rank):
    torch.manual_seed(0)
    w = torch.randn(7, 6)
    m = _exact_kinds()[kind](w)
    if isinstance(m, LowRankSTR):
        with torch.no_grad():
            m.sigma.copy_(torch.linspace(0.9, 0.1, m.max_rank))  # distinct and < 1 (g = sigmoid) to cut at 3
        prune_to_rank(m, 3)
    elif isinstance(m, SparseSTR):
        with torch.no_grad():
            m.threshold.s.fill_(-0.5)  # prune the entries under exp(-0.5)
    before, rank, params = m.weight.detach().clone(), m.rank, m.effective_params
    assert m.spectral_norm() == pytest.approx(float(torch.linalg.svdvals(before.double())[0]), rel=1e-6)
    m.scale_(factor)
    torch.testing.assert_close(m.weight.detach(), factor * before, atol=1e-6, rtol=1e-5)
    assert (m.rank, m.effective_params) == (rank, params)


# -- re-orthogonalisation ------------------------------------------------------------------

def _drifted(m: LowRankSTR, prune_to_rank, r: int) -> LowRankSTR:
    """Perturb A, σ, B (as training does) and raise the threshold to keep rank r."""
    with torch.no_grad():
        m.A.add_(0.3 * torch.randn_like(m.A))
        m.B.add_(0.3 * torch.randn_like(m.B))
        m.sigma.mul_(1 + 0.5 * torch.rand_like(m.sigma))
        m.sigma[0].neg_()  # a negative gain: reorthogonalize must move the sign into A
    return prune_to_rank(m, r)


@pytest.mark.parametrize("init", ["svd", "gate"])
@pytest.mark.parametrize("r", [0, 2, 5])
def test_reorthogonalize_is_canonical_and_keeps_weight(init, r, prune_to_rank):
    m = _drifted(LowRankSTR(6, 8, init=init), prune_to_rank, r)
    before = m.weight.detach().clone()
    assert m.rank == r
    m.reorthogonalize()
    torch.testing.assert_close(m.weight.detach(), before, atol=1e-5, rtol=1e-5)
    assert m.rank == r
    eye = torch.eye(r)
    torch.testing.assert_close(m.A[:, :r].mT @ m.A[:, :r], eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.B[:, :r].mT @ m.B[:, :r], eye, atol=1e-5, rtol=0)
    gains = m.gains().detach()
    # the gains are M's singular values, descending, on the first r columns
    torch.testing.assert_close(gains[:r], torch.linalg.svdvals(before.double()).float()[:r], atol=1e-5, rtol=1e-5)
    assert (gains[:r].diff() <= 0).all() and (gains[r:] == 0).all()
    # the whole bases are orthonormal, so pruned columns stay well-scaled
    torch.testing.assert_close(m.A.mT @ m.A, torch.eye(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["fastgrnn", "lstm"])
def test_reorthogonalize_keeps_rnn_outputs(cell, prune_to_rank):
    rnn = RNN(cell, 4, 6, num_layers=2)
    for i, layer in enumerate(rnn.layers):
        _drifted(layer.W, prune_to_rank, 2 + i)
        _drifted(layer.U, prune_to_rank, 3)
    x = torch.randn(3, 5, 4)
    out, h_n = rnn(x)
    for layer in rnn.layers:
        layer.W.reorthogonalize()
        layer.U.reorthogonalize()
    out2, h_n2 = rnn(x)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_n2, h_n, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["A", "sigma", "B"])
def test_reorthogonalize_refuses_non_finite(name):
    m = LowRankSTR(4, 5)
    with torch.no_grad():
        getattr(m, name).view(-1)[0] = float("nan")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(FloatingPointError, match=name):
        m.reorthogonalize()
    for k, v in m.state_dict().items():
        assert torch.equal(v.isnan(), state[k].isnan())
        torch.testing.assert_close(v, state[k], equal_nan=True, atol=0, rtol=0)


# -- construction and bad input ------------------------------------------------------------

@pytest.mark.parametrize("kind, cls", [("dense", Dense), ("fixed", FixedRank), ("str", LowRankSTR),
                                       ("sparse", SparseSTR)])
def test_make_matrix_kinds(kind, cls):
    w = torch.randn(6, 4)
    m = make_matrix(kind, 4, 6, rank=4, weight=w)
    assert type(m) is cls
    torch.testing.assert_close(m.weight, w, atol=1e-5, rtol=1e-5)
    assert f"rank={m.rank}/{m.max_rank}" in repr(m)


@pytest.mark.parametrize("make, error, match", [
    (lambda: FixedRank(4, 6, 5), ValueError, r"rank=5 .*\[0, 4\]"),
    (lambda: LowRankSTR(4, 6, max_rank=0), ValueError, r"max_rank=0"),
    (lambda: LowRankSTR(4, 6, max_rank=7), ValueError, r"max_rank=7"),
    (lambda: LowRankSTR(4, 6, init="random"), ValueError, r"init='random'"),
    (lambda: LowRankSTR(4, 6, g="tanh"), ValueError, r"g='tanh'"),
    (lambda: Dense(0, 6), ValueError, r"in_features=0"),
    (lambda: Dense(4, 6, weight=torch.randn(4, 6)), ValueError, r"\(4, 6\).*\(6, 4\)"),
    (lambda: Dense(4, 6, weight=torch.ones(6, 4, dtype=torch.int64)), TypeError, r"int64"),
    (lambda: make_matrix("lowrank", 4, 6), ValueError, r"matrix='lowrank'"),
    (lambda: make_matrix("fixed", 4, 6), ValueError, r"matrix='fixed' needs a rank"),
    (lambda: LowRankSTR(4, 6)(torch.randn(2, 5)), ValueError, r"5 features.*in_features=4"),
])
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()
