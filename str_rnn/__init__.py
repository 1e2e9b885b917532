"""str_rnn: recurrent networks whose ranks are learned with Soft Threshold Reparameterization.

Library surface::

    from str_rnn import RNN, compact, from_torch, ranks, count_params, summary
"""
from .accounting import count_params, flops, matrices, model_size_bytes, ranks, summary, thresholds
from .cells import CELLS, FastGRNNCell, FastRNNCell, GRUCell, LSTMCell, RNNCell
from .convert import compact, from_torch
from .lowrank import Dense, FixedRank, FixedSparse, LowRankSTR, Matrix, SparseSTR, make_matrix
from .models import SequenceClassifier
from .optim import param_groups
from .rnn import RNN
from .serialize import build, load, save
from .threshold import Threshold, soft_threshold

__version__ = "0.1.0"

__all__ = [
    "RNN", "RNNCell", "FastGRNNCell", "FastRNNCell", "LSTMCell", "GRUCell", "CELLS",
    "Matrix", "Dense", "FixedRank", "FixedSparse", "LowRankSTR", "SparseSTR", "make_matrix",
    "Threshold", "soft_threshold", "SequenceClassifier",
    "from_torch", "compact", "save", "load", "build",
    "ranks", "thresholds", "matrices", "count_params", "model_size_bytes", "flops", "summary",
    "param_groups",
]
