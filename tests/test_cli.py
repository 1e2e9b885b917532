"""``str-rnn``: smoke runs of every command on tiny data, and every bad-input case.

Training data come from the in-memory datasets of ``test_train`` through the engine's
data hook (``str_rnn.train.load_splits``), except one run on the real UCI HAR subset.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from str_rnn import cli, runs
from str_rnn import train as engine
from test_train import Faulty, tiny_splits  # tests/ is on sys.path under pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--hidden-size", "6", "--epochs", "2", "--batch-size", "10", "--threads", "1", "--no-progress",
        "--device", "cpu"]


@pytest.fixture
def tiny_data(monkeypatch):
    """Every command reads the tiny splits; ``tiny_data.next_train`` replaces the next train split."""

    class Hook:
        next_train = None

        def __call__(self, config, splits=("train", "val", "test")):
            data = tiny_splits()
            if self.next_train is not None:
                data["train"], self.next_train = self.next_train, None
            return {s: data[s] for s in splits}

    hook = Hook()
    monkeypatch.setattr(engine, "load_splits", hook)
    return hook


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_summary_compact(tmp_path, capsys, tiny_data):
    code, out, err = run(capsys, "train", "--task", "har2", "--mode", "str", "--out", tmp_path / "r",
                         "--spectrum-decay", "3", "--spectrum-penalty", "l1", *TINY)
    assert code == 0, err
    result = runs.read_result(tmp_path / "r")
    assert f"test {result['final_test_acc']:.2f}%" in out and str(tmp_path / "r") in out
    assert result["spectrum_decay"] == 3.0 and result["hidden_size"] == 6

    code, out, err = run(capsys, "eval", tmp_path / "r", "--model", "final")
    assert code == 0, err
    assert f"{result['final_test_acc']:.2f}%" in out
    code, out_compact, err = run(capsys, "eval", tmp_path / "r", "--model", "compact")
    assert code == 0, err
    assert re.search(r"\d+\.\d+%", out).group() == re.search(r"\d+\.\d+%", out_compact).group()
    code, out, _ = run(capsys, "eval", tmp_path / "r", "--split", "val")  # best/ by default
    assert code == 0 and f"{result['selected_val_acc']:.2f}%" in out

    code, out, err = run(capsys, "summary", tmp_path / "r")
    assert code == 0, err
    assert "rnn.layers.0.U" in out and "FLOPs per sequence of 12 steps" in out
    assert f"{result['final_params']:,}" in out

    code, out, err = run(capsys, "compact", tmp_path / "r", "--out", tmp_path / "small")
    assert code == 0, err
    meta = json.loads((tmp_path / "small" / "meta.json").read_text())
    assert meta["params"] == result["final_params"] and meta["compacted"]
    change = float(re.search(r"change on random input (\S+)", out).group(1))
    assert change < 1e-4


def test_train_with_a_json_config_and_default_run_dir(tmp_path, capsys, tiny_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"model": {"cell": "gru", "mode": "fixed", "rank_w": 2,
                                                           "rank_u": 3}, "lr": 0.005}))
    code, out, err = run(capsys, "train", "--config", "c.json", "--lr", "0.002", *TINY)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("har2-gru-fixed-s0-")
    config = runs.read_config(run_dir)
    assert (config.cell, config.rank_u, config.lr) == ("gru", 3, 0.002)  # flags beat the file


def test_ctrl_c_then_resume(tmp_path, capsys, tiny_data, monkeypatch):
    monkeypatch.setattr(engine, "split_statistics", lambda ds: (ds.x.reshape(-1, 3).mean(0),
                                                                ds.x.reshape(-1, 3).std(0), 12))
    cut = Faulty(60, 0, fault="interrupt", after=70)
    cut.armed = True
    tiny_data.next_train = cut
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", *TINY)
    assert code == 130
    assert f"str-rnn train --resume {tmp_path / 'r'}" in err
    code, _, err = run(capsys, "train", "--resume", tmp_path / "r", "--lr", "0.5")
    assert code == 2 and "lr=0.5" in err
    code, out, err = run(capsys, "train", "--resume", tmp_path / "r", "--no-progress")
    assert code == 0, err
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "r")] == [1, 2]
    code, _, err = run(capsys, "train", "--resume", tmp_path / "r")
    assert code == 2 and "finished" in err


def test_nonfinite_stop_exits_1(tmp_path, capsys, tiny_data, monkeypatch):
    monkeypatch.setattr(engine, "split_statistics", lambda ds: (ds.x.reshape(-1, 3).mean(0),
                                                                ds.x.reshape(-1, 3).std(0), 12))
    bad = Faulty(60, 0, fault="nan", after=0)
    bad.armed = True
    tiny_data.next_train = bad
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", *TINY)
    assert code == 1 and "non-finite training step at epoch 1" in err and "there is no checkpoint" in err


@pytest.mark.parametrize("argv, message", [
    (["--task", "mnist"], "invalid choice: 'mnist'"),
    (["--cell", "rnn"], "invalid choice: 'rnn'"),
    (["--mode", "tiny"], "invalid choice: 'tiny'"),
    (["--mode", "fixed", "--rank-w", "40", "--rank-u", "2"], "rank=40 out of range"),
    (["--mode", "str", "--rank-u", "7"], "rank"),
    (["--mode", "fixed", "--rank-w", "0", "--rank-u", "2"], "rank_w=0: expected a positive integer"),
    (["--mode", "str", "--rank-u", "0"], "rank_u=0: expected a positive integer (0 only with mode=fixed)"),
    (["--mode", "fixed"], "mode=fixed needs rank_w"),
    (["--lr", "-1"], "lr=-1.0"),
    (["--select", "budget"], "select=budget needs"),
])
def test_bad_train_arguments_exit_2_and_write_nothing(tmp_path, capsys, tiny_data, argv, message):
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", *TINY, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, message", [
    ({"colour": "red"}, "'colour' is unknown"),
    ({"optim": {"lr": "fast"}}, "'lr': expected a number"),
    ({"run": {"epochs": 1.5}}, "'epochs': expected an integer"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_file_exits_2(tmp_path, capsys, tiny_data, content, message):
    path = tmp_path / "c.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code, _, err = run(capsys, "train", "--config", path, "--out", tmp_path / "r", *TINY)
    assert code == 2 and message in err and str(path) in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["eval", "summary", "compact"])
def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys, command):
    code, _, err = run(capsys, command, tmp_path)
    assert code == 2 and "is not a run directory" in err and len(err.strip().splitlines()) == 1


def test_resume_of_a_non_run_and_used_out_dir(tmp_path, capsys, tiny_data):
    code, _, err = run(capsys, "train", "--resume", tmp_path / "nothing")
    assert code == 2 and "not a run directory" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("")
    code, _, err = run(capsys, "train", "--out", tmp_path / "used", *TINY)
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("command", ["train", "eval", "summary", "compact", "sweep", "plot", "data"])
def test_every_command_has_help_with_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "example" in out and f"str-rnn {command}" in out


def test_data_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STR_RNN_DATA", str(tmp_path))
    (tmp_path / "fsdd").mkdir()
    (tmp_path / "fsdd" / "a.wav").write_bytes(b"")
    (tmp_path / "speech_commands_v0.01").mkdir()
    code, out, _ = run(capsys, "data", "list")
    assert code == 0 and str(tmp_path.resolve()) in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "present, 1 files" in lines["fsdd"] and "absent; get it with: str-rnn data hapt" in lines["har2"]
    assert "speech_commands_v0.01" in out


def test_sweep_and_plot_name_missing_inputs(tmp_path, capsys):
    code, _, err = run(capsys, "sweep", tmp_path / "none.json")
    assert code == 2 and ("none.json" in err or "str_rnn.sweep" in err)
    code, _, err = run(capsys, "plot", tmp_path / "none.csv")
    assert code == 2 and ("none.csv" in err or "str_rnn.plots" in err)


@pytest.mark.skipif(not (SHARED / "uci_har_subset").is_dir(), reason="shared UCI HAR subset not present")
def test_train_on_the_real_uci_har_subset(tmp_path, capsys):
    pytest.importorskip("str_rnn.datasets.har")
    code, out, err = run(capsys, "train", "--task", "har2", "--data", SHARED / "uci_har_subset",
                         "--out", tmp_path / "r", "--epochs", "1", "--limit-batches", "2", "--hidden-size", "8",
                         "--threads", "1", "--no-progress", "--device", "cpu")
    assert code == 0, err
    result = runs.read_result(tmp_path / "r")
    assert result["input_size"] == 9 and result["num_classes"] == 2 and result["seq_len"] == 128
    assert 0 <= result["final_test_acc"] <= 100

