"""A sequence classifier: input standardisation, an :class:`~str_rnn.rnn.RNN`, a linear head."""
from __future__ import annotations

import torch
from torch import nn

from .rnn import RNN


class SequenceClassifier(nn.Module):
    """``logits = Linear(h_last)`` where ``h_last`` is the top layer's state at each
    sequence's last *real* step.

    Inputs are standardised with ``(x - mean) / std`` held as buffers (training-split
    statistics), so a saved model applies the same transform at inference.

    Args:
        rnn: the recurrent layer (``batch_first=True``).
        num_classes: outputs of the linear head.
        mean, std: per-feature statistics ``[input_size]`` (default 0 and 1).

    Raises:
        ValueError: ``rnn`` is not batch-first, ``num_classes < 2``, or ``mean``/``std``
            are not ``[input_size]`` (finite, ``std > 0``).
    """

    def __init__(self, rnn: RNN, num_classes: int, *, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None):
        super().__init__()
        if not rnn.batch_first:
            raise ValueError("rnn: expected batch_first=True")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r}: expected an integer >= 2")
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, num_classes)
        f = rnn.input_size
        mean = torch.zeros(f) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(f) if std is None else torch.as_tensor(std, dtype=torch.float32)
        # checked here: a wrong shape would broadcast silently or fail far away in forward
        for name, value in (("mean", mean), ("std", std)):
            if tuple(value.shape) != (f,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}; expected (input_size,) = ({f},)")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"mean must be finite and std positive and finite; got std min {float(std.min()):.3g}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T, F]``, optional true ``lengths [B]`` -> logits ``[B, num_classes]``."""
        x = (x - self.mean) / self.std
        _, h_n = self.rnn(x, lengths=lengths)
        h = h_n[0] if isinstance(h_n, tuple) else h_n
        return self.head(h[-1])

    def spec(self) -> dict:
        return {"type": "SequenceClassifier", "num_classes": self.head.out_features, "rnn": self.rnn.spec()}
