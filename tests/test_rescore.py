"""Scoring a sweep's runs on another dataset (``str_rnn.rescore``, ``str-rnn eval SWEEP``).

The check that needs no second dataset: scoring every run on its own validation split
must give back the validation accuracies the runs recorded, for the final and the
selected model alike, and scoring on its own test split the test accuracies.
"""
from __future__ import annotations

import csv
import json

import pytest

from str_rnn import cli
from str_rnn import train as engine
from str_rnn.plots import results_table
from str_rnn.rescore import rescore
from str_rnn.sweep import run_sweep
from test_sweep import BASE, Tiny, tiny_data  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """Two groups x two seeds; the learned-rank group selects its best-validation epoch."""
    tmp = tmp_path_factory.mktemp("rescore")
    path = tmp / "sweep.json"
    path.write_text(json.dumps({
        "out": str(tmp / "sweep"), "base": {**BASE, "epochs": 4}, "seeds": [0, 1],
        "groups": [{"name": "str", "base": {"mode": "str", "select": "best-val"}},
                   {"name": "fixed", "base": {"mode": "fixed", "rank_w": 2, "rank_u": 2}}]}))
    run_sweep(path, workers=1, progress=False, datasets=tiny_data)
    return tmp / "sweep"


@pytest.fixture
def own_data(monkeypatch):
    """``load_splits`` hands out the splits the sweep trained on."""
    monkeypatch.setattr(engine, "load_splits", lambda config, splits: {s: tiny_data(config)[s] for s in splits})


def rows_of(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("split", ["val", "test"])
def test_scoring_on_the_runs_own_split_gives_back_their_figures(sweep_dir, own_data, tmp_path, split):
    out = rescore(sweep_dir, "same-data", split=split, out=tmp_path / "scored.csv")
    rows = rows_of(out)
    assert len(rows) == 4 and all(r["scored_on"] == f"same-data:{split}" for r in rows)
    own = {r["run_dir"]: r for r in rows_of(sweep_dir / "results.csv")}
    assert any(r["selected_epoch"] != r["final_epoch"] for r in own.values())  # best/ is scored too
    for r in rows:
        for which in ("final", "selected"):
            assert float(r[f"{which}_test_acc"]) == pytest.approx(float(own[r["run_dir"]][f"{which}_{split}_acc"]))
            assert r[f"own_{which}_test_acc"] == own[r["run_dir"]][f"{which}_test_acc"]
    # the default name sits beside results.csv; the table says what the accuracies are on
    default = rescore(sweep_dir / "results.csv", "some/dir/official.npz", split=split)
    assert default == sweep_dir / f"results_official_{split}.csv"
    assert f"| official.npz {split} acc % |" in results_table(default).splitlines()[0]
    with pytest.raises(ValueError, match="written by rescore"):  # its own_* columns would be overwritten
        rescore(default, "other.npz")


def test_another_dataset_is_scored_and_mismatched_classes_are_refused(sweep_dir, monkeypatch, tmp_path):
    other = Tiny(20, 7)
    monkeypatch.setattr(engine, "load_splits", lambda config, splits: {s: other for s in splits})
    rows = rows_of(rescore(sweep_dir, "other", out=tmp_path / "other.csv"))
    own = {r["run_dir"]: r for r in rows_of(sweep_dir / "results.csv")}
    # accuracies on 20 items are multiples of 5 %, and not all equal to the runs' own
    assert all(float(r["final_test_acc"]) % 5 == pytest.approx(0) for r in rows)
    assert any(r["final_test_acc"] != own[r["run_dir"]]["final_test_acc"] for r in rows)

    other.classes = ["high", "low"]
    with pytest.raises(ValueError, match=r"classes \['high', 'low'\] differ from the model's \['low', 'high'\]"):
        rescore(sweep_dir, "other", out=tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


def test_cli_eval_of_a_sweep(sweep_dir, own_data, tmp_path, capsys):
    code = cli.main(["eval", str(sweep_dir), "--data", "d", "--split", "val", "--out", str(tmp_path / "v.csv"),
                     "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[-1] == f"results: {tmp_path / 'v.csv'}" and "| har2 | str | str | 2 |" in out
    scored = {(r["group"], int(r["seed"])): float(r["final_test_acc"]) for r in rows_of(tmp_path / "v.csv")}
    line = next(x for x in out.splitlines() if x.startswith("| har2 | fixed |"))
    assert line.endswith(f"| {scored['fixed', 0]:.2f} {scored['fixed', 1]:.2f} |")  # per seed, in seed order
    for argv, message in ([["--split", "val"], "scoring a sweep needs --data"],
                          [["--data", "d", "--model", "final"], "--model is for one run"]):
        assert cli.main(["eval", str(sweep_dir), *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="expected a sweep folder"):
        rescore(tmp_path, "d")
