"""Shared fixtures of the core-library tests: a fixed seed, pruning a matrix to a rank, and
the time loops an RNN can take."""
from __future__ import annotations

import math

import pytest
import torch

from str_rnn.lowrank import LowRankSTR

# tiny shapes: thread start-up would cost more than it saves, and the machine is shared
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def prune_to_rank():
    """``prune(m, r)``: raise the threshold of a ``LowRankSTR`` so that exactly its ``r``
    largest ``|σ|`` stay active (midway between the r-th and (r+1)-th), in place."""

    @torch.no_grad()
    def prune(m: LowRankSTR, r: int) -> LowRankSTR:
        mags = m.sigma.abs().sort(descending=True).values.double()
        if r == 0:
            cut = mags[0] * 1.5
        elif r == len(mags):
            cut = mags[-1] / 2
        else:
            cut = (mags[r - 1] + mags[r]) / 2
        # invert g: exp -> log, sigmoid -> logit
        s = math.log(cut) if m.threshold.g == "exp" else math.log(cut / (1 - cut))
        m.threshold.s.fill_(s)
        assert m.rank == r
        return m

    return prune


@pytest.fixture(params=["reference", "fused", "fused_nograd", "infer"])
def rnn_path(request):
    """The time loop an ``RNN`` takes: ``(fused flag, grad context, batch size)``.

    ``reference`` is the plain autograd loop (``fused=False``); ``fused`` the hand-written
    backward (gradients on); ``fused_nograd`` its kernels under ``no_grad`` (batch above
    :data:`str_rnn.infer.MAX_BATCH`); ``infer`` the lean NumPy loop (small batch, no grad).
    """
    from str_rnn.infer import MAX_BATCH

    fused, grad, batch = {"reference": (False, True, 3), "fused": (True, True, 3),
                          "fused_nograd": (True, False, MAX_BATCH + 2), "infer": (True, False, 3)}[request.param]
    return fused, (torch.enable_grad if grad else torch.no_grad), batch
