"""Sweeps: a grid of training runs from one JSON file, run in parallel, one CSV row per run.

A sweep file names base settings (flat :class:`~str_rnn.config.TrainConfig` keys), seeds
and named groups; each group's ``grid`` is expanded as a Cartesian product::

    {
      "description": "learned vs fixed rank on HAR-2",          (optional)
      "out": "runs/har2_rank",                                   run folder, relative to the
                                                                 current directory
      "base": {"task": "har2", "epochs": 60},                   every run
      "seeds": [0, 1, 2],                                        every run once per seed
      "workers": 2, "threads_per_worker": 1,                     (optional) defaults for run_sweep
      "groups": [
        {"name": "str",   "base": {"mode": "str", "spectrum_penalty": "l1"},
                          "grid": {"spectrum_decay": [0.03, 0.1], "s_init": [-10, -8]}},
        {"name": "fixed", "base": {"mode": "fixed"},
                          "grid": {"rank_w,rank_u": [[9, 8], [4, 4]]}},
        {"name": "dense", "base": {"mode": "dense"}}
      ]
    }

A grid key ``"a,b"`` zips several fields: each of its values is a list ``[a, b]``. A group
may also carry its own ``seeds``. Settings apply in the order defaults < sweep ``base`` <
group ``base`` < grid values < seed.

Run directories are ``{out}/{group}/{grid values},seed={seed}``, e.g.
``runs/har2_rank/str/spectrum_decay=0.1,s_init=-10,seed=0``: the grid keys of the group
name the folder (in the order written), so the same file always gives the same folders.
A run whose folder holds ``result.json`` is finished and skipped; one with a checkpoint
is resumed; a folder whose saved ``config.json`` differs from the sweep's (in a field that
changes the numbers) stops the sweep before anything runs.

Each run trains in a worker process (``spawn``; ``torch.set_num_threads(threads_per_worker)``
in each); a run that raises is recorded (``error.txt`` in its folder, ``status=failed`` and
the message in the ``error`` column) and the sweep goes on. ``{out}/results.csv`` has one
row per run of the sweep: ``group, variant, seed, status, error, run_dir`` (relative to
``out``) followed by the run's ``result.json`` row (or its flat config while it is failed
or pending). ``{out}/sweep.json`` records the expanded sweep so that :func:`collect` can
rebuild ``results.csv`` later, for instance after :func:`write_jobs` ran the runs
elsewhere.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import multiprocessing
import os
import re
import shlex
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import runs
from .config import FIELDS, RESUMABLE_CHANGES, TrainConfig, check_value
from .serialize import atomic_write_bytes, atomic_write_json

__all__ = ["Run", "Sweep", "load_sweep", "run_sweep", "write_jobs", "collect", "run_one"]

PLAN = "sweep.json"
RESULTS = "results.csv"
ERROR = "error.txt"
CONFIGS = "configs"  # job config files written by write_jobs
RESERVED = (CONFIGS, "plots")  # folders of a sweep that are not groups (plots: str-rnn plot's default)
PLAN_FORMAT = 1

SWEEP_KEYS = {"description": str, "out": str, "base": dict, "seeds": list, "groups": list,
              "workers": int, "threads_per_worker": int}
GROUP_KEYS = {"description": str, "name": str, "base": dict, "grid": dict, "seeds": list}
LEAD_COLUMNS = ("group", "variant", "seed", "status", "error", "run_dir")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")  # "=" and "," separate the name's parts
_MAX_NAME = 150  # folder names past this get a hash suffix instead (file systems stop at 255)


@dataclass(frozen=True)
class Run:
    """One run of a sweep: where it goes and what it trains.

    Attributes:
        group: the sweep group's name (first folder level).
        variant: the group's grid values, ``"key=value,..."`` (empty without a grid);
            runs that differ only in the seed share it.
        seed: the run's seed.
        config: the resolved configuration.
    """

    group: str
    variant: str
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        """Folder name inside the group: ``"{variant},seed={seed}"``."""
        return _short(f"{self.variant},seed={self.seed}" if self.variant else f"seed={self.seed}")

    @property
    def rel_dir(self) -> Path:
        """Run folder relative to the sweep's ``out``."""
        return Path(self.group) / self.name


@dataclass
class Sweep:
    """An expanded sweep file (see the module docstring).

    Attributes:
        out: the sweep folder.
        runs: every run, in file order (groups, then grid order, then seeds).
        plan: ``{"sweep": the file without "out", "overrides": {...}}``, recorded in
            ``out/sweep.json`` for :func:`collect`.
        workers, threads_per_worker: the file's defaults (``None`` when absent).
    """

    out: Path
    runs: list[Run]
    plan: dict
    workers: int | None = None
    threads_per_worker: int | None = None


# -- reading and expanding a sweep file ----------------------------------------------------

def _check_keys(d, allowed: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    for key, value in d.items():
        if key not in allowed:
            raise ValueError(f"{where}: key {key!r} is unknown; expected one of {', '.join(allowed)}")
        tp = allowed[key]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where}: key {key!r}: expected {_TYPE_WORDS[tp]}, got {value!r}")


_TYPE_WORDS = {str: "a string", dict: "a JSON object", list: "a list", int: "an integer"}


def _check_seeds(seeds, where: str) -> list[int]:
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"{where}: expected a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds repeat in {seeds!r}")
    return list(seeds)


def _check_settings(settings: dict, where: str) -> dict:
    """Type-check flat config keys; ``seed`` belongs in ``seeds``."""
    out = {}
    for key, value in settings.items():
        if key == "seed":
            raise ValueError(f"{where}: key 'seed' is set by the sweep; list seeds in \"seeds\" instead")
        try:
            out[key] = check_value(key, value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return out


def _grid_axes(grid: dict, where: str) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """``[(keys, [values tuple, ...]), ...]`` with every value type-checked."""
    axes, seen = [], set()
    for spec, values in grid.items():
        keys = tuple(k.strip() for k in spec.split(","))
        here = f"{where}.grid[{spec!r}]"
        for k in keys:
            if k == "seed":
                raise ValueError(f"{here}: 'seed' is set by the sweep; list seeds in \"seeds\" instead")
            if k not in FIELDS:
                raise ValueError(f"{here}: config key {k!r} is unknown; expected one of {', '.join(FIELDS)}")
            if k in seen:
                raise ValueError(f"{here}: key {k!r} appears twice in the grid")
            seen.add(k)
        if not isinstance(values, list) or not values:
            raise ValueError(f"{here}: expected a non-empty list of values, got {values!r}")
        rows = []
        for v in values:
            if len(keys) > 1 and (not isinstance(v, list) or len(v) != len(keys)):
                raise ValueError(f"{here}: each value must be a list of {len(keys)} ({', '.join(keys)}), got {v!r}")
            tup = tuple(v) if len(keys) > 1 else (v,)
            try:
                rows.append(tuple(check_value(k, x) for k, x in zip(keys, tup)))
            except ValueError as e:
                raise ValueError(f"{here}: {e}") from None
        axes.append((keys, rows))
    return axes


def _value_text(value) -> str:
    """Folder-name text of a config value: short, one text per value of a field."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (list, dict)):
        value = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return _UNSAFE.sub("_", str(value))


def _short(name: str) -> str:
    if len(name) <= _MAX_NAME:
        return name
    import hashlib

    return f"{name[:_MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _read_sweep_file(config) -> tuple[dict, str]:
    if isinstance(config, dict):
        return config, "sweep config"
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"sweep config {path}: not valid JSON ({e})") from None
    return raw, f"sweep config {path}"


def load_sweep(config, *, out=None, overrides: dict | None = None) -> Sweep:
    """Read, validate and expand a sweep.

    Args:
        config: a sweep file (path) or its content (dict).
        out: sweep folder, replacing the file's ``out`` (required when the file has none).
        overrides: flat config keys applied on top of the sweep's ``base`` (for example
            ``{"data": "/data/speech_commands_v0.01"}``); they win over group settings too.

    Returns:
        the :class:`Sweep`; every run's config has passed :meth:`TrainConfig.from_dict`
        and :meth:`TrainConfig.resolved`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, an unknown key, a wrong type, a config value a run
            rejects, or two runs with the same folder; one line naming the key (and the
            group and run).
    """
    raw, where = _read_sweep_file(config)
    _check_keys(raw, SWEEP_KEYS, where)
    for key in ("groups",):
        if key not in raw:
            raise ValueError(f"{where}: key {key!r} is missing")
    if out is None:
        if "out" not in raw:
            raise ValueError(f"{where}: key 'out' is missing (or pass out=)")
        out = raw["out"]
    base = _check_settings(raw.get("base", {}), f"{where}: base")
    overrides = _check_settings(overrides or {}, "overrides")
    seeds = _check_seeds(raw.get("seeds", [0]), f"{where}: seeds")
    for key in ("workers", "threads_per_worker"):
        if key in raw and raw[key] < 1:
            raise ValueError(f"{where}: key {key!r}: expected a positive integer, got {raw[key]!r}")
    if not raw["groups"]:
        raise ValueError(f"{where}: key 'groups': expected at least one group")
    all_runs, names, dirs = [], set(), {}
    for i, group in enumerate(raw["groups"]):
        here = f"{where}: groups[{i}]"
        _check_keys(group, GROUP_KEYS, here)
        name = group.get("name")
        if name is None:
            raise ValueError(f"{here}: key 'name' is missing")
        if not isinstance(name, str) or not _NAME_OK.match(name) or name in RESERVED:
            raise ValueError(f"{here}: name {name!r} must be a folder name of letters, digits, '_.+-' "
                             f"(and not {' or '.join(RESERVED)})")
        if name in names:
            raise ValueError(f"{here}: group name {name!r} is used twice")
        names.add(name)
        here = f"{where}: group {name!r}"
        group_base = _check_settings(group.get("base", {}), f"{here} base")
        axes = _grid_axes(group.get("grid", {}), here)
        both = set(group_base) & {k for keys, _ in axes for k in keys}
        if both:
            raise ValueError(f"{here}: {', '.join(sorted(both))} set in both the group's base and its grid")
        group_seeds = _check_seeds(group["seeds"], f"{here} seeds") if "seeds" in group else seeds
        for combo in itertools.product(*(rows for _, rows in axes)):
            values = {k: v for (keys, _), row in zip(axes, combo) for k, v in zip(keys, row)}
            variant = ",".join(f"{k}={_value_text(v)}" for k, v in values.items())
            for seed in group_seeds:
                settings = {**base, **group_base, **values, **overrides, "seed": seed}
                try:
                    cfg = TrainConfig.from_dict(settings).resolved()
                except ValueError as e:
                    raise ValueError(f"{here}, run {variant or '(no grid)'} seed {seed}: {e}") from None
                run = Run(name, variant, seed, cfg)
                if run.rel_dir in dirs:
                    raise ValueError(f"{here}: runs {dirs[run.rel_dir]!r} and {variant!r} (seed {seed}) "
                                     f"share the folder {run.rel_dir}; give the grid distinct values")
                dirs[run.rel_dir] = variant
                all_runs.append(run)
    plan = {"sweep": {k: v for k, v in raw.items() if k != "out"}, "overrides": overrides}
    return Sweep(Path(out), all_runs, plan, raw.get("workers"), raw.get("threads_per_worker"))


# -- the state of a run on disk --------------------------------------------------------------

def _differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    old, new = saved.flat(), wanted.flat()
    return [f"{k}={old[k]!r} (sweep has {new[k]!r})" for k in new
            if old.get(k) != new[k] and k not in RESUMABLE_CHANGES]


def check_run_dirs(sweep: Sweep) -> None:
    """Raise ``ValueError`` if a run folder holds a run of a different configuration.

    Only fields that change the numbers count (not ``progress``, ``threads``, ...).
    """
    for run in sweep.runs:
        run_dir = sweep.out / run.rel_dir
        if not (run_dir / runs.CONFIG).is_file():
            continue
        try:
            saved = runs.read_config(run_dir)
        except ValueError as e:
            raise ValueError(f"run folder {run_dir}: {e}") from None
        diff = _differences(saved, run.config)
        if diff:
            raise ValueError(f"run folder {run_dir} holds a run of another configuration "
                             f"({'; '.join(diff)}); remove it or give the sweep another \"out\"")


def _status(run_dir: Path) -> tuple[str, str]:
    """``(status, error)``: finished, failed (with the first line of error.txt) or pending."""
    if runs.is_finished(run_dir):
        return "finished", ""
    error_file = run_dir / ERROR
    if error_file.is_file():
        lines = error_file.read_text().splitlines()
        return "failed", lines[0] if lines else "failed"
    return "pending", ""


def _flat_text(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _row(out: Path, run: Run) -> dict:
    run_dir = out / run.rel_dir
    status, error = _status(run_dir)
    if status == "finished":
        body = runs.read_result(run_dir)
    else:
        body = {k: _flat_text(v) for k, v in run.config.flat().items()}
    lead = {"group": run.group, "variant": run.variant, "seed": run.seed, "status": status, "error": error,
            "run_dir": run.rel_dir.as_posix()}
    return {**lead, **{k: v for k, v in sorted(body.items()) if k not in lead}}


def write_results(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as a CSV (columns: the union, in first-seen order), atomically."""
    columns = list(LEAD_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue().encode()))
    return path


def _write_plan(sweep: Sweep) -> None:
    atomic_write_json(sweep.out / PLAN, {"format": PLAN_FORMAT, **sweep.plan,
                                         "runs": [r.rel_dir.as_posix() for r in sweep.runs]})


def collect(sweep_dir) -> Path:
    """Gather the runs of a sweep folder into ``sweep_dir/results.csv``.

    Reads ``sweep_dir/sweep.json`` (written by :func:`run_sweep` and :func:`write_jobs`)
    for the list of runs, and each run folder for its state: ``result.json`` (finished),
    ``error.txt`` (failed) or neither (pending).

    Returns:
        the path of ``results.csv``.

    Raises:
        FileNotFoundError: ``sweep_dir/sweep.json`` is missing.
        ValueError: it is unreadable.
    """
    sweep_dir = Path(sweep_dir)
    plan_file = sweep_dir / PLAN
    if not plan_file.is_file():
        raise FileNotFoundError(f"{plan_file} not found: {sweep_dir} is not a sweep folder "
                                "(run_sweep and write_jobs write it)")
    try:
        plan = json.loads(plan_file.read_text())
        sweep = load_sweep(plan["sweep"], out=sweep_dir, overrides=plan.get("overrides"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{plan_file}: unreadable sweep record ({e})") from None
    return write_results(sweep_dir / RESULTS, [_row(sweep_dir, r) for r in sweep.runs])


# -- running ------------------------------------------------------------------------------------

_DATA_CACHE: dict = {}  # per process: a worker loads each dataset once for all its runs


def _splits(config: TrainConfig, datasets) -> dict:
    key = (config.task, config.data.data, json.dumps(config.data_options, sort_keys=True))
    if key not in _DATA_CACHE:
        if datasets is not None:
            _DATA_CACHE[key] = datasets(config)
        else:
            from .datasets import load

            options = {"progress": False, **config.data_options}  # bars of parallel workers would collide
            _DATA_CACHE[key] = {s: load(config.task, s, config.data.data, **options)
                                for s in ("train", "val", "test")}
    return _DATA_CACHE[key]


def _clear_unstarted(run_dir: Path) -> None:
    """Remove what a run that never finished an epoch left (no checkpoint), so it can start anew."""
    for name in (runs.CONFIG, runs.METRICS, ERROR):
        (run_dir / name).unlink(missing_ok=True)


def run_one(run_dir, config: TrainConfig, datasets=None) -> tuple[str, str]:
    """Train (or resume) one run, recording a failure instead of raising it.

    A finished run is left alone; a run with a checkpoint is resumed; otherwise the run
    starts afresh (after removing the files of an attempt that never finished an epoch).
    An exception is written to ``run_dir/error.txt`` (first line: ``Type: message``, then
    the traceback); a later success removes that file.

    Args:
        run_dir: the run's folder.
        config: its configuration (``progress`` is turned off).
        datasets: ``None`` (load the config's task), or a function ``config -> {"train",
            "val", "test"}`` of torch Datasets; under workers it must be picklable (a
            module-level function).

    Returns:
        ``(status, error)``: ``("finished", "")`` or ``("failed", first line)``.
    """
    from .train import train

    run_dir = Path(run_dir)
    if runs.is_finished(run_dir):
        return "finished", ""
    try:
        resume = (run_dir / runs.CHECKPOINT).is_file()
        if not resume:
            _clear_unstarted(run_dir)
        train(config.replace(progress=False), run_dir, resume=resume, datasets=_splits(config, datasets))
    except Exception as e:  # a run's failure must not end the sweep; Ctrl-C still does
        message = f"{type(e).__name__}: {e}".splitlines()[0]
        text = message + "\n\n" + traceback.format_exc()
        atomic_write_bytes(run_dir / ERROR, lambda f: f.write(text.encode()))
        return "failed", message
    (run_dir / ERROR).unlink(missing_ok=True)
    return "finished", ""


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_sweep(config_path, *, workers: int | None = None, threads_per_worker: int | None = None,
              progress: bool = True, out=None, overrides: dict | None = None, datasets=None) -> Path:
    """Run every run of a sweep file that has not finished, then write ``results.csv``.

    Everything is validated first (the file, every run's config, the configs saved in
    existing run folders); nothing runs if any check fails. Runs then go to ``workers``
    spawned processes (each with ``torch.set_num_threads(threads_per_worker)``); with
    ``workers=1`` they run one after another in this process. A failing run is recorded
    and the others go on.

    Args:
        config_path: the sweep file (or its content as a dict).
        workers: parallel processes (default: the file's ``workers``, else 1).
        threads_per_worker: torch threads in each (default: the file's value, else the
            available CPUs divided by the workers).
        progress: a progress bar over the runs and one line per finished run.
        out: sweep folder, replacing the file's ``out``.
        overrides: flat config keys set on every run (see :func:`load_sweep`).
        datasets: a picklable function ``config -> {"train", "val", "test"}`` replacing
            the task's loader (for tests and custom data).

    Returns:
        the path of ``{out}/results.csv``.

    Raises:
        FileNotFoundError, ValueError: a bad sweep file or run folder (see
            :func:`load_sweep`, :func:`check_run_dirs`).
        KeyboardInterrupt: Ctrl-C (``results.csv`` is written first; run the same
            command again to continue).
    """
    sweep = load_sweep(config_path, out=out, overrides=overrides)
    workers = workers if workers is not None else (sweep.workers or 1)
    if workers < 1:
        raise ValueError(f"workers={workers!r}: expected a positive integer")
    threads = threads_per_worker or sweep.threads_per_worker or max(1, _cpus() // workers)
    check_run_dirs(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    _write_plan(sweep)
    todo = [r for r in sweep.runs if not runs.is_finished(sweep.out / r.rel_dir)]
    from tqdm.auto import tqdm

    done = len(sweep.runs) - len(todo)
    bar = tqdm(total=len(todo), desc=f"sweep {sweep.out.name}", unit="run", disable=not progress,
               file=sys.stderr)
    if done and progress:
        bar.write(f"{done} of {len(sweep.runs)} runs finished earlier: skipped")
    failed = 0

    def report(run: Run, status: str, error: str) -> None:
        nonlocal failed
        failed += status == "failed"
        bar.update(1)
        bar.set_postfix(failed=failed)
        if progress:
            bar.write(f"{status}: {run.rel_dir.as_posix()}" + (f" ({error})" if error else _brief(sweep.out, run)))

    try:
        if workers == 1 or len(todo) <= 1:
            _run_here(sweep, todo, threads, datasets, report)
        else:
            _run_pool(sweep, todo, workers, threads, datasets, report)
    finally:
        bar.close()
        _DATA_CACHE.clear()
        results = collect(sweep.out)  # also on Ctrl-C: what finished is kept
    return results


def _brief(out: Path, run: Run) -> str:
    try:
        r = runs.read_result(out / run.rel_dir)
        return (f"  test {r['final_test_acc']:.2f}%  ranks W {r['final_rank_w_total']} U {r['final_rank_u_total']}  "
                f"params {r['final_params']:,}")
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return ""


def _run_here(sweep: Sweep, todo: list[Run], threads: int, datasets, report) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for run in todo:
            report(run, *run_one(sweep.out / run.rel_dir, run.config, datasets))
    finally:
        torch.set_num_threads(before)


def _run_pool(sweep: Sweep, todo: list[Run], workers: int, threads: int, datasets, report) -> None:
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), initializer=_init_worker, initargs=(threads,),
                               mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(run_one, sweep.out / r.rel_dir, r.config, datasets): r for r in todo}
        for future in as_completed(futures):
            run = futures[future]
            try:
                status, error = future.result()
            except BrokenProcessPool as e:  # a worker died (killed, out of memory): record it
                status, error = "failed", f"worker process died: {e}"
                text = error + "\n"
                atomic_write_bytes(sweep.out / run.rel_dir / ERROR, lambda f: f.write(text.encode()))
            report(run, status, error)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


# -- jobs for other schedulers --------------------------------------------------------------------

def write_jobs(config_path, out_file, *, out=None, overrides: dict | None = None, command: str = "str-rnn") -> Path:
    """Write one shell command per unfinished run, for any scheduler on any machines.

    Each run's configuration goes to ``{out}/configs/{group}/{name}.json``; its line skips a
    finished run, resumes one with a checkpoint and starts the others::

        if [ -f RUN/result.json ]; then :; elif [ -f RUN/checkpoint.pt ]; then
          str-rnn train --resume RUN --no-progress; else
          str-rnn train --config CONFIG --out RUN --no-progress; fi

    Paths are as the sweep names them (relative paths: run the lines from the current
    directory). Afterwards :func:`collect` (``{out}`` as the folder) builds
    ``results.csv``. Runs already finished get no line.

    Args:
        config_path: the sweep file.
        out_file: the file to write (one line per run; ``bash out_file`` runs them in turn,
            ``parallel < out_file`` or a job array in parallel).
        out, overrides: as for :func:`run_sweep`.
        command: how to call the CLI (e.g. ``"python -m str_rnn.cli"``).

    Returns:
        ``out_file``.
    """
    sweep = load_sweep(config_path, out=out, overrides=overrides)
    check_run_dirs(sweep)
    _write_plan(sweep)
    lines = []
    for run in sweep.runs:
        run_dir = sweep.out / run.rel_dir
        if runs.is_finished(run_dir):
            continue
        cfg_file = sweep.out / CONFIGS / run.group / f"{run.name}.json"
        atomic_write_json(cfg_file, run.config.to_dict())
        r, c = shlex.quote(str(run_dir)), shlex.quote(str(cfg_file))
        lines.append(f"if [ -f {r}/{runs.RESULT} ]; then :; elif [ -f {r}/{runs.CHECKPOINT} ]; then "
                     f"{command} train --resume {r} --no-progress; else "
                     f"{command} train --config {c} --out {r} --no-progress; fi")
    text = "".join(line + "\n" for line in lines)
    out_file = Path(out_file)
    atomic_write_bytes(out_file, lambda f: f.write(text.encode()))
    return out_file
