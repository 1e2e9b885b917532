"""The STR operator S_g(w, s) = sign(w) relu(|w| - g(s)), its gradients, and rank learning."""
from __future__ import annotations

import math

import pytest
import torch

from str_rnn import LowRankSTR, Threshold, param_groups, soft_threshold

G_PRIME = {  # g'(s) for the two threshold functions
    "exp": torch.exp,
    "sigmoid": lambda s: torch.sigmoid(s) * (1 - torch.sigmoid(s)),
}


def test_soft_threshold_values():
    w = torch.tensor([-2.0, -0.5, -0.1, 0.0, 0.1, 0.3, 1.5])
    out = soft_threshold(w, 0.3)
    expected = torch.tensor([-1.7, -0.2, 0.0, 0.0, 0.0, 0.0, 1.2])
    torch.testing.assert_close(out, expected)
    # entries with |w| <= threshold are exactly zero, not merely small
    assert (out[2:6] == 0).all()


@pytest.mark.parametrize("g", ["exp", "sigmoid"])
@pytest.mark.parametrize("s_init", [-10.0, -1.0, 0.5])
def test_threshold_module(g, s_init):
    t = Threshold(g, s_init)
    assert isinstance(t.s, torch.nn.Parameter) and t.s.shape == ()
    expected = math.exp(s_init) if g == "exp" else 1 / (1 + math.exp(-s_init))
    assert t().item() == pytest.approx(expected, rel=1e-6)
    assert f"g={g}" in repr(t)


@pytest.mark.parametrize("g", ["exp", "sigmoid"])
def test_soft_threshold_gradients_analytic(g):
    """d/dw = 1 on |w| > g(s), 0 elsewhere; d/ds = -sign(w) g'(s) on the active part."""
    t = Threshold(g, s_init=-1.0)
    w = torch.tensor([-1.5, -0.4, -0.2, 0.05, 0.25, 0.9, 2.0], requires_grad=True)
    weights = torch.arange(1.0, 8.0)  # a loss that weighs each entry differently
    (soft_threshold(w, t()) * weights).sum().backward()
    gs = t().detach()
    active = w.detach().abs() > gs
    assert 0 < active.sum() < len(w), "the test needs both pruned and active entries"
    torch.testing.assert_close(w.grad, torch.where(active, weights, torch.zeros(())))
    expected_ds = (-torch.sign(w.detach()) * weights * active).sum() * G_PRIME[g](t.s.detach())
    torch.testing.assert_close(t.s.grad, expected_ds)


@pytest.mark.parametrize("g", ["exp", "sigmoid"])
def test_soft_threshold_gradients_finite_differences(g):
    # float64, entries away from the kinks |w| = g(s)
    s = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([-1.3, -0.9, -0.1, 0.02, 0.15, 0.8, 1.7], dtype=torch.float64, requires_grad=True)
    fn = {"exp": torch.exp, "sigmoid": torch.sigmoid}[g]
    assert torch.autograd.gradcheck(lambda w, s: soft_threshold(w, fn(s)), (w, s))


def test_no_straight_through():
    """Pruned entries receive exactly zero loss gradient (no straight-through estimator)."""
    w = torch.randn(50, requires_grad=True)
    out = soft_threshold(w, 0.5)
    (out * torch.randn(50)).sum().backward()
    pruned = w.detach().abs() <= 0.5
    assert pruned.any()
    assert (w.grad[pruned] == 0).all()
    assert (w.grad[~pruned] != 0).all()


def test_unknown_threshold_function():
    with pytest.raises(ValueError, match="g='relu'"):
        Threshold("relu")


def _fit_rank(decay: float, steps: int = 300) -> tuple[int, int, float]:
    """Fit a LowRankSTR to a target whose spectrum has 2 large and 6 small values by SGD
    with L2 decay ``decay`` on every parameter (A, B, σ and s); return
    (rank, max_rank, squared error)."""
    torch.manual_seed(0)
    q1 = torch.linalg.qr(torch.randn(8, 8))[0]
    q2 = torch.linalg.qr(torch.randn(8, 8))[0]
    target = q1 @ torch.diag(torch.tensor([3.0, 2.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1])) @ q2.T
    m = LowRankSTR(8, 8)
    opt = torch.optim.SGD(param_groups(m, weight_decay=decay), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        ((m.weight - target) ** 2).sum().backward()
        opt.step()
    return m.rank, m.max_rank, float(((m.weight.detach() - target) ** 2).sum())


def test_rank_falls_with_large_decay_and_stays_full_without():
    rank0, k, err0 = _fit_rank(0.0)
    assert rank0 == k == 8
    assert err0 < 0.05  # λ = 0 fits the full-rank target (initial error ≈ 16)
    rank_big, k, _ = _fit_rank(0.5)
    # decay pulls s towards 0 (threshold up) and shrinks σ: only the two large
    # directions of the target are worth their decay
    assert rank_big == 2


def test_rank_falls_with_adamw_decoupled_decay():
    """The recipe of the experiments: AdamW on the groups of ``param_groups``."""
    ranks = {}
    for lam in (0.0, 2.0):
        torch.manual_seed(0)
        target = torch.randn(8, 3) @ torch.randn(3, 8) / 3 + 0.05 * torch.randn(8, 8)
        m = LowRankSTR(8, 8)
        opt = torch.optim.AdamW(param_groups(m, 0.0, threshold_decay=lam, spectrum_decay=lam), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            ((m.weight - target) ** 2).sum().backward()
            opt.step()
        ranks[lam] = m.rank
    assert ranks[0.0] == 8
    assert ranks[2.0] < 8
