"""Matrix parameterisations used for the input (W) and recurrent (U) matrices of a cell.

Every parameterisation is an ``nn.Module`` holding an ``out x in`` matrix ``M`` with

* ``weight``: the dense matrix ``M`` (a tensor, differentiable),
* ``rank`` / ``max_rank``: the current rank of ``M`` and the largest it can have,
* ``forward(x) = x @ M.T``, computed the cheap way (see :meth:`Matrix.chain`),
* ``effective_params``: the number of floats a compacted copy holds,
* ``scale_(factor)``: ``M <- factor · M`` in place, keeping the rank (``spectral_norm()`` is ``‖M‖₂``),
* ``from_dense(weight)``: a classmethod reproducing a given matrix,
* ``spec()``: the JSON-able constructor arguments (see :mod:`str_rnn.serialize`).

The four kinds:

========================  =============================================  ==============
class                     M                                              rank
========================  =============================================  ==============
:class:`Dense`            a free ``out x in`` matrix                     full
:class:`FixedRank`        ``W1 @ W2`` (EdgeML's low-rank cells)          fixed ``r``
:class:`LowRankSTR`       ``A · diag(S_g(σ, s)) · Bᵀ``                    nnz of S_g(σ, s)
:class:`SparseSTR`        ``S_g(W, s)`` element-wise (unstructured)      numerical rank
:class:`FixedSparse`      given values at fixed positions                numerical rank
========================  =============================================  ==============

``FixedRank`` and ``FixedSparse`` are what :func:`str_rnn.compact` turns ``LowRankSTR`` and
``SparseSTR`` into once training has fixed the rank / the nonzero pattern.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .threshold import Threshold, soft_threshold


def default_init(out_features: int, in_features: int, *, generator=None) -> torch.Tensor:
    """``U(-1/sqrt(in), 1/sqrt(in))``, the initialisation of ``torch.nn.Linear``'s weight."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound


def _check_sizes(in_features, out_features):
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")


def _check_weight(weight, in_features, out_features):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got {type(weight).__name__} "
                         f"of shape {tuple(getattr(weight, 'shape', ()))}")
    if tuple(weight.shape) != (out_features, in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (out_features, in_features) "
                         f"= ({out_features}, {in_features})")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor, got {weight.dtype}")


def _svd(weight: torch.Tensor):
    """Thin SVD in float64 (accuracy of ``from_dense`` and ``reorthogonalize``)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return u, s, vh.mT


class Matrix(nn.Module):
    """Base class: an ``out_features x in_features`` matrix applied as ``x @ M.T``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        _check_sizes(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features

    # -- to be provided by subclasses -------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def rank(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def effective_params(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features}

    def scale_(self, factor: float) -> None:  # pragma: no cover - abstract
        """``M <- factor · M`` in place, exactly, for ``factor > 0`` (rank and pattern unchanged)."""
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------
    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def chain(self, max_cost: float = 1.0) -> list[torch.Tensor]:
        """Matrices ``(C_1, ..., C_n)`` with ``x @ C_1 @ ... @ C_n == x @ M.T``.

        The default is the dense transpose; factored kinds return their active factors
        when those cost fewer than ``max_cost`` times the dense matrix's multiply-adds
        (below 1 where thin matmuls run slower per operation than one dense one). A
        sequence layer calls this once per forward pass and reuses the result at every
        time step.
        """
        return [self.weight.mT]

    def _factored(self, rank: int, max_cost: float) -> bool:
        """Whether rank-``rank`` factors cost under ``max_cost`` times the dense product."""
        return rank * (self.in_features + self.out_features) < max_cost * self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; "
                             f"expected in_features={self.in_features}")
        for c in self.chain():
            x = x @ c
        return x

    @torch.no_grad()
    def spectral_norm(self) -> float:
        """``‖M‖₂``, the largest singular value of ``M``."""
        return float(torch.linalg.matrix_norm(self.weight.detach().double(), ord=2))

    def flops(self) -> int:
        """Floating-point operations (2 per multiply-add) of one matrix-vector product."""
        return 2 * sum(c.shape[0] * c.shape[1] for c in self.chain())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}/{self.max_rank}"


class Dense(Matrix):
    """A free dense matrix ``M = weight`` (full rank)."""

    def __init__(self, in_features: int, out_features: int, *, weight: torch.Tensor | None = None):
        super().__init__(in_features, out_features)
        if weight is None:
            weight = default_init(out_features, in_features)
        _check_weight(weight, in_features, out_features)
        self._weight = nn.Parameter(weight.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        return self._weight

    @property
    def rank(self) -> int:
        return self.max_rank

    @property
    def effective_params(self) -> int:
        return self.in_features * self.out_features

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        self._weight.mul_(factor)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, **kwargs) -> "Dense":
        return cls(weight.shape[1], weight.shape[0], weight=weight, **kwargs)


class FixedRank(Matrix):
    """``M = W1 @ W2`` with ``W1: out x r`` and ``W2: r x in`` (no threshold).

    The "vanilla" low-rank baseline of the STR paper (EdgeML's low-rank cells). When built
    from an initial dense matrix, the factors are its rank-``r`` truncated SVD with the
    singular values rescaled so that ``M`` keeps the dense matrix's Frobenius norm (the
    same entry spread), split evenly between ``W1`` and ``W2``.

    ``rank=0`` is allowed: ``M = 0`` with empty factors and no parameters (what learned rank
    reaches when it prunes a matrix away, e.g. the recurrent ``U`` of a small FastGRNN), so
    such an allocation can also be trained as a fixed-rank baseline.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, weight: torch.Tensor | None = None,
                 preserve_scale: bool = True):
        super().__init__(in_features, out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank={rank!r} out of range for a {out_features}x{in_features} matrix; "
                             f"expected an integer in [0, {self.max_rank}]")
        self._rank = rank
        if weight is None:
            weight = default_init(out_features, in_features)
        _check_weight(weight, in_features, out_features)
        u, s, v = _svd(weight)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
        if preserve_scale and s.norm() > 0:
            s = s * (torch.linalg.matrix_norm(weight.double()) / s.norm())
        root = s.sqrt()
        self.W1 = nn.Parameter((u * root).float())
        self.W2 = nn.Parameter((v * root).mT.contiguous().float())

    @property
    def weight(self) -> torch.Tensor:
        return self.W1 @ self.W2

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def effective_params(self) -> int:
        return self._rank * (self.in_features + self.out_features)

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        self.W1.mul_(factor)

    def chain(self, max_cost: float = 1.0) -> list[torch.Tensor]:
        if self._factored(self._rank, max_cost):
            return [self.W2.mT, self.W1.mT]
        return [self.weight.mT]

    def spec(self) -> dict:
        return {**super().spec(), "rank": self._rank}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, rank: int | None = None) -> "FixedRank":
        """Best rank-``rank`` approximation of ``weight`` (exact when ``rank`` >= its rank).

        ``rank=None`` keeps the numerical rank of ``weight``.
        """
        if rank is None:
            # tolerance of weight's own dtype: in float64, float32 round-off counts as rank
            rank = int(torch.linalg.matrix_rank(weight.detach()))
        return cls(weight.shape[1], weight.shape[0], rank, weight=weight, preserve_scale=False)

    @classmethod
    def from_factors(cls, w1: torch.Tensor, w2: torch.Tensor) -> "FixedRank":
        """A fixed-rank matrix holding exactly ``M = w1 @ w2``."""
        m = cls(w2.shape[1], w1.shape[0], w1.shape[1])
        with torch.no_grad():
            m.W1.copy_(w1)
            m.W2.copy_(w2)
        return m


class LowRankSTR(Matrix):
    """Learned-rank matrix ``M = A · diag(S_g(σ, s)) · Bᵀ``.

    ``A: out x k``, ``σ: k``, ``B: in x k`` with ``k = min(out, in, max_rank)``; the rank of
    ``M`` is the number of nonzero entries of ``S_g(σ, s) = sign(σ) relu(|σ| - g(s))``,
    which falls during training as the threshold ``g(s)`` grows past entries of ``σ``.
    Soft-thresholding singular values is the proximal operator of the nuclear norm.

    Args:
        in_features, out_features: matrix shape is ``out x in``.
        init: ``"svd"``: ``A, σ, B`` from the SVD of the initial dense matrix (σ are its
            singular values); ``"gate"``: the paper's form, σ = 1 and ``A, B`` the SVD
            factors scaled by ``sqrt(singular values)`` each. Both reproduce the initial
            dense matrix exactly, so training starts at the dense cell's scale.
        g: threshold function, ``"exp"`` or ``"sigmoid"``.
        s_init: initial threshold parameter (``g = exp``, ``s = -10`` gives 4.5e-5).
        max_rank: cap on ``k`` (truncated SVD of the initial matrix).
        weight: initial dense matrix (default: ``torch.nn.Linear``'s initialisation).
        preserve_scale: when ``max_rank`` truncates the SVD, rescale the kept singular
            values so that ``M`` keeps the Frobenius norm of ``weight`` (the entry spread of
            the dense cell), as :class:`FixedRank` does; :meth:`from_dense` turns it off
            to get the best rank-``max_rank`` approximation instead.
    """

    def __init__(self, in_features: int, out_features: int, *, init: str = "svd", g: str = "exp",
                 s_init: float = -10.0, max_rank: int | None = None, weight: torch.Tensor | None = None,
                 preserve_scale: bool = True):
        super().__init__(in_features, out_features)
        if init not in ("svd", "gate"):
            raise ValueError(f"init={init!r}: expected 'svd' or 'gate'")
        full = min(in_features, out_features)
        if max_rank is None:
            max_rank = full
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or not 1 <= max_rank <= full:
            raise ValueError(f"max_rank={max_rank!r} out of range for a {out_features}x{in_features} matrix; "
                             f"expected an integer in [1, {full}]")
        self._k = max_rank
        self.init = init
        if weight is None:
            weight = default_init(out_features, in_features)
        _check_weight(weight, in_features, out_features)
        u, s, v = _svd(weight)
        u, s, v = u[:, :max_rank], s[:max_rank], v[:, :max_rank]
        if preserve_scale and s.norm() > 0:
            # a truncated start would be smaller than the dense cell's (see FixedRank)
            s = s * (torch.linalg.matrix_norm(weight.double()) / s.norm())
        self.threshold = Threshold(g, s_init)
        g_s = self.threshold().detach().double()
        if init == "svd":
            # shift σ by the initial threshold so that S_g(σ, s) equals the singular values
            a, sigma, b = u, s + g_s, v
        else:
            root = s.sqrt()
            a, sigma, b = u * root, torch.ones_like(s) + g_s, v * root
        self.A = nn.Parameter(a.float().contiguous())
        self.sigma = nn.Parameter(sigma.float())
        self.B = nn.Parameter(b.float().contiguous())

    @property
    def max_rank(self) -> int:
        return self._k

    def gains(self) -> torch.Tensor:
        """The thresholded spectrum ``S_g(σ, s)`` (length ``k``)."""
        return soft_threshold(self.sigma, self.threshold())

    @property
    def weight(self) -> torch.Tensor:
        return (self.A * self.gains()) @ self.B.mT

    @property
    def rank(self) -> int:
        return int((self.gains() != 0).sum())

    @property
    def effective_params(self) -> int:
        return min(self.rank * (self.in_features + self.out_features), self.in_features * self.out_features)

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        # through A, not σ: the gains S_g(σ, s) and so the rank and the threshold's meaning stay
        self.A.mul_(factor)

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` with ``M = L @ Rᵀ`` over the active columns only: ``L = A[:, nz] * S_g(σ, s)[nz]``."""
        gains = self.gains()
        nz = (gains != 0).nonzero().squeeze(1)
        if nz.numel() == self._k:
            return self.A * gains, self.B
        return self.A[:, nz] * gains[nz], self.B[:, nz]

    def chain(self, max_cost: float = 1.0) -> list[torch.Tensor]:
        left, right = self.active_factors()
        # Pruned columns get no loss gradient (relu), so dropping them is exact; the
        # dense product is cheaper once r (out + in) exceeds max_cost * out * in.
        if self._factored(left.shape[1], max_cost):
            return [right, left.mT]
        return [right @ left.mT]

    @torch.no_grad()
    def reorthogonalize(self) -> None:
        """Re-factor the current ``M`` by SVD in place, leaving ``M`` unchanged.

        Afterwards ``A`` and ``B`` have orthonormal columns and ``S_g(σ, s)`` holds the
        singular values of ``M`` (σ = singular value + g(s) on the active part, 0 on the
        pruned part), so σ is canonical again after ``A`` and ``B`` drifted.

        Raises:
            FloatingPointError: a factor or the threshold is not finite (nothing changed).
        """
        for name, p in (("A", self.A), ("sigma", self.sigma), ("B", self.B), ("threshold.s", self.threshold.s)):
            if not torch.isfinite(p).all():
                raise FloatingPointError(f"reorthogonalize: {name} holds non-finite values; refusing to "
                                         "propagate them into the factors and the threshold")
        left, right = self.active_factors()
        r = left.shape[1]
        g_s = self.threshold().double()
        a = torch.zeros_like(self.A, dtype=torch.float64)
        b = torch.zeros_like(self.B, dtype=torch.float64)
        sigma = torch.zeros_like(self.sigma, dtype=torch.float64)
        if r > 0:
            # SVD of L Rᵀ through the small r x r core: L = Q_l R_l, R = Q_r R_r.
            ql, rl = torch.linalg.qr(left.double())
            qr, rr = torch.linalg.qr(right.double())
            uc, sc, vch = torch.linalg.svd(rl @ rr.mT)
            a[:, :r] = ql @ uc
            b[:, :r] = qr @ vch.mT
            sigma[:r] = sc + g_s
            # a zero singular value would sit exactly on the threshold: keep it pruned
            sigma[:r][sc == 0] = 0.0
        # complete A and B to orthonormal bases so pruned columns stay well-scaled
        for mat in (a, b):
            if r < mat.shape[1]:
                fill = torch.randn(mat.shape[0], mat.shape[1] - r, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(r))
                fill -= mat[:, :r] @ (mat[:, :r].mT @ fill)
                mat[:, r:] = torch.linalg.qr(fill)[0]
        self.A.copy_(a)
        self.B.copy_(b)
        self.sigma.copy_(sigma)

    def spec(self) -> dict:
        return {**super().spec(), "max_rank": self._k, "g": self.threshold.g, "init": self.init}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, **kwargs) -> "LowRankSTR":
        """``A, σ, B`` from the SVD of ``weight``; reproduces it exactly (``init="svd"``).

        With ``max_rank=r`` below the rank of ``weight`` it holds the best rank-``r``
        approximation (no rescaling).
        """
        kwargs.setdefault("init", "svd")
        kwargs.setdefault("preserve_scale", False)
        return cls(weight.shape[1], weight.shape[0], weight=weight, **kwargs)


class _Sparse(Matrix):
    """Shared accounting of the unstructured kinds: costs its nonzeros ``nnz``."""

    @property
    def nnz(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def rank(self) -> int:
        return int(torch.linalg.matrix_rank(self.weight.detach()))

    @property
    def effective_params(self) -> int:
        return self.nnz

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz}/{self.in_features * self.out_features}"


class SparseSTR(_Sparse):
    """Element-wise STR on a dense matrix: ``M = S_g(W, s)`` (unstructured sparsity)."""

    def __init__(self, in_features: int, out_features: int, *, g: str = "exp", s_init: float = -10.0,
                 weight: torch.Tensor | None = None):
        super().__init__(in_features, out_features)
        if weight is None:
            weight = default_init(out_features, in_features)
        _check_weight(weight, in_features, out_features)
        self.threshold = Threshold(g, s_init)
        with torch.no_grad():
            # shift magnitudes by the initial threshold so that S_g(W, s) == weight at start
            shifted = torch.sign(weight) * (weight.abs() + self.threshold())
        self.raw = nn.Parameter(shifted.detach().float())

    @property
    def weight(self) -> torch.Tensor:
        return soft_threshold(self.raw, self.threshold())

    @property
    def nnz(self) -> int:
        return int((self.weight != 0).sum())

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        # |M_ij| = |raw_ij| - τ on the kept entries: scale that excess, leave pruned ones below τ
        tau = self.threshold().detach()
        kept = self.raw.abs() > tau
        self.raw.copy_(torch.where(kept, self.raw.sign() * (factor * (self.raw.abs() - tau) + tau), self.raw))

    def spec(self) -> dict:
        return {**super().spec(), "g": self.threshold.g}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, **kwargs) -> "SparseSTR":
        return cls(weight.shape[1], weight.shape[0], weight=weight, **kwargs)


class FixedSparse(_Sparse):
    """A matrix whose nonzeros sit at fixed positions: ``M[indices[0], indices[1]] = values``.

    The compacted form of :class:`SparseSTR` (and of a :class:`LowRankSTR` pruned to rank 0,
    with no nonzeros at all). Only ``values`` are parameters, so ``effective_params`` is the
    number of nonzeros, the count STR reports; the positions are an int64 buffer that the
    4-bytes-per-parameter size convention does not count.

    Args:
        in_features, out_features: matrix shape is ``out x in``.
        nnz: number of stored entries when ``weight`` is not given (zeros at position
            ``(0, 0)``; :func:`str_rnn.load` then fills values and positions).
        weight: a dense matrix whose nonzero entries are kept.
    """

    def __init__(self, in_features: int, out_features: int, nnz: int | None = None, *,
                 weight: torch.Tensor | None = None):
        super().__init__(in_features, out_features)
        if weight is not None:
            _check_weight(weight, in_features, out_features)
            indices = weight.detach().nonzero().mT
            if nnz is not None and nnz != indices.shape[1]:
                raise ValueError(f"nnz={nnz!r} but weight has {indices.shape[1]} nonzeros")
            values = weight.detach()[indices[0], indices[1]]
        else:
            size = in_features * out_features
            if not isinstance(nnz, int) or isinstance(nnz, bool) or not 0 <= nnz <= size:
                raise ValueError(f"nnz={nnz!r} out of range for a {out_features}x{in_features} matrix; "
                                 f"expected an integer in [0, {size}] (or a weight)")
            indices = torch.zeros(2, nnz, dtype=torch.int64)
            values = torch.zeros(nnz)
        self.register_buffer("indices", indices.contiguous())
        self.values = nn.Parameter(values.float())

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        self.values.mul_(factor)

    @property
    def weight(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.out_features, self.in_features)
        return dense.index_put((self.indices[0], self.indices[1]), self.values)

    def spec(self) -> dict:
        return {**super().spec(), "nnz": self.nnz}

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "FixedSparse":
        return cls(weight.shape[1], weight.shape[0], weight=weight)


MATRIX_KINDS = {"dense": Dense, "fixed": FixedRank, "str": LowRankSTR, "sparse": SparseSTR}


def make_matrix(kind: str, in_features: int, out_features: int, *, rank: int | None = None,
                weight: torch.Tensor | None = None, **kwargs) -> Matrix:
    """Build a matrix of ``kind`` (``dense | fixed | str | sparse``) from an initial dense ``weight``.

    ``rank`` is required for ``fixed`` and is the ``max_rank`` cap for ``str``.
    Threshold options (``init``, ``g``, ``s_init``) only apply to ``str`` and ``sparse``.
    """
    if kind not in MATRIX_KINDS:
        raise ValueError(f"matrix={kind!r} is not a matrix kind; expected one of {', '.join(MATRIX_KINDS)}")
    if kind == "fixed":
        if rank is None:
            raise ValueError("matrix='fixed' needs a rank (rank_w / rank_u)")
        return FixedRank(in_features, out_features, rank, weight=weight)
    if kind == "dense":
        return Dense(in_features, out_features, weight=weight)
    if kind == "sparse":
        kwargs.pop("init", None)
        return SparseSTR(in_features, out_features, weight=weight, **kwargs)
    return LowRankSTR(in_features, out_features, weight=weight, max_rank=rank, **kwargs)
