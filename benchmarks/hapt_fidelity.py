"""How faithfully the HAPT-built windows reproduce the official UCI HAR windows.

Two figures, against the complete official test split (2,947 windows,
``../shared/data/uci_har_test/uci_har_test_full.npz``):

(a) **window match**: the fraction of official test windows for which some built test
    window (same label) correlates at >= 0.99 on *every* one of the 9 channels (Pearson
    correlation over the 128 samples; target >= 90%). Computed as matrix products of
    per-channel standardised windows, a running minimum over channels and a maximum over
    candidates. With the official training subset present
    (``../shared/data/uci_har_subset``, no volunteer ids) the same figure is printed for
    its 2,400 training windows against the built training windows. ``--variants`` repeats
    (a) for other filter recipes (zero-phase, per segment, the README's 3rd order, ...).

(b) **transfer**: a small GRU (one layer, per-channel standardisation with training
    statistics, Adam, last epoch, no model selection) trained on the built training
    windows, scored on the built test windows and on the official test split, for HAR-6
    and HAR-2; target: the official score within 1 point of the built one.

Example::

    python benchmarks/hapt_fidelity.py --quick          # ~1 min: (a) + 3 epochs
    python benchmarks/hapt_fidelity.py --variants all   # every recipe for (a), then (b)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from str_rnn.datasets import har, hapt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OFFICIAL_TEST = SHARED / "uci_har_test" / "uci_har_test_full.npz"
OFFICIAL_SUBSET = SHARED / "uci_har_subset"
THRESHOLD = 0.99

VARIANTS = {
    "uci": hapt.UCI_PIPELINE,
    "zero-phase": dataclasses.replace(hapt.UCI_PIPELINE, zero_phase=True),
    "per-segment": dataclasses.replace(hapt.UCI_PIPELINE, per_segment=True),
    "no-shift": dataclasses.replace(hapt.UCI_PIPELINE, label_shift=0),
    "readme-order3": dataclasses.replace(hapt.UCI_PIPELINE, noise_order=3, gyro_drift_order=0),
    "readme-order3-zero-phase": dataclasses.replace(hapt.UCI_PIPELINE, noise_order=3, gyro_drift_order=0,
                                                    zero_phase=True),
    "gravity-only": dataclasses.replace(hapt.UCI_PIPELINE, median=1, noise_order=0, gyro_drift_order=0,
                                        zero_phase=True),
}


def standardise(windows: np.ndarray) -> np.ndarray:
    """``[N, 128, 9]`` -> ``[9, N, 128]``, each row zero-mean and unit-norm (so that dot
    products are Pearson correlations); flat rows stay zero."""
    z = windows.transpose(2, 0, 1).astype(np.float64)
    z = z - z.mean(axis=2, keepdims=True)
    norm = np.linalg.norm(z, axis=2, keepdims=True)
    return (z / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def worst_channel_corr(zo: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """``[r, m]``: min over channels of the correlations of standardised ``zo [9, r, 128]``
    with ``zb [9, m, 128]`` (one matrix product per channel)."""
    worst = zo[0] @ zb[0].T
    for c in range(1, zo.shape[0]):
        np.minimum(worst, zo[c] @ zb[c].T, out=worst)
    return worst


def best_match(official: np.ndarray, official_y: np.ndarray, built: np.ndarray, built_y: np.ndarray,
               chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each official window: the best "worst-channel correlation" over built windows
    of the same label, and that built window's index.

    ``score[i] = max_j min_c corr(official[i, :, c], built[j, :, c])``, j restricted to
    ``built_y[j] == official_y[i]``.
    """
    zo, zb = standardise(official), standardise(built)
    score = np.full(len(official), -1.0)
    index = np.full(len(official), -1)
    for label in np.unique(official_y):
        rows, cand = np.flatnonzero(official_y == label), np.flatnonzero(built_y == label)
        if not len(cand):
            continue
        for lo in range(0, len(rows), chunk):
            r = rows[lo:lo + chunk]
            worst = worst_channel_corr(zo[:, r], zb[:, cand])
            j = worst.argmax(axis=1)
            score[r], index[r] = worst[np.arange(len(r)), j], cand[j]
    return score, index


def report_match(name: str, official: np.ndarray, official_y: np.ndarray, built: np.ndarray,
                 built_y: np.ndarray) -> np.ndarray:
    """Print figure (a) for one recipe; returns which official windows were matched."""
    score, index = best_match(official, official_y, built, built_y)
    hit = score >= THRESHOLD
    diff = np.abs(official[hit] - built[index[hit]]).max() if hit.any() else float("nan")
    per_class = " ".join(f"{har.ACTIVITIES[a - 1][:8]}={hit[official_y == a].mean():.0%}"
                         for a in np.unique(official_y))
    print(f"  {name:28s} matched {hit.mean():6.1%} ({hit.sum()}/{len(hit)}), median worst-channel "
          f"corr {np.median(score):.4f}, max |diff| of matches {diff:.1e}; {per_class}")
    return hit


def placement_free(official: np.ndarray, official_y: np.ndarray, recordings, pipeline: hapt.Pipeline,
                   margin: int = 256, block: int = 8192) -> np.ndarray:
    """Worst-channel correlation of each official window with the best window of the
    continuous built signal at *any* start (stride 1) within ``margin`` samples of a run
    of its label: separates signal fidelity from window placement (label boundaries)."""
    from numpy.lib.stride_tricks import sliding_window_view

    zo = standardise(official)
    score = np.full(len(official), -1.0)
    for rec in recordings:
        signals = hapt.preprocess(rec.acc, rec.gyro, pipeline)
        for label in np.unique(official_y):
            near = np.zeros(len(signals), dtype=bool)
            for activity, a, b in hapt.activity_runs(rec.labels):
                if activity == label:
                    near[max(a - margin, 0):b + margin] = True
            starts = np.flatnonzero(near[:len(signals) - pipeline.window + 1])
            rows = np.flatnonzero(official_y == label)
            for lo in range(0, len(starts), block):
                windows = sliding_window_view(signals, pipeline.window, axis=0)[starts[lo:lo + block]]
                worst = worst_channel_corr(zo[:, rows], standardise(windows.transpose(0, 2, 1)))
                score[rows] = np.maximum(score[rows], worst.max(axis=1))
    return score


# ----------------------------------------------------------------------------- (b)

class GRUClassifier(torch.nn.Module):
    """Per-channel standardisation (training statistics) -> 1-layer GRU -> linear on h_T."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int, classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.gru = torch.nn.GRU(mean.numel(), hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru((x - self.mean) / self.std)
        return self.head(h[-1])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return 100.0 * (pred == y).float().mean().item()


def train_and_score(task: str, train: har.HARDataset, tests: dict[str, tuple[np.ndarray, np.ndarray]],
                    args: argparse.Namespace, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    x = torch.from_numpy(train.windows)
    y = torch.as_tensor(np.asarray(train.targets))
    flat = x.reshape(-1, x.shape[-1]).double()
    model = GRUClassifier(flat.mean(0).float(), flat.std(0).clamp_min(1e-5).float(), args.hidden,
                          len(train.classes))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch):
            b = order[i:i + args.batch]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    mapping = har.TASK_LABELS[task]
    return {name: accuracy(model, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)),
                           torch.as_tensor(mapping[a]))
            for name, (w, a) in tests.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 epochs, one seed, no placement-free search: a smoke run")
    p.add_argument("--variants", default="uci",
                   help=f"comma-separated recipes for (a), or 'all': {', '.join(VARIANTS)}")
    p.add_argument("--train-variants", default="uci",
                   help="comma-separated recipes whose windows train the model of (b), or 'all'")
    p.add_argument("--skip-training", action="store_true", help="only figure (a)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs for (b)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds for (b); gaps are averaged")
    p.add_argument("--hidden", type=int, default=32, help="GRU hidden size for (b)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate for (b)")
    p.add_argument("--batch", type=int, default=64, help="batch size for (b)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--official", type=Path, default=OFFICIAL_TEST, help="official test split .npz (X [N,9,128], y)")
    p.add_argument("--subset", type=Path, default=OFFICIAL_SUBSET, help="official-layout UCI HAR subset (optional)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="cache folder of the built windows (default: data_home()/hapt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 3, 1
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    train_names = list(VARIANTS) if args.train_variants == "all" else args.train_variants.split(",")
    unknown = [n for n in names + train_names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; expected {', '.join(VARIANTS)} or all")
    if not args.official.is_file():
        p.error(f"{args.official} not found: the official UCI HAR test split is needed")
    torch.set_num_threads(args.threads)
    progress = not args.no_progress

    with np.load(args.official) as z:
        official = z["X"].transpose(0, 2, 1).astype(np.float32)  # [N, 128, 9]
        official_y = z["y"].astype(np.int64)
    print(f"official test split: {official.shape[0]} windows ({args.official})")

    print(f"(a) official windows with a built window of the same label at corr >= {THRESHOLD} on all 9 channels")
    t0 = time.time()
    test_recordings = hapt.read_recordings(subjects=har.TEST_VOLUNTEERS)
    for name in names:
        built = hapt.build_arrays(test_recordings, VARIANTS[name], progress=False)
        hit = report_match(f"test, {name}", official, official_y, built["windows"], built["activities"])
        if name == "uci" and not args.quick and not hit.all():
            score = placement_free(official[~hit], official_y[~hit], test_recordings, VARIANTS[name])
            found = score >= THRESHOLD
            print(f"  {'':28s} of the {len(found)} unmatched, {found.sum()} ({found.mean():.1%}) match a built "
                  f"window at another start (stride 1): all matched {(hit.sum() + found.sum()) / len(hit):.1%}")
    train_ds = har.load_har("har6", "train", None, carve_val=False, progress=progress, out_dir=args.out_dir)
    if (args.subset / har.ARCHIVE_DIR).is_dir() or (args.subset / "train").is_dir():
        subset = har.load_har("har6", "train", args.subset, carve_val=False, progress=False)
        report_match("train subset, uci", subset.windows, subset.activities, train_ds.windows, train_ds.activities)
    print(f"  ({time.time() - t0:.0f} s)")
    if args.skip_training:
        return 0

    print(f"(b) GRU(hidden {args.hidden}) trained {args.epochs} epochs on the built training windows; "
          f"accuracy % on the built test windows and on the official test split, {args.seeds} seed(s)")
    for name in train_names:
        if name == "uci":  # the cached windows that load_har(root=None) serves
            train_w, train_a = train_ds.windows, train_ds.activities
            test_w, test_a, _, _ = hapt.load_hapt_split("test", out_dir=args.out_dir, progress=False)
        else:
            built = hapt.build_arrays(hapt.read_recordings(), VARIANTS[name], progress=progress)
            is_test = np.isin(built["subjects"], har.TEST_VOLUNTEERS)
            train_w, train_a = built["windows"][~is_test], built["activities"][~is_test]
            test_w, test_a = built["windows"][is_test], built["activities"][is_test]
        tests = {"built": (test_w, test_a), "official": (official, official_y)}
        for task in ("har6", "har2"):
            train = har.HARDataset(train_w, train_a, task)
            t0 = time.time()
            runs = [train_and_score(task, train, tests, args, seed) for seed in range(args.seeds)]
            built_acc = np.array([r["built"] for r in runs])
            official_acc = np.array([r["official"] for r in runs])
            gap = built_acc - official_acc
            print(f"  {name}, {task} ({len(train)} training windows): built {built_acc.mean():.2f}  "
                  f"official {official_acc.mean():.2f}  gap {gap.mean():+.2f} "
                  f"(per seed {', '.join(f'{g:+.2f}' for g in gap)})  [{time.time() - t0:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
