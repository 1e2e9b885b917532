"""Run-directory I/O: what a training run leaves on disk, and the checks that guard it.

A run directory holds::

    config.json      the resolved TrainConfig (nested form)
    metrics.jsonl    one JSON object per finished epoch
    checkpoint.pt    everything needed to continue after the last finished epoch
    best/ final/     models (str_rnn.save: model.pt + meta.json); best/ = the selected one
    compact/         the compacted final model
    result.json      one flat row, written last: its presence marks a finished run

Every file is written atomically (temp file + ``os.replace``), so a killed run leaves the
previous version of each file intact.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import RESUMABLE_CHANGES, TrainConfig
from .serialize import atomic_write_bytes, atomic_write_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


def default_run_dir(config: TrainConfig, root="runs") -> Path:
    """``runs/{task}-{cell}-{mode}-s{seed}-{YYYYmmdd-HHMMSS}`` (a numeric suffix if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{config.task}-{config.cell}-{config.mode}-s{config.seed}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def check_new_run_dir(run_dir) -> None:
    """Raise ``ValueError`` if ``run_dir`` exists and is not empty (a fresh run never overwrites)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"run directory {run_dir} already exists and is not empty; "
                         f"continue it with --resume {run_dir} or choose another --out")


def read_config(run_dir) -> TrainConfig:
    """The configuration saved in ``run_dir``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory (no ``config.json``).
        ValueError: ``config.json`` is unreadable.
    """
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {CONFIG} not found")
    return TrainConfig.from_json(path)


def is_finished(run_dir) -> bool:
    return (Path(run_dir) / RESULT).is_file()


def check_resumable(run_dir, config: TrainConfig | None = None) -> TrainConfig:
    """Check that ``run_dir`` can be continued with ``config``; return the config to use.

    ``config=None`` continues with the saved configuration. Otherwise only the fields in
    :data:`str_rnn.config.RESUMABLE_CHANGES` (progress, threads, device, ...) may differ
    from the saved one; the saved values of all others are kept. A run killed before its
    first checkpoint has nothing to continue from: resuming it starts it from scratch.

    Raises:
        FileNotFoundError: not a run directory.
        ValueError: the run is finished, or ``config`` differs in a field that changes the
            numbers (the message names the fields).
    """
    run_dir = Path(run_dir)
    saved = read_config(run_dir)
    if is_finished(run_dir):
        raise ValueError(f"run {run_dir} is finished ({RESULT} exists); nothing to resume")
    if config is None:
        return saved
    new, old = config.resolved().flat(), saved.flat()
    diff = [k for k in old if new[k] != old[k] and k not in RESUMABLE_CHANGES]
    if diff:
        shown = ", ".join(f"{k}={new[k]!r} (run has {old[k]!r})" for k in diff)
        raise ValueError(f"cannot resume {run_dir} with a different configuration: {shown}")
    return saved.replace(**{k: new[k] for k in RESUMABLE_CHANGES})


def write_config(run_dir, config: TrainConfig) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, config.to_dict())


def save_checkpoint(run_dir, state: dict) -> None:
    atomic_write_bytes(Path(run_dir) / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(run_dir, map_location="cpu") -> dict:
    """Load ``checkpoint.pt`` with ``weights_only=True`` (tensors and plain containers only)."""
    return torch.load(Path(run_dir) / CHECKPOINT, map_location=map_location, weights_only=True)


def read_metrics(run_dir) -> list[dict]:
    """The epoch rows of ``metrics.jsonl`` (empty if absent)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir, rows: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` with ``rows`` (atomically; one JSON object per line)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(Path(run_dir) / METRICS, lambda f: f.write(text.encode()))


def write_result(run_dir, row: dict) -> None:
    atomic_write_json(Path(run_dir) / RESULT, row)


def read_result(run_dir) -> dict:
    path = Path(run_dir) / RESULT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run in {run_dir} has not finished")
    return json.loads(path.read_text())
