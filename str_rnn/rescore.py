"""Score trained models on another test set: one run, or every run of a sweep.

HAR models here train on windows rebuilt from the UCI HAPT recordings and are reported on
the official UCI HAR test split; a sweep's ``results.csv`` holds the accuracy on the split
the runs trained with. :func:`rescore` evaluates every finished run's saved models on
another dataset and writes a results CSV in the same format, so the same table and plot
code (``str-rnn plot``, :func:`str_rnn.plots.results_table`) reports the new figures:

    final_test_acc      accuracy of the run's final model (final/) on ``split`` of ``data``
    selected_test_acc   the same for the selected model (best/), empty when there is none
    own_final_test_acc, own_selected_test_acc   the run's own figures, kept beside them
    scored_on           ``"DATA:SPLIT"``

Nothing is averaged or selected here: one row per run, as in ``results.csv``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from tqdm import tqdm

from . import runs
from . import train as engine
from .serialize import load
from .sweep import RESULTS, write_results

__all__ = ["check_classes", "score_saved", "rescore"]


def check_classes(dataset, meta: dict, where: str) -> None:
    """Refuse to score a model on a dataset whose class list differs from the one it trained on."""
    classes = list(getattr(dataset, "classes", meta.get("classes", [])))
    if meta.get("classes") and classes != meta["classes"]:
        raise ValueError(f"{where}: the dataset's classes {classes} differ from the model's {meta['classes']}")


def score_saved(folder, dataset, *, batch_size: int = 500) -> tuple[int, int]:
    """``(correct, total)`` of the model saved in ``folder`` (:func:`str_rnn.save`) on ``dataset``."""
    folder = Path(folder)
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: {folder} is not a saved model")
    check_classes(dataset, json.loads(meta_file.read_text()), str(folder))
    return engine.count_correct(load(folder), dataset, batch_size=batch_size)


def _results_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a sweep folder or the results.csv `str-rnn sweep` wrote")
    return path


def rescore(results, data, *, split: str = "test", out=None, batch_size: int = 500, progress: bool = False) -> Path:
    """Score every finished run of a sweep on ``split`` of the dataset at ``data``.

    Args:
        results: a sweep folder or its ``results.csv``.
        data: dataset file or folder for the runs' task (as ``--data`` of ``str-rnn train``).
        split: which split of ``data``.
        out: the CSV to write (default: ``results_{data stem}_{split}.csv`` beside ``results``).
        progress: show a progress bar over the runs.

    Returns:
        the path of the CSV written (atomically).

    Raises:
        FileNotFoundError: no results file, or a finished run lacks its saved model.
        ValueError: the file is not a sweep's results, or a model's classes differ from the data's.
    """
    path = _results_file(results)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "run_dir" not in rows[0] or "status" not in rows[0]:
        raise ValueError(f"{path}: expected the results.csv `str-rnn sweep` writes (columns run_dir, status)")
    if "scored_on" in rows[0]:
        raise ValueError(f"{path} was written by rescore (scored on {rows[0]['scored_on']}); pass the sweep's "
                         f"{RESULTS}")
    scored_on = f"{data}:{split}"
    out = Path(out) if out else path.with_name(f"results_{Path(str(data).rstrip('/')).stem}_{split}.csv")
    finished = [r for r in rows if r["status"] == "finished"]
    datasets: dict = {}
    for row in tqdm(finished, desc=f"scoring on {Path(str(data)).name}:{split}", unit="run", disable=not progress):
        run_dir = path.parent / row["run_dir"]
        config = runs.read_config(run_dir).replace(data=str(data), progress=False)
        key = (config.task, repr(sorted(config.data_options.items())))
        if key not in datasets:
            datasets[key] = engine.load_splits(config, (split,))[split]

        def accuracy(folder: str) -> float:
            correct, total = score_saved(run_dir / folder, datasets[key], batch_size=batch_size)
            return 100.0 * correct / total

        final = accuracy("final")
        if row.get("selected_epoch", "") == "":
            selected = ""  # no epoch met the selection rule: there is no selected model
        elif row["selected_epoch"] == row.get("final_epoch"):
            selected = final  # best/ holds the final epoch's model
        else:
            selected = accuracy("best")
        row.update(own_final_test_acc=row.get("final_test_acc", ""),
                   own_selected_test_acc=row.get("selected_test_acc", ""),
                   final_test_acc=final, selected_test_acc=selected, scored_on=scored_on)
    return write_results(out, rows)
