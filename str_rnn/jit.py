"""Optional compiled kernels: the numba-backed modules of this package, loaded on first use.

:mod:`str_rnn.fused_kernels` (training steps) and :mod:`str_rnn.kernels` (batch-small
inference) need numba; everything they speed up also runs without it, as torch or NumPy
operations. One loader decides for both whether the compiled code can be used.
"""
from __future__ import annotations

import functools
import importlib


@functools.cache
def load(name: str):
    """The module ``str_rnn.<name>`` of numba kernels, or ``None`` where it cannot be used.

    ``None`` when numba is missing or unusable with this NumPy (``ImportError``), or when
    numba finds no writable folder for its on-disk cache (``RuntimeError``, raised as the
    kernels are defined). numba is imported first, by itself, so that a missing numba is
    seen even where the kernel module was imported before. Cached: numba takes about
    0.3 s to import.
    """
    try:
        importlib.import_module("numba")
        return importlib.import_module(f"{__package__}.{name}")
    except (ImportError, RuntimeError):
        return None
