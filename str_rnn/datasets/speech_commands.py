"""Google Speech Commands (v0.01, v0.02 and the synthetic corpus in the same layout).

Layout (both versions)::

    ROOT/{word}/{speaker}_nohash_{n}.wav    one-second 16 kHz mono clips, one folder a word
    ROOT/_background_noise_/*.wav           long noise recordings
    ROOT/validation_list.txt                "word/file.wav" lines (official splits)
    ROOT/testing_list.txt

Download: http://download.tensorflow.org/data/speech_commands_v0.01.tar.gz (30 words) or
http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz (35 words).

Splits: the official list files; train is every clip named in neither. Without list files
the clips are split by :func:`which_set`, Google's ``_nohash_`` hashing rule.

Tasks (TensorFlow ``speech_commands/input_data.py`` recipe, whose counts match the
FastGRNN/STR papers: 22,246 train / 3,081 test on v0.01):

- ``kws12``: classes ``_silence_, _unknown_, yes, no, up, down, left, right, on, off,
  stop, go``. Per split, with ``K`` keyword clips, ``ceil(K / 10)`` ``_unknown_`` clips
  are drawn without replacement from the split's other words and ``ceil(K / 10)``
  ``_silence_`` clips are cut from the background-noise files (random file, random
  offset, gain uniform in [0, 1]; digital silence if the corpus has no noise files).
  The draws come from ``numpy.random.default_rng([seed, split number])``: the same seed
  gives the same items.
- ``kws35``: every word folder is a class (35 on v0.02, 30 on v0.01); no silence/unknown.

Item order: keyword and unknown clips sorted by their ``word/file`` path, then the
silence clips. Features default to 32 log-mel x 99 frames of 1 s clips and are cached.
With ``augment=True`` the train split is instead computed on the fly (random time shift
and background-noise mixing on the waveform, TensorFlow's defaults), see
:class:`AugmentedSpeechCommands`.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..features import (FeatureConfig, Source, cached_features, compute_features,
                        prepare_wave, read_source, resolve_config, source_name)
from . import SPLITS, data_home
from .audio import (AudioError, FeatureDataset, cache_location, read_wav, reason,
                    warn_skipped)

URLS = {
    "v0.01": "http://download.tensorflow.org/data/speech_commands_v0.01.tar.gz",
    "v0.02": "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
}
TASKS = ("kws12", "kws35")
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
KWS12_CLASSES = [SILENCE, UNKNOWN, *KEYWORDS]
BACKGROUND = "_background_noise_"
VALIDATION_LIST, TESTING_LIST = "validation_list.txt", "testing_list.txt"
MAX_NUM_WAVS_PER_CLASS = 2**27 - 1  # TensorFlow's constant in the hashing rule
EXTRA_PERCENT = 10  # silence and unknown, each, as a percentage of the keyword count
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


def which_set(filename: str, val_pct: float = 10, test_pct: float = 10) -> str:
    """Google's split of a Speech Commands file (TensorFlow ``input_data.which_set``).

    Everything from ``_nohash_`` on is dropped from the base name, so all clips of one
    speaker share a split, and a file keeps its split as the corpus grows::

        h = int(sha1(speaker).hexdigest(), 16)
        p = (h mod (2**27 - 1 + 1)) * 100 / (2**27 - 1)
        "val" if p < val_pct, else "test" if p < val_pct + test_pct, else "train"

    (TensorFlow's ``validation`` / ``testing`` / ``training`` are this toolkit's
    ``val`` / ``test`` / ``train``.)

    Args:
        filename: a path or base name, e.g. ``"yes/0a7c2a8d_nohash_0.wav"``.
        val_pct, test_pct: percentages of speakers in val and test.

    Raises:
        ValueError: percentages outside [0, 100] or summing above 100.
    """
    if not (0 <= val_pct <= 100 and 0 <= test_pct <= 100 and val_pct + test_pct <= 100):
        raise ValueError(f"val_pct={val_pct}, test_pct={test_pct}: expected percentages "
                         "in [0, 100] summing to at most 100")
    name = re.sub(r"_nohash_.*$", "", os.path.basename(filename))
    digest = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16)
    percentage = (digest % (MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / MAX_NUM_WAVS_PER_CLASS)
    if percentage < val_pct:
        return "val"
    if percentage < val_pct + test_pct:
        return "test"
    return "train"


def resolve_root(root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The corpus folder; ``None`` means ``data_home() / "synth_kws"``, generated with the
    generator's default arguments unless a complete corpus is already there.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no word folders, or the default
            corpus is absent and :mod:`str_rnn.datasets.synth_kws` cannot make it.
    """
    if root is None:
        root = data_home() / "synth_kws"
        try:
            from . import synth_kws
        except ImportError as err:
            if root.is_dir():
                return root
            raise FileNotFoundError(
                f"default corpus {root} does not exist and the synthetic-corpus generator "
                f"str_rnn.datasets.synth_kws is not available ({err}); pass root= a Speech "
                f"Commands folder (download: {URLS['v0.02']})"
            ) from None
        if synth_kws.is_complete(root):  # whatever arguments it was generated with
            return root
        return synth_kws.generate(root, progress=progress)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Speech Commands not found at {root}; download {URLS['v0.02']} (or v0.01: "
            f"{URLS['v0.01']}) and unpack it there, or make a synthetic corpus with "
            f"`str-rnn data synth-kws --out {root}`"
        )
    return root


def _words(root: Path) -> dict[str, list[str]]:
    """``word -> sorted "word/file.wav"`` for every word folder (names not starting "_")."""
    words = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith(("_", ".")):
            continue
        files = sorted(f"{folder.name}/{f.name}" for f in folder.glob("*.wav"))
        if files:
            words[folder.name] = files
    if not words:
        raise FileNotFoundError(f"{root} holds no word folders with .wav files, expected the "
                                f"Speech Commands layout ({{word}}/{{speaker}}_nohash_{{n}}.wav)")
    return words


def _read_list(path: Path) -> list[str]:
    return [line.strip().replace("\\", "/") for line in path.read_text().splitlines()
            if line.strip()]


def split_files(root: Path, split: str, *, strict: bool = False) -> dict[str, list[str]]:
    """``word -> sorted "word/file.wav"`` of one split (from the list files or the hash).

    Args:
        root: corpus folder.
        split: ``train | val | test``.
        strict: raise on a list entry naming a missing wav (default: skip with a warning).

    Raises:
        ValueError: bad split; only one of the two list files present; a file in both.
        FileNotFoundError: with ``strict=True``, a list entry naming a missing wav.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, expected one of {', '.join(SPLITS)}")
    words = _words(root)
    lists = {name: root / name for name in (VALIDATION_LIST, TESTING_LIST)}
    present = [name for name, path in lists.items() if path.is_file()]
    if len(present) == 1:
        missing = (set(lists) - set(present)).pop()
        raise ValueError(f"{root} has {present[0]} but no {missing}; expected both official "
                         "list files or neither (then files are split by which_set)")
    if present:
        listed = {name: _read_list(path) for name, path in lists.items()}
        both = set(listed[VALIDATION_LIST]) & set(listed[TESTING_LIST])
        if both:
            raise ValueError(f"{len(both)} file(s) are in both {VALIDATION_LIST} and "
                             f"{TESTING_LIST}, e.g. {sorted(both)[0]}; expected disjoint lists")
        existing = {f for files in words.values() for f in files}
        missing = [(str(root / entry), f"listed in {name} but does not exist")
                   for name, entries in listed.items() for entry in entries
                   if entry not in existing]
        if missing:
            if strict:
                raise FileNotFoundError(f"{missing[0][0]}: {missing[0][1]} "
                                        f"({len(missing)} missing entries in all)")
            warn_skipped(missing, stacklevel=3)
        held = {"val": set(listed[VALIDATION_LIST]), "test": set(listed[TESTING_LIST])}

        def member(rel: str) -> str:
            return "val" if rel in held["val"] else "test" if rel in held["test"] else "train"
    else:
        member = which_set
    return {word: [f for f in files if member(f) == split] for word, files in words.items()}


@lru_cache(maxsize=16)
def _noise(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, int]:
    """A background-noise file, read once per process (size and mtime key the cache)."""
    return read_wav(path)


def _read_noise(path: Path) -> tuple[np.ndarray, int]:
    st = path.stat()
    return _noise(str(path), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class NoiseClip:
    """A ``_silence_`` item: ``gain * noise[offset : offset + length]`` of a noise file
    (zero-padded when the file is shorter; all zeros when ``path`` is ``None``)."""

    path: Path | None
    offset: int
    length: int
    gain: float
    sample_rate: int = 16000  # used only for digital silence (no path)

    @property
    def name(self) -> str:
        return f"{SILENCE}:{self.path}@{self.offset}"

    def fingerprint(self) -> list:
        if self.path is None:
            return ["silence", self.length, self.sample_rate]
        st = self.path.stat()
        return ["noise", str(self.path), st.st_size, st.st_mtime_ns, self.offset,
                self.length, self.gain]

    def read(self) -> tuple[np.ndarray, int]:
        if self.path is None:
            return np.zeros(self.length, np.float32), self.sample_rate
        noise, sr = _read_noise(self.path)
        cut = noise[self.offset:self.offset + self.length]
        cut = np.pad(cut, (0, self.length - len(cut)))
        return (np.float32(self.gain) * cut).astype(np.float32), sr


def noise_files(root: Path, *, strict: bool = False) -> list[Path]:
    """Usable ``_background_noise_/*.wav`` files, sorted (bad ones skipped with a warning).

    Raises:
        AudioError: with ``strict=True``, an unusable noise file.
    """
    usable, skipped = [], []
    for path in sorted((root / BACKGROUND).glob("*.wav")):
        try:
            _read_noise(path)
        except AudioError as err:
            if strict:
                raise
            skipped.append((str(path), reason(err, path)))
            continue
        usable.append(path)
    warn_skipped(skipped, stacklevel=3)
    return usable


def kws_items(task: str, split: str, root: Path, *, seed: int = 0, strict: bool = False,
              clip_seconds: float = 1.0) -> tuple[list[Source], list[int], list[str]]:
    """The items of ``task``/``split`` before feature extraction (see the module docstring).

    Returns:
        ``(sources, targets, classes)``: file paths and :class:`NoiseClip` items, their
        labels, the class names.

    Raises:
        ValueError: bad task or split; kws12 on a corpus lacking some of the 10 keywords.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}, expected one of {', '.join(TASKS)}")
    files = split_files(root, split, strict=strict)
    if task == "kws35":
        classes = sorted(files)
        chosen = sorted((f, classes.index(w)) for w, fs in files.items() for f in fs)
        return [root / f for f, _ in chosen], [t for _, t in chosen], classes

    absent = [w for w in KEYWORDS if w not in files]
    if absent:
        raise ValueError(f"{root} lacks keyword folder(s) {', '.join(absent)}; kws12 needs "
                         f"all of {', '.join(KEYWORDS)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    keyword = [(f, KWS12_CLASSES.index(w)) for w in KEYWORDS for f in files[w]]
    n_extra = math.ceil(len(keyword) * EXTRA_PERCENT / 100)
    pool = sorted(f for w, fs in files.items() if w not in KEYWORDS for f in fs)
    if len(pool) < n_extra:
        warnings.warn(f"{split} split of {root} has {len(pool)} non-keyword clips, fewer "
                      f"than the {n_extra} _unknown_ items the recipe asks for; using all",
                      UserWarning, stacklevel=2)
    unknown_label = KWS12_CLASSES.index(UNKNOWN)
    unknown = [(pool[i], unknown_label) for i in rng.permutation(len(pool))[:n_extra]]
    chosen = sorted(keyword + unknown)

    noises = noise_files(root, strict=strict)
    if not noises:
        warnings.warn(f"{root / BACKGROUND} has no usable noise files; _silence_ items are "
                      "digital silence", UserWarning, stacklevel=2)
    silence = []
    for _ in range(n_extra):
        if not noises:
            silence.append(NoiseClip(None, 0, round(16000 * clip_seconds), 0.0))
            continue
        path = noises[rng.integers(len(noises))]
        noise, sr = _read_noise(path)
        length = round(sr * clip_seconds)
        offset = int(rng.integers(0, max(1, len(noise) - length + 1)))
        silence.append(NoiseClip(path, offset, length, round(float(rng.uniform(0, 1)), 6)))
    sources = [root / f for f, _ in chosen] + silence
    return sources, [t for _, t in chosen] + [0] * len(silence), list(KWS12_CLASSES)


@dataclass(frozen=True)
class Augment:
    """Training augmentation on the waveform (TensorFlow's defaults).

    Args:
        shift_ms: shift each clip by a uniform random amount in [-shift_ms, shift_ms],
            zero-filling the gap.
        noise_prob: probability of mixing in a random background-noise segment.
        noise_volume: the noise gain is uniform in [0, noise_volume].
    """

    shift_ms: float = 100.0
    noise_prob: float = 0.8
    noise_volume: float = 0.1

    def __post_init__(self):
        if self.shift_ms < 0 or not 0 <= self.noise_prob <= 1 or self.noise_volume < 0:
            raise ValueError(f"{self}: expected shift_ms >= 0, 0 <= noise_prob <= 1, "
                             "noise_volume >= 0")


class AugmentedSpeechCommands(Dataset):
    """Training items whose features are computed on the fly from augmented waveforms.

    Item ``i`` in epoch ``e`` draws its shift and noise from
    ``default_rng([seed, e, i])``: deterministic for a seed, different every epoch when
    the training loop calls :meth:`set_epoch`. Not cached (every epoch differs).

    Args:
        sources, targets, classes: as returned by :func:`kws_items` (usable files only).
        noises: background-noise waveforms at ``config.sample_rate``.
        config: feature recipe.
        augment: augmentation parameters.
        seed: seed of the augmentation draws.
        lengths: frames of each item (augmentation keeps them), so samplers and
            statistics need not compute features to learn them.
    """

    def __init__(self, sources: Sequence[Source], targets: Sequence[int],
                 classes: Sequence[str], noises: Sequence[np.ndarray], config: FeatureConfig,
                 augment: Augment, seed: int = 0, lengths: Sequence[int] | None = None):
        if lengths is not None and len(lengths) != len(sources):
            raise ValueError(f"{len(lengths)} lengths for {len(sources)} sources, "
                             "expected one per source")
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.sources = list(sources)
        self.targets = list(targets)
        self.classes = list(classes)
        self.files = [source_name(s) for s in self.sources]
        self.noises = list(noises)
        self.config = config
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh augmentation for every item (call once per training epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = self.sources[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        wave, sr = read_source(source, strict=True, skipped=[])
        wave = prepare_wave(wave, sr, self.config)
        max_shift = round(self.config.sample_rate * self.augment.shift_ms / 1000)
        shift = int(rng.integers(-max_shift, max_shift + 1)) if max_shift else 0
        if shift > 0:
            wave = np.concatenate([np.zeros(shift, np.float32), wave[:-shift]])
        elif shift < 0:
            wave = np.concatenate([wave[-shift:], np.zeros(-shift, np.float32)])
        if self.noises and rng.random() < self.augment.noise_prob:
            noise = self.noises[rng.integers(len(self.noises))]
            start = int(rng.integers(0, max(1, len(noise) - len(wave) + 1)))
            segment = noise[start:start + len(wave)]
            segment = np.pad(segment, (0, len(wave) - len(segment)))
            gain = rng.uniform(0, self.augment.noise_volume)
            wave = np.clip(wave + np.float32(gain) * segment, -1.0, 1.0)
        features = compute_features(wave, self.config.sample_rate, self.config)
        return torch.from_numpy(features), self.targets[index]


def _usable(sources: Sequence[Source], config: FeatureConfig, strict: bool,
            progress: bool) -> tuple[list[int], list[int]]:
    """Indices of the sources that read cleanly, and their frame counts (one reading
    pass, as the cache pass would make; augmentation keeps lengths)."""
    skipped: list[tuple[str, str]] = []
    kept, frames = [], []
    for i, source in enumerate(tqdm(sources, desc="checking clips", unit="clip",
                                    disable=not progress)):
        read = read_source(source, strict=strict, skipped=skipped)
        if read is not None:
            kept.append(i)
            frames.append(config.num_frames(len(prepare_wave(*read, config))))
    warn_skipped(skipped, stacklevel=4)
    return kept, frames


def load_speech_commands(task: str, split: str, root: str | os.PathLike | None = None, *,
                         seed: int = 0, augment: bool | Augment = False,
                         features: FeatureConfig | None = None, strict: bool = False,
                         progress: bool = True, cache_dir: str | os.PathLike | None = None,
                         cache: bool = True, workers: int | None = None,
                         **feature_options) -> Dataset:
    """Speech Commands ``split`` of ``task`` as un-normalised feature sequences.

    Args:
        task: ``kws12 | kws35``.
        split: ``train | val | test``.
        root: corpus folder (see :func:`resolve_root`; ``None``: the synthetic corpus).
        seed: seed of the unknown / silence draws and of the augmentation.
        augment: ``True`` (or an :class:`Augment`) computes the train split on the fly
            with random shift and noise; ignored for val and test, which never augment.
        features: feature recipe (default 32 log-mel, 1 s clips: 99 x 32);
            ``**feature_options`` override its fields.
        strict: raise on an unusable wav or a list entry naming a missing wav instead of
            skipping it with a warning.
        progress: progress bars.
        cache_dir: feature cache folder (default ``data_home() / "cache"``).
        cache: ``False`` computes without reading or writing the cache.
        workers: feature threads (default: all cores).

    Returns:
        A dataset of ``(x float32 [T, F], label)`` with ``.classes`` and ``.targets``:
        :class:`~str_rnn.datasets.audio.FeatureDataset`, or
        :class:`AugmentedSpeechCommands` for the augmented train split.

    Raises:
        ValueError: bad task, split or option, or an inconsistent corpus (see
            :func:`split_files`, :func:`kws_items`).
        FileNotFoundError: missing corpus; with ``strict``, a list entry naming a
            missing wav.
        AudioError: with ``strict=True``, an unusable wav.
    """
    config = resolve_config(features, feature_options)
    root = resolve_root(root, progress=progress)
    sources, targets, classes = kws_items(task, split, root, seed=seed, strict=strict,
                                          clip_seconds=config.clip_seconds or 1.0)
    if augment and split == "train":
        params = augment if isinstance(augment, Augment) else Augment()
        kept, lengths = _usable(sources, config, strict, progress)
        whole = replace(config, clip_seconds=None)  # keep noise files at full length
        noises = [prepare_wave(*_read_noise(p), whole) for p in noise_files(root)]
        return AugmentedSpeechCommands([sources[i] for i in kept], [targets[i] for i in kept],
                                       classes, noises, config, params, seed, lengths)
    bundle = cached_features(sources, config, split=split, strict=strict, progress=progress,
                             workers=workers, **cache_location(task, root, cache, cache_dir))
    kept = bundle.kept.tolist()
    return FeatureDataset(bundle.data, bundle.offsets, [targets[i] for i in kept], classes,
                          [source_name(sources[i]) for i in kept])
