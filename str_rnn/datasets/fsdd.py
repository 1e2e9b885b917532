"""Free Spoken Digit Dataset (FSDD): real recordings of the ten digits, true lengths kept.

Layout: ``recordings/{digit}_{speaker}_{take}.wav``, mono 16-bit PCM at 8 kHz, 0.14-2.28 s;
6 speakers x 10 digits x 50 takes = 3,000 files. Get it with::

    git clone https://github.com/Jakobovski/free-spoken-digit-dataset data/fsdd

Splits, by take (every speaker and digit is in every split; there are only 6 speakers,
too few to hold speakers out):

=========  =========================  ==============================
split      takes                      files (full dataset)
=========  =========================  ==============================
test       0-4 (the official test)    300
val        5 .. 4 + val_takes         300 with the default val_takes=5
train      the rest, up to 49         2,400 (2,700 with val_takes=0)
=========  =========================  ==============================

Clips are resampled to 16 kHz and keep their **true length** (``clip_seconds=None``):
padding every clip at the end and reading a model's last (padded) state left a FastGRNN
at chance, so items vary in length and models read out at each clip's last real frame.
The recordings hold nothing above 4 kHz, so with the default ``fmax`` (8 kHz) the top
mel bands carry only the log floor and resampler residue (training std ~0.01);
``fmax=4000`` spends all bands on the speech band instead.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from ..features import FeatureConfig, cached_features, resolve_config
from . import SPLITS, data_home
from .audio import FeatureDataset, cache_location, describe_skipped

URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
CLASSES = [str(d) for d in range(10)]
TEST_TAKES = 5  # takes 0-4 are the official test split
TAKES = 50
DEFAULT_FEATURES = FeatureConfig(clip_seconds=None)
_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def recordings_dir(root: str | os.PathLike | None = None) -> Path:
    """The ``recordings/`` folder of an FSDD checkout.

    Args:
        root: the checkout (holding ``recordings/``) or ``recordings/`` itself;
            ``None`` means ``data_home() / "fsdd"``.

    Raises:
        FileNotFoundError: no such folder; the message says how to get the dataset.
    """
    root = Path(root) if root is not None else data_home() / "fsdd"
    for folder in (root / "recordings", root):
        if folder.is_dir() and any(folder.glob("*.wav")):
            return folder
    raise FileNotFoundError(
        f"FSDD not found at {root} (expected {root / 'recordings'}/*.wav or {root}/*.wav); "
        f"get it with: git clone {URL} {root}"
    )


def fsdd_files(split: str, root: str | os.PathLike | None = None, *, val_takes: int = 5,
               strict: bool = False) -> list[tuple[Path, int]]:
    """``(path, digit)`` of every recording of ``split``, sorted by (digit, speaker, take).

    Only file names are read, so this is instant; see the module docstring for the rule.

    Args:
        split: ``train | val | test``.
        root: see :func:`recordings_dir`.
        val_takes: takes 5 .. 4 + val_takes form ``val``; 0 keeps the official 2,700-file
            train split whole (and makes ``val`` an error).
        strict: raise on a ``.wav`` whose name does not follow the pattern (default:
            skip it with a warning).

    Raises:
        ValueError: bad split or ``val_takes``, ``split="val"`` with ``val_takes=0``, or
            (``strict``) an unexpected file name.
        FileNotFoundError: no FSDD at ``root``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, expected one of {', '.join(SPLITS)}")
    if not 0 <= val_takes < TAKES - TEST_TAKES:
        raise ValueError(f"val_takes={val_takes}, expected 0..{TAKES - TEST_TAKES - 1}")
    if split == "val" and val_takes == 0:
        raise ValueError("split='val' with val_takes=0: no takes are held out for validation")
    folder = recordings_dir(root)
    items, odd = [], []
    for path in folder.glob("*.wav"):
        match = _NAME.match(path.name)
        if match is None:
            odd.append((str(path), "name is not {digit}_{speaker}_{take}.wav"))
            continue
        digit, speaker, take = int(match[1]), match[2], int(match[3])
        if take < TEST_TAKES:
            which = "test"
        elif take < TEST_TAKES + val_takes:
            which = "val"
        else:
            which = "train"
        if which == split:
            items.append(((digit, speaker, take), path))
    if odd:
        if strict:
            raise ValueError(describe_skipped(odd))
        warnings.warn(describe_skipped(odd), UserWarning, stacklevel=2)
    return [(path, key[0]) for key, path in sorted(items)]


def load_fsdd(split: str, root: str | os.PathLike | None = None, *,
              features: FeatureConfig | None = None, val_takes: int = 5, strict: bool = False,
              progress: bool = True, cache_dir: str | os.PathLike | None = None,
              cache: bool = True, workers: int | None = None,
              **feature_options) -> FeatureDataset:
    """FSDD ``split`` as a dataset of un-normalised log-mel (or MFCC) sequences.

    Args:
        split: ``train | val | test`` (see the module docstring).
        root: see :func:`recordings_dir`.
        features: feature recipe; default ``FeatureConfig(clip_seconds=None)`` (true
            length, 32 log-mel at 16 kHz). ``**feature_options`` override its fields.
        val_takes: see :func:`fsdd_files`.
        strict: raise on an unusable recording instead of skipping it with a warning.
        progress: show a progress bar while computing features.
        cache_dir: feature cache folder (default ``data_home() / "cache"``).
        cache: ``False`` computes without reading or writing the cache.
        workers: feature threads (default: all cores).

    Returns:
        :class:`~str_rnn.datasets.audio.FeatureDataset` with classes ``"0".."9"``; item
        ``(x float32 [T, F], digit)``, ``T`` following the clip's duration.

    Raises:
        FileNotFoundError: no FSDD at ``root``.
        ValueError: bad split, ``val_takes`` or feature option.
        AudioError: with ``strict=True``, an unusable recording.
    """
    config = resolve_config(features, feature_options, DEFAULT_FEATURES)
    files = fsdd_files(split, root, val_takes=val_takes, strict=strict)
    bundle = cached_features([path for path, _ in files], config, split=split, strict=strict,
                             progress=progress, workers=workers,
                             **cache_location("fsdd", recordings_dir(root), cache, cache_dir))
    kept = bundle.kept.tolist()
    return FeatureDataset(bundle.data, bundle.offsets, [files[i][1] for i in kept], CLASSES,
                          [str(files[i][0]) for i in kept])
