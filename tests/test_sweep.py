"""Sweeps: expansion and validation of sweep files, parallel runs, skipping, resuming,
recorded failures, the job list and ``collect``.

Runs train a tiny FastGRNN on a tiny in-memory dataset passed through ``datasets=`` (a
module-level function, so spawned worker processes can import it).
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from str_rnn import runs
from str_rnn.sweep import collect, load_sweep, run_sweep, write_jobs


class Tiny(torch.utils.data.Dataset):
    """``n`` sequences ``[10, 3]`` whose class shifts the mean of the first feature."""

    classes = ["low", "high"]

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 10, 3, generator=g)
        self.x[:, :, 0] += 2 * self.y.view(-1, 1)
        self.targets = self.y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def tiny_data(config) -> dict:
    return {"train": Tiny(40, 0), "val": Tiny(20, 1), "test": Tiny(20, 2)}


BASE = {"hidden_size": 4, "epochs": 2, "batch_size": 10, "device": "cpu"}


def sweep_file(tmp_path, **changes) -> Path:
    sweep = {
        "out": str(tmp_path / "sweep"),
        "base": BASE,
        "seeds": [0, 1],
        "groups": [
            {"name": "str", "base": {"mode": "str"}, "grid": {"spectrum_decay": [0.0, 0.5]}},
            {"name": "fixed", "base": {"mode": "fixed"}, "grid": {"rank_w,rank_u": [[2, 2], [99, 1]]}},
            {"name": "dense", "base": {"mode": "dense"}, "seeds": [0]},
        ],
        **changes,
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    return path


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- expansion and validation ------------------------------------------------------------------

def test_expansion_names_and_order(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path))
    names = [r.rel_dir.as_posix() for r in sweep.runs]
    assert names == ["str/spectrum_decay=0,seed=0", "str/spectrum_decay=0,seed=1",
                     "str/spectrum_decay=0.5,seed=0", "str/spectrum_decay=0.5,seed=1",
                     "fixed/rank_w=2,rank_u=2,seed=0", "fixed/rank_w=2,rank_u=2,seed=1",
                     "fixed/rank_w=99,rank_u=1,seed=0", "fixed/rank_w=99,rank_u=1,seed=1",
                     "dense/seed=0"]
    run = sweep.runs[6]
    assert (run.config.mode, run.config.rank_w, run.config.rank_u, run.config.seed) == ("fixed", 99, 1, 0)
    assert run.config.hidden_size == 4 and run.config.lr_steps == [1]  # resolved
    # the same file gives the same folders; out= and overrides= apply
    again = load_sweep(sweep_file(tmp_path), out=tmp_path / "elsewhere", overrides={"epochs": 3})
    assert [r.rel_dir for r in again.runs] == [r.rel_dir for r in sweep.runs]
    assert again.out == tmp_path / "elsewhere" and {r.config.epochs for r in again.runs} == {3}


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "key 'bogus' is unknown"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"seeds": "0"}, "key 'seeds': expected a list"),
    ({"base": {"lr": "fast"}}, "config key 'lr': expected a number"),
    ({"base": {"seed": 3}}, "list seeds in \"seeds\""),
    ({"groups": []}, "at least one group"),
    ({"groups": [{"grid": {}}]}, "key 'name' is missing"),
    ({"groups": [{"name": "a", "grid": {"hiden_size": [4]}}]}, "config key 'hiden_size' is unknown"),
    ({"groups": [{"name": "a", "grid": {"rank_w,rank_u": [[1, 2, 3]]}}]}, "each value must be a list of 2"),
    ({"groups": [{"name": "a", "grid": {"lr": 0.1}}]}, "expected a non-empty list"),
    ({"groups": [{"name": "a", "colour": "red"}]}, "key 'colour' is unknown"),
    ({"groups": [{"name": "a/b"}]}, "must be a folder name"),
    ({"groups": [{"name": "a"}, {"name": "a"}]}, "used twice"),
    ({"groups": [{"name": "a", "base": {"mode": "fixed"}}]}, "mode=fixed needs rank_w and rank_u"),
    ({"groups": [{"name": "a", "grid": {"lr": [0.1, 0.1]}}]}, "share the folder"),
    ({"groups": [{"name": "a", "base": {"lr": 0.1}, "grid": {"lr": [0.2]}}]}, "both the group's base and its grid"),
])
def test_bad_sweep_files_raise_one_line(tmp_path, change, message):
    with pytest.raises(ValueError) as e:
        load_sweep(sweep_file(tmp_path, **change))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"sweep config {tmp_path / 'sweep.json'}: ")  # names the file


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_sweep(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sweep(bad)
    with pytest.raises(ValueError, match="'out' is missing"):
        load_sweep({"groups": [{"name": "a"}]})


# -- running -----------------------------------------------------------------------------------

RUN_GROUPS = [
    {"name": "str", "base": {"mode": "str"}, "grid": {"spectrum_decay": [0.5]}},
    {"name": "fixed", "base": {"mode": "fixed"}, "grid": {"rank_w,rank_u": [[2, 2], [99, 1]]}},
    {"name": "dense", "base": {"mode": "dense"}},
]


def test_sweep_runs_skips_resumes_and_records_failures(tmp_path):
    path = sweep_file(tmp_path, groups=RUN_GROUPS, seeds=[0])
    results = run_sweep(path, workers=2, threads_per_worker=1, progress=False, datasets=tiny_data)
    out = tmp_path / "sweep"
    assert results == out / "results.csv"
    rows = read_csv(results)
    assert [r["run_dir"] for r in rows] == ["str/spectrum_decay=0.5,seed=0", "fixed/rank_w=2,rank_u=2,seed=0",
                                            "fixed/rank_w=99,rank_u=1,seed=0", "dense/seed=0"]
    by_dir = {r["run_dir"]: r for r in rows}
    # rank_w=99 on a 3-input W fails when the model is built: recorded, the sweep went on
    bad = by_dir["fixed/rank_w=99,rank_u=1,seed=0"]
    assert bad["status"] == "failed" and bad["error"].startswith("ValueError:") and "99" in bad["error"]
    assert (out / bad["run_dir"] / "error.txt").read_text().startswith(bad["error"])
    assert bad["rank_w"] == "99" and bad["final_test_acc"] == ""
    finished = [r for r in rows if r["status"] == "finished"]
    assert len(finished) == 3 and all(r["error"] == "" for r in finished)
    for r in finished:
        result = runs.read_result(out / r["run_dir"])
        assert float(r["final_test_acc"]) == pytest.approx(result["final_test_acc"])
        assert int(r["seed"]) == result["seed"] == 0 and r["mode"] == r["group"]
    assert by_dir["fixed/rank_w=2,rank_u=2,seed=0"]["final_rank_w_total"] == "2"
    assert by_dir["dense/seed=0"]["variant"] == "" and by_dir["str/spectrum_decay=0.5,seed=0"]["variant"] == \
        "spectrum_decay=0.5"

    # rerun: finished runs are skipped; a run without result.json but with a checkpoint is
    # resumed (and reaches the same result); the failing run is tried again
    stamps = {r["run_dir"]: os.stat(out / r["run_dir"] / "result.json").st_mtime_ns for r in finished}
    resumed = "str/spectrum_decay=0.5,seed=0"
    before = runs.read_result(out / resumed)
    (out / resumed / "result.json").unlink()
    rows2 = read_csv(run_sweep(path, workers=1, progress=False, datasets=tiny_data))
    for d, stamp in stamps.items():
        if d != resumed:
            assert os.stat(out / d / "result.json").st_mtime_ns == stamp, d
    after = runs.read_result(out / resumed)
    assert after["final_test_acc"] == before["final_test_acc"] and after["final_params"] == before["final_params"]
    assert [r["status"] for r in rows2] == [r["status"] for r in rows]

    # a changed base that alters the numbers is refused before anything runs
    changed = sweep_file(tmp_path, base={**BASE, "lr": 0.5}, groups=RUN_GROUPS, seeds=[0])
    with pytest.raises(ValueError, match=r"holds a run of another configuration \(lr=0.01"):
        run_sweep(changed, workers=1, progress=False, datasets=tiny_data)
    # collect() rebuilds the same table from the folder
    assert read_csv(collect(out)) == rows2


def test_write_jobs_and_collect(tmp_path):
    path = sweep_file(tmp_path, groups=[{"name": "fixed", "base": {"mode": "fixed"},
                                         "grid": {"rank_w,rank_u": [[2, 2]]}}], seeds=[0])
    jobs = write_jobs(path, tmp_path / "jobs.sh")
    lines = jobs.read_text().splitlines()
    out = tmp_path / "sweep"
    run_dir = out / "fixed" / "rank_w=2,rank_u=2,seed=0"
    assert len(lines) == 1 and f"--out {shlex.quote(str(run_dir))}" in lines[0]
    config_file = out / "configs" / "fixed" / "rank_w=2,rank_u=2,seed=0.json"
    assert f"--config {shlex.quote(str(config_file))}" in lines[0]
    assert json.loads(config_file.read_text())["model"]["rank_w"] == 2
    rows = read_csv(collect(out))
    assert [r["status"] for r in rows] == ["pending"]
    # the job line's branches: a finished run is skipped, one with a checkpoint resumed
    (run_dir).mkdir(parents=True)
    (run_dir / "result.json").write_text("{}")
    done = subprocess.run(["bash", "-c", lines[0]], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == ""
    (run_dir / "result.json").unlink()
    (run_dir / "checkpoint.pt").write_text("")
    fake = tmp_path / "fake-cli"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    lines = write_jobs(path, tmp_path / "jobs.sh", command=str(fake)).read_text().splitlines()
    resumed = subprocess.run(["bash", "-c", lines[0]], capture_output=True, text=True)
    assert resumed.stdout.split() == ["train", "--resume", str(run_dir), "--no-progress"]
    with pytest.raises(FileNotFoundError, match="sweep.json"):
        collect(tmp_path / "nothing")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments").rglob("*.json")),
                         ids=lambda p: p.parent.name + "/" + p.name)
def test_every_experiment_sweep_file_is_valid(path):
    """The sweep files the experiments README quotes load and expand (keys, types, grids)."""
    sweep = load_sweep(path)
    assert len(sweep.runs) >= 1
