"""Log-mel and MFCC features: one clip, many clips in parallel, an on-disk cache, and
normalisation with training statistics stored in the model.

Recipe (per clip, waveform ``x`` in [-1, 1) at ``sample_rate``; defaults give the
Google-12 features of the FastGRNN / STR papers, 32 log-mel bands, 25 ms window,
10 ms hop, 1 s clips at 16 kHz -> 99 x 32)::

    x      = resample(x, sr -> sample_rate)                soxr "HQ", librosa's resampler
    x      = x cropped / zero-padded at the end to clip_seconds      (None: true length)
    frames = x[t*hop : t*hop + win],  t = 0..T-1                     (win = n_fft)
             center=False: T = 1 + ceil((N - win) / hop), the last partial frame zero-
                           padded (python_speech_features / EdgeML convention; 1 s gives
                           99 frames, plain librosa with center=False would give 98)
             center=True:  librosa's centring, x zero-padded by win//2 each side,
                           T = 1 + N // hop (1 s gives 101 frames)
    P      = |rfft(frames * hann_periodic(win))|^2                   [T, win//2 + 1]
    logmel = log(P @ M^T + log_offset)    M = librosa.filters.mel(sample_rate, win, n_mels)
    mfcc   = DCT-II(logmel, norm="ortho")[:, :n_mfcc]

The power spectrum equals ``librosa.feature.melspectrogram(center=False, n_fft=win)``
on the padded clip; the MFCC equals ``librosa.feature.mfcc`` of the same spectrum up to
librosa's dB scale factor 10 / ln 10. Frames of many clips are stacked and transformed in
one FFT and one matrix product, which is what makes 10,000 clips take seconds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Protocol, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .datasets.audio import AudioError, read_wav, reason, warn_skipped

FEATURE_KINDS = ("logmel", "mfcc")
# Bumped whenever the feature maths or the bundle layout changes: old bundles then miss.
CACHE_VERSION = 1


@dataclass(frozen=True)
class FeatureConfig:
    """How to turn a waveform into a feature sequence (see the module docstring).

    Args:
        kind: ``"logmel"`` (``n_mels`` features) or ``"mfcc"`` (``n_mfcc`` features).
        sample_rate: rate every clip is resampled to, Hz.
        n_mels: mel bands.
        win_ms: analysis window (= FFT length), milliseconds.
        hop_ms: frame hop, milliseconds.
        n_mfcc: cepstral coefficients kept when ``kind == "mfcc"``.
        clip_seconds: crop / zero-pad every clip to this length; ``None`` keeps each
            clip's true length (variable-length items).
        center: librosa-style centred frames instead of frames starting at sample 0.
        fmin, fmax: mel filterbank range, Hz (``fmax=None``: ``sample_rate / 2``).
        log_offset: added to the mel power before the log, so silence stays finite.

    Raises:
        ValueError: any field out of range; the message names the field and the value.
    """

    kind: str = "logmel"
    sample_rate: int = 16000
    n_mels: int = 32
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_mfcc: int = 13
    clip_seconds: float | None = 1.0
    center: bool = False
    fmin: float = 0.0
    fmax: float | None = None
    log_offset: float = 1e-6

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"kind={self.kind!r}, expected one of {', '.join(FEATURE_KINDS)}")
        for name in ("sample_rate", "n_mels", "n_mfcc"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}, expected a positive integer")
        if self.kind == "mfcc" and self.n_mfcc > self.n_mels:
            raise ValueError(f"n_mfcc={self.n_mfcc} exceeds n_mels={self.n_mels}, expected <=")
        if not self.win_length >= 2 or not self.hop_length >= 1:
            raise ValueError(
                f"win_ms={self.win_ms}, hop_ms={self.hop_ms} give {self.win_length} and "
                f"{self.hop_length} samples at {self.sample_rate} Hz, expected >= 2 and >= 1"
            )
        if self.clip_seconds is not None and not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds={self.clip_seconds!r}, expected > 0 or None")
        nyquist = self.sample_rate / 2
        top = nyquist if self.fmax is None else self.fmax
        if not 0 <= self.fmin < top <= nyquist:
            raise ValueError(
                f"fmin={self.fmin}, fmax={self.fmax}: expected 0 <= fmin < fmax <= {nyquist}"
            )
        if not self.log_offset > 0:
            raise ValueError(f"log_offset={self.log_offset!r}, expected > 0")

    @property
    def win_length(self) -> int:
        """Window (and FFT) length in samples."""
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        """Hop in samples."""
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def clip_samples(self) -> int | None:
        """Clip length in samples, ``None`` for true-length clips."""
        return None if self.clip_seconds is None else round(self.sample_rate * self.clip_seconds)

    @property
    def n_features(self) -> int:
        return self.n_mels if self.kind == "logmel" else self.n_mfcc

    def num_frames(self, n_samples: int) -> int:
        """Frames produced from ``n_samples`` samples (after the clip-length fit)."""
        win, hop = self.win_length, self.hop_length
        if self.center:
            return 1 + n_samples // hop
        return 1 + max(0, math.ceil((n_samples - win) / hop))

    def to_dict(self) -> dict:
        """Plain-JSON form, for run configs and the cache key."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FeatureConfig":
        return resolve_config(None, values)


def resolve_config(features: FeatureConfig | None, options: dict,
                   default: FeatureConfig | None = None) -> FeatureConfig:
    """The loaders' ``features=FeatureConfig(...)`` or ``**feature_options``.

    Args:
        features: a complete config, or ``None``.
        options: field overrides (``n_mels=40``, ``kind="mfcc"``, ...) applied to
            ``features`` or, when that is ``None``, to ``default``.
        default: the loader's default (``FeatureConfig()`` when ``None``).

    Raises:
        ValueError: an option that is not a :class:`FeatureConfig` field (the message
            lists the valid ones), or ``features`` of the wrong type.
    """
    valid = [f.name for f in fields(FeatureConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; feature options are "
                         f"{', '.join(valid)}")
    base = features if features is not None else (default or FeatureConfig())
    if not isinstance(base, FeatureConfig):
        raise ValueError(f"features={features!r}, expected a FeatureConfig or None")
    return FeatureConfig(**{**base.to_dict(), **options}) if options else base


# ---------------------------------------------------------------------------- one clip

@lru_cache(maxsize=16)
def _analysis(config: FeatureConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Window, mel matrix transposed ``[bins, n_mels]`` and DCT matrix for a config."""
    import librosa
    import scipy.fft

    win = config.win_length
    window = librosa.filters.get_window("hann", win, fftbins=True).astype(np.float32)
    mel = librosa.filters.mel(sr=config.sample_rate, n_fft=win, n_mels=config.n_mels,
                              fmin=config.fmin, fmax=config.fmax).astype(np.float32)
    dct = None
    if config.kind == "mfcc":
        # DCT-II (ortho) along the mel axis as a matrix: one product for all frames.
        dct = scipy.fft.dct(np.eye(config.n_mels), type=2, norm="ortho", axis=0)
        dct = np.ascontiguousarray(dct[: config.n_mfcc].T, dtype=np.float32)
    return window, np.ascontiguousarray(mel.T), dct


def prepare_wave(wave: np.ndarray, sr: int, config: FeatureConfig) -> np.ndarray:
    """Resample ``wave`` to ``config.sample_rate`` and fit it to ``config.clip_seconds``.

    Raises:
        ValueError: ``wave`` is not 1-D or is empty, or ``sr`` is not positive.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"wave has shape {wave.shape}, expected a non-empty 1-D waveform")
    if not sr > 0:
        raise ValueError(f"sr={sr!r}, expected a positive sample rate")
    if sr != config.sample_rate:
        import soxr

        # librosa.resample(res_type="soxr_hq") is this very call plus ~1.5 ms of
        # per-call checks, 20x the resampling itself for a one-second clip.
        wave = soxr.resample(wave, sr, config.sample_rate, quality="HQ").astype(np.float32)
    n = config.clip_samples
    if n is not None and len(wave) != n:
        wave = wave[:n] if len(wave) > n else np.pad(wave, (0, n - len(wave)))
    return wave


def _stack_frames(waves: Sequence[np.ndarray],
                  config: FeatureConfig) -> tuple[np.ndarray, list[int]]:
    """Frames ``[sum_i T_i, win]`` of many prepared waves, and each wave's ``T_i``.

    Every wave is laid out in one zero buffer with its padding (``win // 2`` in front
    when centred, zeros after it up to its last frame), and all frames are gathered from
    one sliding-window view: one copy, whatever the lengths.
    """
    win, hop = config.win_length, config.hop_length
    front = win // 2 if config.center else 0
    counts = [config.num_frames(len(w)) for w in waves]
    spans = [(n - 1) * hop + win for n in counts]
    starts = np.cumsum([0] + spans[:-1], dtype=np.int64)
    buffer = np.zeros(int(sum(spans)), dtype=np.float32)
    frame_starts = []
    for start, wave, span, n in zip(starts, waves, spans, counts):
        keep = min(len(wave), span - front)  # centred: the tail pad may cut the last hop
        buffer[start + front:start + front + keep] = wave[:keep]
        frame_starts.append(start + hop * np.arange(n, dtype=np.int64))
    if not frame_starts:
        return np.zeros((0, win), np.float32), counts
    view = np.lib.stride_tricks.sliding_window_view(buffer, win)
    return view[np.concatenate(frame_starts)], counts


def _transform(frames: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Features ``[M, F]`` of stacked frames ``[M, win]``: the batched heart of it all."""
    import scipy.fft

    window, mel_t, dct_t = _analysis(config)
    spectrum = scipy.fft.rfft(frames * window, axis=-1)
    power = np.square(np.abs(spectrum))
    out = np.log(power @ mel_t + np.float32(config.log_offset))
    if dct_t is not None:
        out = out @ dct_t
    return out.astype(np.float32, copy=False)


def compute_features(wave: np.ndarray, sr: int, config: FeatureConfig | None = None) -> np.ndarray:
    """Features of one clip.

    Args:
        wave: 1-D waveform in [-1, 1).
        sr: its sample rate; resampled when it differs from ``config.sample_rate``.
        config: feature recipe (default :class:`FeatureConfig`).

    Returns:
        float32 ``[T, F]``; ``T = config.num_frames(samples after resampling and fit)``.

    Raises:
        ValueError: bad ``wave`` or ``sr`` (see :func:`prepare_wave`).
    """
    config = config or FeatureConfig()
    frames, _ = _stack_frames([prepare_wave(wave, sr, config)], config)
    return _transform(frames, config)


# ----------------------------------------------------------------------- many clips

class WaveSource(Protocol):
    """A generated item (e.g. a silence clip cut from a noise file) instead of a file.

    ``name`` identifies it in messages, ``fingerprint()`` is JSON data that changes when
    the item would (the cache key), ``read()`` returns ``(wave, sample_rate)``.
    """

    name: str

    def fingerprint(self) -> list: ...

    def read(self) -> tuple[np.ndarray, int]: ...


Source = Union[str, os.PathLike, WaveSource]


def source_name(source: Source) -> str:
    return source.name if hasattr(source, "read") else str(source)


def read_source(source: Source, *, strict: bool,
                skipped: list[tuple[str, str]]) -> tuple[np.ndarray, int] | None:
    """``(wave, sample_rate)`` of a file or generated source, or ``None`` when unusable.

    An unusable source (:class:`AudioError`, missing file) raises with ``strict=True``;
    otherwise its ``(name, reason)`` is appended to ``skipped``.
    """
    try:
        return source.read() if hasattr(source, "read") else read_wav(source)
    except (AudioError, FileNotFoundError) as err:
        if strict:
            raise
        name = source_name(source)
        skipped.append((name, reason(err, name)))
        return None


@dataclass
class FeatureBundle:
    """Features of many sources, stored back to back (the cache's layout).

    Attributes:
        data: float32 ``[sum_i T_i, F]``.
        offsets: int64 ``[K + 1]``; item ``k`` is ``data[offsets[k]:offsets[k + 1]]``.
        kept: int64 ``[K]``, index into the sources of each item (skipped ones absent).
        skipped: ``(name, reason)`` of every source that could not be used.
    """

    data: np.ndarray
    offsets: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[str, str]]


def _chunk_features(chunk: Sequence[tuple[int, Source]], config: FeatureConfig, strict: bool):
    """Read, prepare and transform one chunk of sources: all frames in one FFT."""
    waves, kept, skipped = [], [], []
    for index, source in chunk:
        read = read_source(source, strict=strict, skipped=skipped)
        if read is not None:
            waves.append(prepare_wave(*read, config))
            kept.append(index)
    frames, lengths = _stack_frames(waves, config)
    return _transform(frames, config), lengths, kept, skipped


def compute_many(sources: Sequence[Source], config: FeatureConfig | None = None, *,
                 workers: int | None = None, chunk_size: int = 200, strict: bool = False,
                 progress: bool = True, desc: str = "features") -> FeatureBundle:
    """Features of many files (or generated sources), in parallel, with a progress bar.

    Sources are cut into chunks of ``chunk_size``; each chunk is read, resampled, framed
    and transformed with one FFT over all its frames, and chunks run on ``workers``
    threads (the FFT and matrix products release the GIL; see
    ``benchmarks/bench_features.py`` for the thread-versus-process measurement).

    Args:
        sources: file paths, or :class:`WaveSource` objects.
        config: feature recipe.
        workers: threads (``None``: ``os.cpu_count()``; 1: no pool).
        chunk_size: sources per chunk.
        strict: raise on the first unusable file instead of skipping it.
        progress: show a tqdm bar.
        desc: label of the bar.

    Returns:
        :class:`FeatureBundle` in source order. Skipped sources are counted and named in
        one ``UserWarning``.

    Raises:
        AudioError, FileNotFoundError: with ``strict=True``, the first unusable source.
        ValueError: ``workers`` or ``chunk_size`` below 1.
    """
    config = config or FeatureConfig()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1 or chunk_size < 1:
        raise ValueError(f"workers={workers}, chunk_size={chunk_size}, expected both >= 1")
    indexed = list(enumerate(sources))
    chunks = [indexed[i:i + chunk_size] for i in range(0, len(indexed), chunk_size)]
    results = []
    with tqdm(total=len(indexed), desc=desc, unit="clip", disable=not progress) as bar:
        if workers == 1 or len(chunks) <= 1:
            for chunk in chunks:
                results.append(_chunk_features(chunk, config, strict))
                bar.update(len(chunk))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_chunk_features, c, config, strict) for c in chunks]
                for chunk, future in zip(chunks, futures):
                    results.append(future.result())
                    bar.update(len(chunk))
    bundle = _join(results, config.n_features)
    warn_skipped(bundle.skipped)
    return bundle


def _join(results: Iterable[tuple], n_features: int) -> FeatureBundle:
    parts, lengths, kept, skipped = [], [], [], []
    for out, chunk_lengths, chunk_kept, chunk_skipped in results:
        parts.append(out)
        lengths += chunk_lengths
        kept += chunk_kept
        skipped += chunk_skipped
    data = np.concatenate(parts) if parts else np.zeros((0, n_features), np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return FeatureBundle(data, offsets, np.asarray(kept, np.int64), skipped)


# ---------------------------------------------------------------------------- cache

def _fingerprint(source: Source) -> list:
    if hasattr(source, "read"):
        return source.fingerprint()
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return [str(source), -1, -1]  # read() will report it (skip or raise)
    return [str(source), st.st_size, st.st_mtime_ns]


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, dataset: str, split: str, config: FeatureConfig,
               sources: Sequence[Source]) -> tuple[Path, str]:
    """Bundle file of ``(dataset, split, config)`` and the full key of ``sources``.

    The file name is ``{dataset}-{split}-{config digest}-{files digest}.npz``; the key
    (stored inside the bundle and compared on load) is the digest of the cache version,
    dataset, split, config and every source's (path, size, mtime) or generator
    fingerprint, so a changed config or file misses.
    """
    config_digest = _digest([CACHE_VERSION, config.to_dict()])[:10]
    key = _digest([CACHE_VERSION, dataset, split, config.to_dict(),
                   [_fingerprint(s) for s in sources]])
    return Path(cache_dir) / f"{dataset}-{split}-{config_digest}-{key[:10]}.npz", key


def _load_bundle(path: Path, key: str) -> FeatureBundle | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            skipped = list(zip(z["skipped_name"].tolist(), z["skipped_reason"].tolist()))
            return FeatureBundle(z["data"], z["offsets"], z["kept"], skipped)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # a truncated or foreign file: warn and rebuild
        warnings.warn(f"ignoring unreadable feature cache {path} ({err}); recomputing",
                      stacklevel=3)
        return None


def _save_bundle(path: Path, key: str, bundle: FeatureBundle) -> None:
    """Write atomically (temp file in the same folder, then ``os.replace``) and drop
    stale bundles of the same (dataset, split, config) built from other files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            names = [n for n, _ in bundle.skipped]
            reasons = [r for _, r in bundle.skipped]
            np.savez(f, key=np.array(key), data=bundle.data, offsets=bundle.offsets,
                     kept=bundle.kept, skipped_name=np.array(names, dtype=str),
                     skipped_reason=np.array(reasons, dtype=str))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for stale in path.parent.glob(prefix + "*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)


def cached_features(sources: Sequence[Source], config: FeatureConfig, *, dataset: str,
                    split: str, cache_dir: str | os.PathLike | None, strict: bool = False,
                    progress: bool = True, workers: int | None = None) -> FeatureBundle:
    """:func:`compute_many` behind an on-disk cache (one ``.npz`` per dataset/split/config).

    Args:
        sources: as for :func:`compute_many`.
        config: feature recipe.
        dataset: cache name of the dataset; include anything that tells two corpora apart
            (the loaders add a digest of the root folder).
        split: split name.
        cache_dir: folder of the bundles; ``None`` disables the cache.
        strict, progress, workers: as for :func:`compute_many`.

    Returns:
        The bundle, from disk when the key matches, else computed and then saved.
        Sources skipped when the bundle was built are warned about again (or raise
        :class:`AudioError` with ``strict=True``); nothing of them is stored.
    """
    if cache_dir is None:
        return compute_many(sources, config, workers=workers, strict=strict,
                            progress=progress, desc=f"{dataset} {split}")
    path, key = cache_path(cache_dir, dataset, split, config, sources)
    bundle = _load_bundle(path, key)
    if bundle is not None:
        if bundle.skipped and strict:
            name, why = bundle.skipped[0]
            raise AudioError(f"{name}: {why}")
        warn_skipped(bundle.skipped)
        return bundle
    bundle = compute_many(sources, config, workers=workers, strict=strict,
                          progress=progress, desc=f"{dataset} {split}")
    try:
        _save_bundle(path, key, bundle)
    except OSError as err:  # a read-only cache folder must not cost the computed features
        warnings.warn(f"could not write feature cache {path} ({err})", stacklevel=2)
    return bundle


# --------------------------------------------------------------------- normalisation

def feature_stats(dataset, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation over every real frame of ``dataset``.

    ``mean_f = (1/N) sum_{i,t} x_{i,t,f}``, ``std_f = sqrt((1/N) sum (x - mean_f)^2)``
    over the ``N = sum_i T_i`` true frames (no padding: items are read one by one, or
    straight from a :class:`~str_rnn.datasets.audio.FeatureDataset`'s frame store).
    Accumulated in float64; ``std`` is floored at ``eps`` so a constant feature does not
    divide by zero.

    Args:
        dataset: items ``(x [T, F], label)``; use the training split.
        eps: floor of ``std``.

    Returns:
        ``(mean [F], std [F])`` float32 tensors.

    Raises:
        ValueError: the dataset has no frames, or items disagree on ``F``.
    """
    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray) and hasattr(dataset, "offsets"):
        frames = data[dataset.offsets[0]:dataset.offsets[-1]]
        count = len(frames)
        total = frames.sum(axis=0, dtype=np.float64)
        mean = total / max(count, 1)
        var = np.square(frames - mean.astype(np.float32), dtype=np.float64).sum(0) / max(count, 1)
    else:
        count, total, total_sq = 0, None, None
        for i in range(len(dataset)):
            x = np.asarray(dataset[i][0], dtype=np.float64)
            if total is None:
                total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
            if x.ndim != 2 or x.shape[1] != len(total):
                raise ValueError(f"item {i} has shape {x.shape}, expected [T, {len(total)}]")
            count += len(x)
            total += x.sum(0)
            total_sq += np.square(x).sum(0)
        mean = total / max(count, 1) if total is not None else None
        var = total_sq / max(count, 1) - np.square(mean) if total is not None else None
    if count == 0:
        raise ValueError(f"dataset of {len(dataset)} items has no frames, expected some")
    std = np.sqrt(np.maximum(var, 0.0))
    return (torch.tensor(mean, dtype=torch.float32),
            torch.tensor(np.maximum(std, eps), dtype=torch.float32))


class Standardize(nn.Module):
    """``y = (x - mean) / std`` over the last (feature) axis.

    ``mean`` and ``std`` are buffers: they travel with the model's ``state_dict``, so
    inference standardises with the training statistics. Padded frames become
    ``-mean / std`` rather than 0; models read out at true lengths, so that is harmless.

    Args:
        num_features: ``F``; the buffers start as mean 0, std 1 (identity), to be filled
            by :meth:`from_stats` / :meth:`from_dataset` or by ``load_state_dict``.
    """

    def __init__(self, num_features: int):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features={num_features}, expected >= 1")
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    @classmethod
    def from_stats(cls, mean, std) -> "Standardize":
        """Module holding the given statistics.

        Raises:
            ValueError: shapes differ or are not 1-D, or ``std`` is not positive and finite.
        """
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)}, "
                             "expected two vectors of the same length")
        if not (torch.isfinite(std).all() and (std > 0).all() and torch.isfinite(mean).all()):
            raise ValueError("std must be positive and finite and mean finite")
        module = cls(len(mean))
        module.mean.copy_(mean)
        module.std.copy_(std)
        return module

    @classmethod
    def from_dataset(cls, dataset, eps: float = 1e-5) -> "Standardize":
        """Module holding :func:`feature_stats` of ``dataset`` (the training split)."""
        return cls.from_stats(*feature_stats(dataset, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"input has {x.shape[-1]} features (shape {tuple(x.shape)}), "
                             f"expected {self.mean.shape[0]}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"num_features={self.mean.shape[0]}"
