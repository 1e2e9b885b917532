"""Datasets for keyword spotting and activity recognition.

One entry point, :func:`load`, used by the library, the CLI and the experiment drivers::

    ds = load("har2", "train")            # HAPT-built windows, no download needed
    x, y = ds[0]                          # x: float32 [T, F], y: int
    ds.classes, ds.targets                # class names, int labels (file order kept)

Every dataset returns un-normalised features; normalisation with training-split
statistics lives in the model (see :mod:`str_rnn.features`), so inference applies the
same transform. Variable-length items keep their true length; batch them with
:func:`pad_collate`, which returns ``(x [B, T_max, F], lengths [B], y [B])``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

TASKS = ("kws12", "kws35", "fsdd", "har2", "har6")
SPLITS = ("train", "val", "test")


def data_home() -> Path:
    """Folder where datasets live by default: ``$STR_RNN_DATA`` or ``./data``."""
    return Path(os.environ.get("STR_RNN_DATA", "data")).expanduser()


def pad_collate(batch):
    """Batch ``(x [T_i, F], y)`` items of varying length.

    Sequences are padded with zeros *at the end*; the true lengths are returned so a
    model reads out at each sequence's last real step (padding at the end and reading the
    last padded state leaves a model at chance on FSDD).

    Returns:
        ``(x [B, T_max, F] float32, lengths [B] int64, y [B] int64)``
    """
    xs = [torch.as_tensor(x, dtype=torch.float32) for x, _ in batch]
    lengths = torch.tensor([x.shape[0] for x in xs], dtype=torch.int64)
    x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
    y = torch.tensor([int(t) for _, t in batch], dtype=torch.int64)
    return x, lengths, y


def load(task: str, split: str, root: str | os.PathLike | None = None, **options):
    """Load ``split`` of ``task`` as a torch ``Dataset``.

    Args:
        task: one of ``kws12 | kws35 | fsdd | har2 | har6``.
        split: one of ``train | val | test``. Where a dataset has no official validation
            split, a deterministic one is carved from train (by speaker or volunteer).
        root: dataset folder; ``None`` means the embedded default (HAPT-built windows for
            HAR, the synthetic speech-commands corpus for kws12/kws35, ``data/fsdd``).
        **options: feature options (see :class:`str_rnn.features.FeatureConfig`) and
            loader options (``seed``, ``strict``, ``augment``, ...).

    Raises:
        ValueError: unknown task or split.
        FileNotFoundError: the root folder is missing (the message names the command
            that gets the data).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if task in ("har2", "har6"):
        from .har import load_har

        return load_har(task, split, root, **options)
    if task == "fsdd":
        from .fsdd import load_fsdd

        return load_fsdd(split, root, **options)
    from .speech_commands import load_speech_commands

    return load_speech_commands(task, split, root, **options)
