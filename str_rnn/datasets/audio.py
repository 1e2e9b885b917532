"""Reading and validating mono WAV files, and the feature dataset the speech loaders return.

Speech corpora collected from volunteers contain a few bad files: zero-byte uploads,
files cut off mid-transfer, the odd stereo recording. A loader should neither die on the
first one after minutes of work nor hide them, so the policy here is:

- :func:`read_wav` raises :class:`AudioError` (a ``ValueError``) naming the file, what is
  wrong and what was expected;
- callers that read many files collect ``(file, reason)`` pairs and either raise at once
  (``strict=True``) or skip the file and end with one warning that counts and names
  every skipped file (:func:`warn_skipped`).

Plain 16-bit PCM WAV (every file of Speech Commands, FSDD and the synthetic corpus) is
parsed here directly: the whole file in one read, the RIFF chunks walked in Python, the
samples one ``np.frombuffer``. That is several times faster than libsndfile for
one-second clips (which costs ~130 us a file here) and detects a truncated data chunk,
which libsndfile silently accepts. Every other format soundfile can read
(float WAV, 24-bit, WAVE_FORMAT_EXTENSIBLE, FLAC, ...) goes through :mod:`soundfile`,
where a truncated file is read as far as it goes.
"""
from __future__ import annotations

import hashlib
import os
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import data_home

_WAVE_FORMAT_PCM = 1
# How many skipped files a warning names before it says "and N more".
_NAMES_IN_WARNING = 10


class AudioError(ValueError):
    """An audio file that cannot be used: unreadable, truncated, empty or not mono."""


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a mono audio file as float32 samples in [-1, 1).

    Args:
        path: a WAV file (16-bit PCM on the fast path) or any other format soundfile reads.

    Returns:
        ``(wave [N] float32, sample_rate)`` with ``N >= 1``.

    Raises:
        FileNotFoundError: the file does not exist.
        AudioError: the file is empty, not a readable audio file, truncated (fewer
            samples than its header announces), has no samples, has more than one
            channel, or holds non-finite samples.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such audio file") from None
    if size == 0:
        raise AudioError(f"{path}: empty file (0 bytes), expected a mono WAV file")
    parsed = _read_pcm16(path)
    if parsed is None:
        parsed = _read_soundfile(path)
    samples, sample_rate, channels = parsed
    if channels != 1:
        raise AudioError(f"{path}: {channels} channels, expected mono (1 channel)")
    if samples.size == 0:
        raise AudioError(f"{path}: no samples (header says 0 frames), expected audio")
    if samples.dtype != np.int16 and not np.isfinite(samples).all():
        raise AudioError(f"{path}: non-finite samples (NaN or inf), expected finite audio")
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) * np.float32(1.0 / 32768.0)
    return samples, sample_rate


def _read_pcm16(path: Path) -> tuple[np.ndarray, int, int] | None:
    """Fast path for 16-bit PCM WAV; ``None`` when the file is something else.

    Walks the RIFF chunks of the whole file read at once (one system call; the
    standard-library ``wave`` module costs ~40 us a clip in Python-level reads).
    """
    raw = path.read_bytes()
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return None  # not RIFF/WAVE: soundfile decides (and words the error)
    pos, fmt = 12, None
    while pos + 8 <= len(raw):
        chunk_id = raw[pos:pos + 4]
        size = int.from_bytes(raw[pos + 4:pos + 8], "little")
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(raw):
                return None
            fmt = struct.unpack_from("<HHIIHH", raw, body)
        elif chunk_id == b"data":
            if fmt is None:
                return None
            tag, channels, sample_rate, _, _, bits = fmt
            if tag != _WAVE_FORMAT_PCM or bits != 16 or channels < 1:
                return None  # float, 24-bit, extensible, ...: soundfile reads those
            frame_bytes = 2 * channels
            if size > len(raw) - body:
                raise AudioError(
                    f"{path}: truncated, header announces {size // frame_bytes} frames but "
                    f"the file holds {(len(raw) - body) // frame_bytes}"
                )
            samples = np.frombuffer(raw, dtype="<i2", count=size // 2, offset=body)
            if channels > 1:
                samples = samples[: len(samples) // channels * channels].reshape(-1, channels)
            return samples, sample_rate, channels
        pos = body + size + (size & 1)  # chunks are padded to an even size
    return None


def _read_soundfile(path: Path) -> tuple[np.ndarray, int, int]:
    import soundfile as sf

    try:
        samples, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:  # libsndfile could not parse it
        raise AudioError(f"{path}: not a readable audio file ({err}), "
                         "expected a mono WAV") from None
    channels = samples.shape[1]
    return (samples[:, 0] if channels == 1 else samples), int(sample_rate), channels


def describe_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """One message that counts and names skipped files: ``"skipped 3 file(s): a (why), ..."``."""
    shown = [f"{name} ({reason})" for name, reason in skipped[:_NAMES_IN_WARNING]]
    more = len(skipped) - len(shown)
    tail = f"; and {more} more" if more > 0 else ""
    return f"skipped {len(skipped)} unusable audio file(s): " + "; ".join(shown) + tail


def warn_skipped(skipped: Sequence[tuple[str, str]], stacklevel: int = 3) -> None:
    """Emit one ``UserWarning`` for all skipped files (nothing when ``skipped`` is empty)."""
    if skipped:
        warnings.warn(describe_skipped(skipped), UserWarning, stacklevel=stacklevel)


def cache_location(name: str, folder: Path, cache: bool,
                   cache_dir: str | os.PathLike | None) -> dict:
    """``cached_features`` arguments of a corpus: its cache name (``name`` plus a digest of
    the resolved folder, so two corpora never share bundles) and the cache folder
    (``cache_dir``, default ``data_home() / "cache"``; ``None`` when ``cache`` is off)."""
    where = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:8]
    return {"dataset": f"{name}-{where}",
            "cache_dir": (cache_dir or data_home() / "cache") if cache else None}


def reason(err: Exception, path: str | os.PathLike) -> str:
    """The part of an error message after the file name (the name is listed separately)."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


class FeatureDataset(Dataset):
    """Feature sequences stored back to back, as the feature cache holds them.

    Item ``i`` is ``data[offsets[i]:offsets[i + 1]]``, so variable-length items cost no
    padding and loading a cached split is one array read.

    Args:
        data: float32 ``[sum_i T_i, F]`` frames of all items, concatenated in item order.
        offsets: int ``[N + 1]``, non-decreasing, ``offsets[0] == 0``,
            ``offsets[-1] == len(data)``.
        targets: int labels ``[N]`` in ``range(len(classes))``.
        classes: class names.
        files: one name per item (file path, or a description for generated items).

    Raises:
        ValueError: inconsistent shapes, offsets or labels.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray, targets: Sequence[int],
                 classes: Sequence[str], files: Sequence[str]):
        data = np.asarray(data, dtype=np.float32)
        offsets = np.asarray(offsets, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        n = len(targets)
        if data.ndim != 2:
            raise ValueError(f"data has shape {data.shape}, expected [frames, features]")
        if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(data):
            raise ValueError(
                f"offsets has shape {offsets.shape} and ends "
                f"{offsets[:1].tolist()}..{offsets[-1:].tolist()}, expected [{n + 1}] "
                f"running from 0 to {len(data)}"
            )
        if (np.diff(offsets) < 0).any():
            raise ValueError("offsets decrease somewhere, expected non-decreasing offsets")
        if len(files) != n:
            raise ValueError(f"{len(files)} file names for {n} items, expected one per item")
        if n and (targets.min() < 0 or targets.max() >= len(classes)):
            raise ValueError(
                f"labels span {targets.min()}..{targets.max()}, expected 0..{len(classes) - 1}"
            )
        self.data = data
        self.offsets = offsets
        self.targets = targets.tolist()
        self.classes = list(classes)
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        start, stop = self.offsets[index], self.offsets[index + 1]
        return torch.from_numpy(self.data[start:stop]), self.targets[index]

    @property
    def lengths(self) -> np.ndarray:
        """Frames per item ``[N]`` (true lengths, no padding)."""
        return np.diff(self.offsets)

    @property
    def num_features(self) -> int:
        return self.data.shape[1]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(items={len(self)}, classes={len(self.classes)}, "
                f"features={self.num_features}, frames={len(self.data)})")
