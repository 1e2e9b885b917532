"""FSDD loader on the real recordings in ../shared/data (skipped when that folder is absent):
split rule from the file names, and features of a handful of real clips."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from str_rnn.datasets import load
from str_rnn.datasets.fsdd import CLASSES, fsdd_files, load_fsdd, recordings_dir
from str_rnn.features import FeatureConfig

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
needs_fsdd = pytest.mark.skipif(not (FSDD / "recordings").is_dir(),
                                reason=f"real FSDD not found at {FSDD}")
SPEAKERS = {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}


def take(path: Path) -> int:
    return int(re.match(r"\d_[a-z]+_(\d+)\.wav", path.name)[1])


@needs_fsdd
def test_split_sizes_from_file_names():
    splits = {s: fsdd_files(s, FSDD) for s in ("train", "val", "test")}
    assert {s: len(f) for s, f in splits.items()} == {"train": 2400, "val": 300, "test": 300}
    assert len(fsdd_files("train", FSDD, val_takes=0)) == 2700  # the official train split
    paths = [p for files in splits.values() for p, _ in files]
    assert len(set(paths)) == 3000
    assert {take(p) for p, _ in splits["test"]} == set(range(5))
    assert {take(p) for p, _ in splits["val"]} == set(range(5, 10))
    assert min(take(p) for p, _ in splits["train"]) == 10
    # every speaker says every digit in every split: 6 x 10 x 5 test clips
    test_cells = Counter((p.name.split("_")[1], d) for p, d in splits["test"])
    assert set(test_cells) == {(s, d) for s in SPEAKERS for d in range(10)}
    assert set(test_cells.values()) == {5}
    # labels are the digit in the file name; file order is deterministic
    assert all(int(p.name[0]) == d for p, d in splits["train"])
    assert splits["test"] == fsdd_files("test", FSDD / "recordings")


@needs_fsdd
def test_features_of_real_recordings(tmp_path):
    """A dozen real recordings (linked into a temp folder): true length follows duration."""
    picked = sorted(FSDD.glob("recordings/[0-9]_*_[0-2].wav"))[::15]
    assert len(picked) >= 10
    (tmp_path / "recordings").mkdir()
    for p in picked:
        (tmp_path / "recordings" / p.name).symlink_to(p)
    ds = load_fsdd("test", tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert len(ds) == len(picked) and ds.classes == CLASSES
    config = FeatureConfig(clip_seconds=None)
    for (x, y), name in zip((ds[i] for i in range(len(ds))), ds.files):
        info = sf.info(name)
        assert info.samplerate == 8000 and info.channels == 1
        # resampled to 16 kHz, true length kept: frames follow the duration
        assert x.shape == (config.num_frames(2 * info.frames), 32)
        assert np.isfinite(x.numpy()).all() and x.dtype.is_floating_point
        assert y == int(Path(name).name[0])
        # speech is not silence: a wide dynamic range, well above the log floor
        assert x.max() - x.min() > 5 and x.max() > np.log(1e-6) + 5
    assert len(set(ds.lengths.tolist())) > 3  # variable-length items
    # a second load is a cache hit and identical; the dispatching entry point agrees
    again = load("fsdd", "test", tmp_path, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again.data, ds.data)
    assert again.targets == ds.targets and again.files == ds.files


def test_missing_root_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="git clone https://github.com/Jakobovski"):
        recordings_dir(tmp_path / "nowhere")


def test_split_and_option_checks(tmp_path):
    (tmp_path / "recordings").mkdir()
    for name in ("3_theo_0.wav", "3_theo_7.wav", "3_theo_12.wav", "notes.wav"):
        sf.write(tmp_path / "recordings" / name, np.zeros(800, np.float32), 8000)
    with pytest.warns(UserWarning, match="notes.wav"):
        assert [d for _, d in fsdd_files("train", tmp_path)] == [3]
    with pytest.raises(ValueError, match="notes.wav"):
        fsdd_files("train", tmp_path, strict=True)
    with pytest.raises(ValueError, match="val_takes=0"):
        fsdd_files("val", tmp_path, val_takes=0)
    with pytest.raises(ValueError, match="split='dev'"):
        fsdd_files("dev", tmp_path)
    with pytest.raises(ValueError, match="n_mel"):
        load_fsdd("test", tmp_path, n_mel=40, progress=False)
