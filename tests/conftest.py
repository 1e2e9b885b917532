"""Shared fixtures of the core-library tests: a fixed seed and a way to prune a matrix."""
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
