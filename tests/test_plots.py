"""Plots from a synthetic results.csv, metrics.jsonl files and saved models: every figure
is a real PNG and PDF, groups of seeds become one point, bad input raises."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import str_rnn
from str_rnn.plots import _points, plot_accuracy_vs_size, plot_results, plot_run, plot_spectrum, read_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_images(paths, names=None):
    paths = [Path(p) for p in paths]
    assert paths and all(p.is_file() and p.stat().st_size > 0 for p in paths)
    for p in paths:
        head = p.read_bytes()[:8]
        assert head == (PNG_SIGNATURE if p.suffix == ".png" else b"%PDF-1.4"[:5] + head[5:8]), p
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    if names is not None:
        assert {p.stem for p in paths} == set(names)


def tiny_model(mode: str, prune_to=None):
    rnn = str_rnn.RNN("fastgrnn", 3, 6, matrix=mode, **({"rank_w": 2, "rank_u": 2} if mode == "fixed" else {}))
    if prune_to is not None:
        with torch.no_grad():
            for m, r in zip((rnn.layers[0].W, rnn.layers[0].U), prune_to):
                mags = m.sigma.abs().sort(descending=True).values
                cut = mags[-1] / 2 if r == len(mags) else (mags[r - 1] + mags[r]) / 2
                m.threshold.s.fill_(float(torch.log(cut)))
            rnn.layers[0].U.sigma[-1] = 0.0  # an exact zero is drawn too
    return str_rnn.SequenceClassifier(rnn, 2)


RUNS = [  # group, mode, variant, seed, params, test acc, (r_W, r_U)
    ("str", "str", "spectrum_decay=0.3", 0, 120, 80.0, (3, 4)),
    ("str", "str", "spectrum_decay=0.3", 1, 110, 84.0, (3, 3)),
    ("str", "str", "spectrum_decay=1", 0, 60, 70.0, (1, 2)),
    ("str", "str", "spectrum_decay=1", 1, 64, 72.0, (2, 2)),
    ("fixed", "fixed", "rank_w=2,rank_u=2", 0, 90, 75.0, (2, 2)),
    ("fixed", "fixed", "rank_w=2,rank_u=2", 1, 90, 77.0, (2, 2)),
    ("dense", "dense", "", 0, 200, 88.0, (3, 6)),
    ("dense", "dense", "", 1, 200, 90.0, (3, 6)),
    ("fixed", "fixed", "rank_w=9,rank_u=9", 0, None, None, (None, None)),  # failed
]


@pytest.fixture
def sweep_dir(tmp_path):
    rows = []
    for group, mode, variant, seed, params, acc, (rw, ru) in RUNS:
        rel = f"{group}/{variant + ',' if variant else ''}seed={seed}"
        run = tmp_path / rel
        run.mkdir(parents=True)
        status = "finished" if acc is not None else "failed"
        if status == "finished":
            epochs = [{"epoch": e, "ranks": {"rnn.layers.0.W": max(rw, 3 - e), "rnn.layers.0.U": max(ru, 6 - e)},
                       "train_acc": 50 + e, "val_acc": 49 + e, "test_acc": 48 + e, "train_loss": 1 / e,
                       "params": params + 10 * (3 - e)} for e in (1, 2, 3)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
            if mode == "str":
                str_rnn.save(tiny_model("str", prune_to=(rw, ru)), run / "final")
        rows.append({"group": group, "variant": variant, "seed": seed, "status": status,
                     "error": "" if acc is not None else "ValueError: rank", "run_dir": rel, "task": "har2",
                     "mode": mode, "cell": "fastgrnn", "rank_w": rw if mode == "fixed" else "",
                     "rank_u": ru if mode == "fixed" else "", "spectrum_decay": variant.partition("=")[2] or 0.0,
                     "select": "last", "final_test_acc": acc if acc is not None else "",
                     "final_params": params if params is not None else "", "final_bytes": 4 * params if params else "",
                     "final_rank_w_total": rw if rw is not None else "", "final_rank_u_total": ru if ru is not None else ""})
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def test_points_average_seeds(sweep_dir):
    rows = [r for r in read_results(sweep_dir / "results.csv") if r["status"] == "finished"]
    series = _points(rows, "params", "final")
    assert set(series) == {("str", "str"), ("fixed", "fixed"), ("dense", "dense")}
    low, high = series[("str", "str")]  # sorted by size
    assert (low["x"], low["y"], low["n"]) == (62.0, 71.0, 2)
    assert low["yerr"] == pytest.approx(np.std([70.0, 72.0], ddof=1))
    assert high["ranks"] == (3.0, 3.5) and high["xerr"] == pytest.approx(np.std([120, 110], ddof=1))
    assert [p["n"] for p in series[("fixed", "fixed")]] == [2]


def test_plot_results_writes_every_figure(sweep_dir):
    paths = plot_results(sweep_dir / "results.csv", sweep_dir / "plots")
    assert_images(paths, {"accuracy_vs_params", "accuracy_vs_rank", "rank_over_epochs",
                          "spectrum_str_spectrum_decay=0.3", "spectrum_str_spectrum_decay=1"})
    assert paths[0].name == "accuracy_vs_params.png"
    assert all(p.parent == sweep_dir / "plots" for p in paths)


def test_plot_run_and_spectrum(sweep_dir, tmp_path):
    run = sweep_dir / "str" / "spectrum_decay=0.3,seed=0"
    assert_images(plot_run(run), {"curves", "ranks", "spectrum"})
    # a fixed-rank model's spectrum: its singular values, no threshold
    str_rnn.save(tiny_model("fixed"), tmp_path / "fixed_model" / "final")
    assert_images(plot_spectrum(tmp_path / "fixed_model", tmp_path / "out" / "spec"), {"spec"})


def test_bad_input(sweep_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        plot_results(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        plot_results(bad)
    rows = read_results(sweep_dir / "results.csv")
    with pytest.raises(ValueError, match="x='depth'"):
        plot_accuracy_vs_size(rows, tmp_path / "x", x="depth")
    failed_only = tmp_path / "failed.csv"
    lines = (sweep_dir / "results.csv").read_text().splitlines()
    failed_only.write_text("\n".join([lines[0], lines[-1]]) + "\n")
    with pytest.raises(ValueError, match="no finished run"):
        plot_results(failed_only)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
