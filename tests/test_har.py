"""UCI HAR loader: the official layout (real subset + tiny temp fixtures), tasks, splits, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from str_rnn.datasets import load, pad_collate
from str_rnn.datasets.har import (ACTIVITIES, ARCHIVE_DIR, CHANNELS, URL, VAL_VOLUNTEERS, HARDataset,
                                  block_val_mask, carve, load_har, overlap_chains, read_table)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SUBSET = SHARED / "uci_har_subset"
FULL_TEST = SHARED / "uci_har_test" / "uci_har_test_full.npz"


@pytest.fixture(scope="module")
def subset() -> Path:
    if not (SUBSET / ARCHIVE_DIR).is_dir():
        pytest.skip(f"shared UCI HAR subset not found at {SUBSET}")
    return SUBSET


@pytest.fixture(scope="module")
def subset_train(subset) -> HARDataset:
    """The subset's whole official train split (read once: 2,400 x 128 x 9 numbers)."""
    return load_har("har6", "train", subset, carve_val=False, progress=False)


def labels_of(root: Path, split: str) -> np.ndarray:
    return np.array((root / ARCHIVE_DIR / split / f"y_{split}.txt").read_text().split(), dtype=int)


def write_archive(root: Path, n: int = 6, *, labels=None, chain: int = 0, subjects=None, seed: int = 0) -> Path:
    """A tiny official-layout archive: ``n`` train and test windows cut from random walks
    so that consecutive windows overlap by half within blocks of ``chain`` rows (0: no
    overlap), as UCI HAR's windows of one activity run do; labels cycle 1..6 by default."""
    rng = np.random.default_rng(seed)
    labels = [i % 6 + 1 for i in range(n)] if labels is None else labels
    for split in ("train", "test"):
        folder = root / ARCHIVE_DIR / split
        (folder / "Inertial Signals").mkdir(parents=True)
        for name in CHANNELS:
            rows = []
            for i in range(n):
                if not chain or i % chain == 0:
                    signal = rng.normal(size=64 * (max(chain, 1) + 1))
                k = i % chain if chain else 0
                rows.append(signal[64 * k:64 * k + 128])
            (folder / "Inertial Signals" / f"{name}_{split}.txt").write_text(
                "".join(" " + " ".join(f"{v: .7e}" for v in row) + "\n" for row in rows))
        (folder / f"y_{split}.txt").write_text("".join(f"{label}\n" for label in labels))
        if subjects is not None:
            (folder / f"subject_{split}.txt").write_text("".join(f"{s}\n" for s in subjects))
    return root


# ----------------------------------------------------------------------------- real subset

def test_subset_shapes_and_items(subset, subset_train):
    test = load_har("har6", "test", subset, progress=False)
    assert (len(subset_train), len(test)) == (2400, 950)
    x, y = subset_train[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (128, 9)
    assert y == int(labels_of(subset, "train")[0]) - 1
    assert subset_train.classes == list(ACTIVITIES) and subset_train.subjects is None
    xb, lengths, yb = pad_collate([test[i] for i in range(5)])
    assert xb.shape == (5, 128, 9) and lengths.tolist() == [128] * 5


@pytest.mark.parametrize("split", ["train", "test"])
def test_har2_mapping_counts_agree_with_label_file(subset, subset_train, split):
    raw = labels_of(subset, split)
    if split == "test":
        ds = load("har2", "test", root=subset, progress=False)  # through the package's dispatcher
    else:
        ds = HARDataset(subset_train.windows, subset_train.activities, "har2")
    targets = np.asarray(ds.targets)
    # {SITTING 4, LAYING 6, WALKING_UPSTAIRS 2} -> 0, {STANDING 5, WALKING 1, WALKING_DOWNSTAIRS 3} -> 1
    assert np.array_equal(targets == 0, np.isin(raw, [2, 4, 6]))
    assert np.bincount(targets).tolist() == [np.isin(raw, [2, 4, 6]).sum(), np.isin(raw, [1, 3, 5]).sum()]
    assert len(ds.classes) == 2 and "SITTING" in ds.classes[0] and "STANDING" in ds.classes[1]
    assert np.array_equal(np.asarray(subset_train.targets), labels_of(subset, "train") - 1)


def test_channel_order_matches_full_test_npz(subset):
    if not FULL_TEST.is_file():
        pytest.skip(f"{FULL_TEST} not found")
    test = load_har("har6", "test", subset, progress=False)
    with np.load(FULL_TEST) as z:
        full, full_y = z["X"].transpose(0, 2, 1), z["y"]  # [N, 128, 9]
    ours = test.windows
    # locate each subset window in the full split by its first 4 samples of every channel
    key_full, key_ours = full[:, :4].reshape(len(full), -1), ours[:, :4].reshape(len(ours), -1)
    dist = (key_ours ** 2).sum(1)[:, None] - 2 * key_ours @ key_full.T + (key_full ** 2).sum(1)[None]
    match = dist.argmin(1)
    assert np.all(np.diff(match) > 0)  # the subset keeps the official order
    # values are the official ones rounded to 4 significant digits; every channel must agree
    err = np.abs(ours - full[match]) / (np.abs(full[match]) + 1e-3)
    assert err.max() < 1e-2
    assert np.array_equal(full_y[match], test.activities)


def test_val_carved_from_train_without_volunteer_ids(subset_train):
    whole = subset_train
    train, val = carve(whole, "train"), carve(whole, "val")
    assert set(train.files).isdisjoint(val.files)
    assert sorted(train.files + val.files, key=lambda f: int(f.split(":")[1])) == whole.files
    # no window of val shares samples with one of train: they lie in different chains
    chains = overlap_chains(whole.windows)
    in_val = np.isin(whole.files, val.files)
    assert set(chains[in_val]).isdisjoint(chains[~in_val])
    assert 0.5 < chains.max() / len(chains) < 1  # chains exist: the check above means something
    share = np.bincount(val.activities, minlength=7)[1:] / np.bincount(whole.activities, minlength=7)[1:]
    assert np.all((share > 0.15) & (share < 0.35)), share


def test_load_har_carves_val_without_volunteer_ids(tmp_path):
    # two classes of 6 rows, each two chains of 3: 20% of 6 -> the last 2 rows, whose
    # chain starts one row earlier, so val is the second chain of each class
    write_archive(tmp_path, n=12, labels=[1] * 6 + [2] * 6, chain=3)
    train = load_har("har6", "train", tmp_path, progress=False)
    val = load_har("har6", "val", tmp_path, progress=False)
    assert val.files == [f"train:{row}" for row in (4, 5, 6, 10, 11, 12)]
    assert train.files == [f"train:{row}" for row in (1, 2, 3, 7, 8, 9)]


# ----------------------------------------------------------------------------- tiny fixtures

def test_root_may_be_either_folder(tmp_path):
    write_archive(tmp_path)
    a = load_har("har6", "test", tmp_path, progress=False)
    b = load_har("har6", "test", tmp_path / ARCHIVE_DIR, progress=False)
    assert len(a) == 6 and np.array_equal(a.windows, b.windows)
    assert np.asarray(a.targets).tolist() == [0, 1, 2, 3, 4, 5]
    body_acc_x = np.array((tmp_path / ARCHIVE_DIR / "test" / "Inertial Signals" / "body_acc_x_test.txt")
                          .read_text().split(), dtype=np.float32).reshape(6, 128)
    np.testing.assert_array_equal(a.windows[:, :, 0], body_acc_x)


def test_val_by_volunteer_when_ids_are_known(tmp_path):
    subjects = [1, VAL_VOLUNTEERS[0], 5, VAL_VOLUNTEERS[1], 7, 8]
    write_archive(tmp_path, subjects=subjects)
    val = load_har("har2", "val", tmp_path, progress=False)
    train = load_har("har2", "train", tmp_path, progress=False)
    assert sorted(val.subjects.tolist()) == sorted(VAL_VOLUNTEERS[:2])
    assert train.subjects.tolist() == [1, 5, 7, 8]


def test_block_val_keeps_chains_whole():
    # two chains per class: rows 0-4 one chain, 5-9 another (all class 1)
    rng = np.random.default_rng(0)
    windows = np.concatenate([np.lib.stride_tricks.sliding_window_view(rng.normal(size=(64 * 6, 9)), 128, 0)[::64]
                              .transpose(0, 2, 1) for _ in range(2)])
    assert np.array_equal(overlap_chains(windows), [0] * 5 + [1] * 5)
    mask = block_val_mask(windows, np.ones(10, dtype=int), fraction=0.2)
    assert mask.tolist() == [False] * 5 + [True] * 5  # the cut (row 8) moved back to its chain's start


@pytest.mark.parametrize("bad_line, expected", [
    (" " + " ".join(["0.1"] * 127) + "\n", "line 3: 127 values, expected 128"),  # ragged row
    (" " + " ".join(["0.1"] * 120) + " nan? x\n", "line 3: 122 values, expected 128"),
])
def test_ragged_row_is_named(tmp_path, bad_line, expected):
    write_archive(tmp_path)
    path = tmp_path / ARCHIVE_DIR / "train" / "Inertial Signals" / "body_gyro_y_train.txt"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = bad_line
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"body_gyro_y_train\.txt, {expected}"):
        load_har("har6", "train", tmp_path, progress=False)


def test_wrong_column_count_is_named(tmp_path):
    path = tmp_path / "table.txt"
    path.write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ValueError, match=r"table\.txt, line 1: 3 values, expected 128"):
        read_table(path, 128)


def test_non_number_is_named(tmp_path):
    path = tmp_path / "table.txt"
    path.write_text("1 2\n3 oops\n")
    with pytest.raises(ValueError, match=r"table\.txt, line 2: 'oops' is not a number"):
        read_table(path, 2)


def test_read_table_accepts_uci_spacing(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("  1.0000000e+000  2\n\n 3 4.0\n")  # UCI's padding and exponents, a blank line
    np.testing.assert_array_equal(read_table(path, 2), [[1, 2], [3, 4]])


def test_label_out_of_range_and_row_mismatch(tmp_path):
    write_archive(tmp_path)
    y = tmp_path / ARCHIVE_DIR / "test" / "y_test.txt"
    y.write_text("1\n2\n7\n4\n5\n6\n")
    with pytest.raises(ValueError, match=r"y_test\.txt, row 3: label 7, expected an integer 1\.\.6"):
        load_har("har6", "test", tmp_path, progress=False)
    y.write_text("1\n2\n3\n")
    with pytest.raises(ValueError, match=r"body_acc_x_test\.txt has 6 rows, expected 3"):
        load_har("har6", "test", tmp_path, progress=False)


def test_missing_folder_says_how_to_get_the_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_har("har6", "train", missing, progress=False)
    message = str(err.value)
    assert str(missing) in message and URL in message and "root=None" in message


def test_bad_arguments(tmp_path):
    write_archive(tmp_path)
    with pytest.raises(ValueError, match="task='har7'"):
        load_har("har7", "train", tmp_path)
    with pytest.raises(ValueError, match="split='dev'"):
        load_har("har6", "dev", tmp_path)
    with pytest.raises(ValueError, match="carve_val=False"):
        load_har("har6", "val", tmp_path, carve_val=False)
    with pytest.raises(ValueError, match="n_mels"):
        load_har("har6", "train", tmp_path, n_mels=40)
    assert len(load_har("har6", "test", tmp_path, seed=3, progress=False)) == 6  # generic, ignored


def test_dataset_validates_its_arrays():
    windows = np.zeros((2, 128, 9), dtype=np.float32)
    with pytest.raises(ValueError, match="activity labels span 0..1"):
        HARDataset(windows, [0, 1], "har6")
    with pytest.raises(ValueError, match=r"expected \[2, 128, 9\]"):
        HARDataset(windows[:, :100], [1, 2], "har6")
    ds = HARDataset(windows, [2, 5], "har2", subjects=[3, 4])
    assert ds.targets == [0, 1] and ds.subset(np.array([False, True])).subjects.tolist() == [4]


def test_official_test_npz_loads_as_test_split():
    npz = Path(__file__).resolve().parents[2] / "shared" / "data" / "uci_har_test" / "uci_har_test_full.npz"
    if not npz.is_file():
        pytest.skip("shared UCI HAR test split not present")
    from str_rnn.datasets import load

    ds = load("har2", "test", root=npz)
    assert len(ds) == 2947
    x, y = ds[0]
    assert tuple(x.shape) == (128, 9)
    raw = np.load(npz)
    assert np.allclose(np.asarray(x), raw["X"][0].T)
    expected = np.isin(raw["y"], [5, 1, 3]).astype(int)
    assert list(ds.targets) == expected.tolist()
    with pytest.raises(ValueError, match="no 'train' split"):
        load("har2", "train", root=npz)


def test_npz_with_wrong_arrays_names_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((3, 5, 128), np.float32), y=np.ones(3))
    with pytest.raises(ValueError, match="bad.npz"):
        load_har("har6", "test", root=bad)
