"""``str-rnn``: the command-line interface (a thin layer over the library).

Subcommands: ``train``, ``eval``, ``summary``, ``compact``, ``sweep``, ``plot``, ``data``.
Bad input (unknown task/cell/mode, a rank larger than its matrix, a config file with an
unknown key or a wrong type, a folder that is not a run directory, ``--resume`` on a
finished or incompatible run) ends with a one-line error on stderr and exit status 2,
before anything is written. A non-finite training step (``--on-nonfinite stop``) exits
with 1; Ctrl-C exits with 130 and says how to resume.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import config as cfg
from . import runs

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input found by the CLI itself (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage of ``train`` is dozens of lines)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="str-rnn", formatter_class=fmt,
        description="Train and inspect recurrent networks whose ranks are learned with Soft Threshold "
                    "Reparameterization (STR).",
        epilog="example:\n  str-rnn train --task har2 --cell fastgrnn --mode str --epochs 60\n"
               "  str-rnn summary runs/har2-fastgrnn-str-s0-20250101-120000\n\n"
               "`str-rnn COMMAND --help` describes each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train", formatter_class=fmt, help="train a model and write a run directory",
        description="Train a sequence classifier and write a run directory (config.json, metrics.jsonl, "
                    "checkpoint.pt, best/, final/, compact/, result.json). Defaults follow the FastGRNN/STR "
                    "papers: hidden 100 (speech) / 80 (HAR), batch 100, Adam lr 1e-2, lr x0.1 after 2/3 "
                    "of the epochs. Precedence: defaults < --config JSON < command-line flags.",
        epilog="examples:\n"
               "  str-rnn train --task har2 --cell fastgrnn --mode str --spectrum-decay 0.3 --epochs 60\n"
               "  str-rnn train --task har2 --mode fixed --rank-w 9 --rank-u 8 --out runs/fixed98\n"
               "  str-rnn train --config exp.json --seed 1\n"
               "  str-rnn train --resume runs/fixed98           # continue a killed run\n"
               "  torchrun --nproc_per_node 2 -m str_rnn.cli train --task har2 --out runs/ddp")
    t.add_argument("--config", metavar="JSON", help="JSON config file (nested as config.json, or flat)")
    t.add_argument("--out", metavar="RUN_DIR",
                   help="run directory to create (default: runs/TASK-CELL-MODE-sSEED-TIMESTAMP)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the killed run in RUN_DIR from its last checkpoint (flags may only change "
                        f"{', '.join(sorted(cfg.RESUMABLE_CHANGES))})")
    cfg.add_config_arguments(t)

    e = sub.add_parser("eval", formatter_class=fmt, help="accuracy of a run's model, or of every run of a sweep",
                       description="Evaluate a run's model (the selected one in best/ by default) on a split "
                                   "of its task. Given a sweep folder (or its results.csv) and --data, score "
                                   "every finished run's final and selected models on that dataset and write "
                                   "a results CSV in the sweep's format (results_DATA_SPLIT.csv beside it), "
                                   "for `str-rnn plot` and tables of another test set.",
                       epilog="examples:\n  str-rnn eval runs/har2-fastgrnn-str-s0-20250101-120000 --split test\n"
                              "  str-rnn eval runs/har2_300ep --data ../shared/data/uci_har_test/uci_har_test_full.npz")
    e.add_argument("run_dir", metavar="RUN_DIR|SWEEP",
                   help="a run directory written by `str-rnn train`, or a sweep folder / results.csv")
    e.add_argument("--data", metavar="DIR", help="dataset folder or file (default: the one the run used)")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default: test)")
    e.add_argument("--model", choices=("best", "final", "compact"), default=None,
                   help="which saved model of a run (default: best, i.e. the selected epoch; a sweep scores "
                        "final and best)")
    e.add_argument("--out", metavar="FILE", help="sweep only: the CSV to write (default: beside results.csv)")
    e.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default: 500)")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    s = sub.add_parser("summary", formatter_class=fmt, help="per-matrix rank table, size and FLOPs of a run",
                       description="Print a run's per-matrix ranks, effective parameters, size and FLOPs, "
                                   "and its accuracies when finished.",
                       epilog="example:\n  str-rnn summary runs/har2-fastgrnn-str-s0-20250101-120000")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `str-rnn train`")
    s.add_argument("--model", choices=("best", "final", "compact"), default="final",
                   help="which saved model (default: final)")

    c = sub.add_parser("compact", formatter_class=fmt, help="compact a run's model to its learned ranks",
                       description="Replace every learned-rank matrix of a run's model by its compacted form "
                                   "(fixed rank r, or dense when smaller) and save it; outputs are unchanged.",
                       epilog="example:\n  str-rnn compact runs/har2-fastgrnn-str-s0-20250101-120000 "
                              "--out small_model")
    c.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `str-rnn train`")
    c.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/compact)")
    c.add_argument("--model", choices=("best", "final"), default="final",
                   help="which saved model to compact (default: final)")

    w = sub.add_parser("sweep", formatter_class=fmt, help="run a grid of training runs from a sweep config",
                       description="Run every configuration of a sweep file and collect one row per run "
                                   "into a results CSV.",
                       epilog="example:\n  str-rnn sweep experiments/har2_rank.json --workers 2")
    w.add_argument("config", metavar="CONFIG", help="sweep configuration file")
    w.add_argument("--workers", type=int, default=None,
                   help="runs in parallel (default: chosen by the sweep from the CPU count)")
    w.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads in each worker (default: the sweep file's, else 1)")
    w.add_argument("--out", metavar="DIR", default=None, help="sweep folder (default: the sweep file's `out`)")
    w.add_argument("--jobs", metavar="FILE", default=None,
                   help="do not run: write one shell command per unfinished run to FILE, for any scheduler "
                        "or several machines (collect afterwards with `str-rnn sweep CONFIG --collect`)")
    w.add_argument("--collect", action="store_true",
                   help="do not run: gather the runs' result files into results.csv")
    w.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    pl = sub.add_parser("plot", formatter_class=fmt, help="plot rank/params/FLOPs against accuracy",
                        description="Plot a sweep's results CSV (rank, parameters, FLOPs versus accuracy) "
                                    "to PNG and PDF.",
                        epilog="example:\n  str-rnn plot runs/sweep/results.csv --out figures")
    pl.add_argument("results", metavar="RESULTS", help="results CSV written by `str-rnn sweep`")
    pl.add_argument("--out", metavar="DIR", help="output folder (default: beside RESULTS, in plots/)")

    d = sub.add_parser("data", formatter_class=fmt, help="list, build, generate or download datasets",
                       description="list: which datasets are present under the data home ($STR_RNN_DATA or "
                                   "./data). hapt: build HAR windows from the UCI HAPT recordings. synth-kws: "
                                   "synthesise a Speech-Commands-layout keyword corpus offline. download NAME: fetch and "
                                   "unpack a public archive (progress bar, SHA-256 recorded and checked).",
                       epilog="examples:\n  str-rnn data list\n  str-rnn data hapt\n"
                              "  str-rnn data synth-kws --out data/synth_kws --speakers 300 --seed 0\n"
                              "  str-rnn data download speech_commands_v0.01")
    d.add_argument("action", choices=("list", "hapt", "synth-kws", "download"), help="what to do")
    d.add_argument("name", nargs="?", default=None,
                   help="download: speech_commands_v0.01 | speech_commands_v0.02 | uci_har | fsdd")
    d.add_argument("--url", default=None, help="download: another address of the archive (mirror, file://)")
    d.add_argument("--sha256", default=None, help="download: expected SHA-256 of the archive")
    d.add_argument("--out", metavar="DIR", help="output folder (default: the loader's default under the data home)")
    d.add_argument("--speakers", type=int, default=None, help="synth-kws: number of synthetic speakers")
    d.add_argument("--seed", type=int, default=0, help="synth-kws: random seed (default: 0)")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


# -- train ---------------------------------------------------------------------------------

def _cmd_train(args) -> int:
    from .train import NonFiniteError, train

    overrides = cfg.overrides_from_args(args)
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise UsageError("--out and --resume name different run directories; give only --resume")
        run_dir = Path(args.resume)
        saved = runs.read_config(run_dir)
        config = saved
        if args.config:
            config = config.replace(**cfg.TrainConfig.from_json(args.config).flat())
        config = config.replace(**overrides)  # train() checks the changes are allowed
    else:
        config = cfg.TrainConfig.from_json(args.config) if args.config else cfg.TrainConfig()
        config = config.replace(**overrides).resolved()
        if not args.out and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("distributed training needs --out (every process must name the same run directory)")
        run_dir = Path(args.out) if args.out else runs.default_run_dir(config)
    try:
        row = train(config, run_dir, resume=bool(args.resume))
    except NonFiniteError as e:
        print(f"str-rnn train: {e}", file=sys.stderr)
        return EXIT_FAILED
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under torchrun
        print(_result_text(row))
    return 0


def _result_text(row: dict) -> str:
    lines = [f"run: {row['run_dir']}",
             f"final epoch {row['final_epoch']}: val {row['final_val_acc']:.2f}%  test {row['final_test_acc']:.2f}%  "
             f"ranks W {row['final_rank_w_total']} U {row['final_rank_u_total']}  params {row['final_params']:,}  "
             f"{row['final_bytes'] / 1024:.2f} KB"]
    if row["selected_epoch"] is None:
        lines.append(f"selected ({row['select']}): no epoch met the budget")
    else:
        lines.append(f"selected ({row['select']}) epoch {row['selected_epoch']}: val {row['selected_val_acc']:.2f}%  "
                     f"test {row['selected_test_acc']:.2f}%  params {row['selected_params']:,}")
    if row.get("skipped_steps"):
        lines.append(f"skipped non-finite steps: {row['skipped_steps']}")
    return "\n".join(lines)


# -- eval / summary / compact ------------------------------------------------------------------

def _saved_model(run_dir: Path, which: str):
    """``(model, meta)`` of the saved model folder ``which`` (best, final, compact) of a run."""
    from .serialize import load

    runs.read_config(run_dir)  # a clear error when this is not a run directory
    folder = run_dir / which
    if not (folder / "meta.json").is_file():
        if not runs.is_finished(run_dir):
            hint = " (the run has not finished; resume it first)"
        else:
            hint = " (no epoch met the selection budget; use --model final)" if which == "best" else ""
        raise FileNotFoundError(f"{folder} not found{hint}")
    meta = json.loads((folder / "meta.json").read_text())
    return load(folder), meta


def _is_sweep(path: Path) -> bool:
    return path.suffix == ".csv" or (path / "results.csv").is_file() or (path / "sweep.json").is_file()


def _cmd_eval(args) -> int:
    from .rescore import check_classes
    from .train import count_correct, load_splits

    run_dir = Path(args.run_dir)
    if _is_sweep(run_dir):
        return _eval_sweep(args)
    if args.out:
        raise UsageError("--out is for a sweep; a run's accuracy is printed")
    which = args.model or "best"
    config = runs.read_config(run_dir).replace(progress=args.progress)
    if args.data:
        config = config.replace(data=args.data)
    model, meta = _saved_model(run_dir, which)
    dataset = load_splits(config, (args.split,))[args.split]
    check_classes(dataset, meta, f"{args.split} split of {config.data.data or config.task}")
    correct, total = count_correct(model, dataset, batch_size=args.batch_size)
    print(f"{args.split} accuracy of {run_dir / which} (epoch {meta.get('epoch')}): "
          f"{100.0 * correct / total:.2f}% ({correct}/{total})")
    return 0


def _eval_sweep(args) -> int:
    from .rescore import rescore

    if not args.data:
        raise UsageError("scoring a sweep needs --data: the dataset to score its runs on")
    if args.model:
        raise UsageError("--model is for one run; a sweep scores every run's final and selected models")
    out = rescore(args.run_dir, args.data, split=args.split, out=args.out, batch_size=args.batch_size,
                  progress=args.progress)
    table = _optional_import("plots", "results_table", "eval")
    print(table(out, per_seed=True))
    print(f"results: {out}")
    return 0


def _cmd_summary(args) -> int:
    from .accounting import summary

    run_dir = Path(args.run_dir)
    config = runs.read_config(run_dir)
    model, meta = _saved_model(run_dir, args.model)
    print(f"run: {run_dir}  task {config.task}  cell {config.cell}  mode {config.mode}  seed {config.seed}  "
          f"model {args.model} (epoch {meta.get('epoch')})")
    print(summary(model, meta.get("seq_len")))
    if runs.is_finished(run_dir):
        print(_result_text(runs.read_result(run_dir)))
    return 0


def _cmd_compact(args) -> int:
    import torch

    from .accounting import count_params, model_size_bytes
    from .convert import compact
    from .serialize import save

    run_dir = Path(args.run_dir)
    model, meta = _saved_model(run_dir, args.model)
    small = compact(model)
    x = torch.randn(4, meta.get("seq_len") or 16, model.rnn.input_size)
    with torch.no_grad():
        diff = float((small(x) - model(x)).abs().max())
    out = Path(args.out) if args.out else run_dir / "compact"
    save(small, out, {**{k: v for k, v in meta.items() if k not in ("spec", "spec_version")}, "compacted": True,
                      "params": count_params(small), "bytes": model_size_bytes(small),
                      "normalisation": {"mean": small.mean.tolist(), "std": small.std.tolist()}})
    print(f"compacted {run_dir / args.model} -> {out}: {count_params(small):,} parameters, "
          f"{model_size_bytes(small) / 1024:.2f} KB; largest output change on random input {diff:.2e}")
    return 0


# -- sweep / plot / data ---------------------------------------------------------------------

def _optional_import(module: str, name: str, command: str):
    import importlib

    try:
        return getattr(importlib.import_module(f"str_rnn.{module}"), name)
    except (ImportError, AttributeError):
        raise UsageError(f"`str-rnn {command}` needs str_rnn.{module}.{name}, which this installation "
                         "does not have") from None


def _cmd_sweep(args) -> int:
    run_sweep = _optional_import("sweep", "run_sweep", "sweep")
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"sweep config {args.config} not found")
    if args.jobs:
        from .sweep import write_jobs

        print(f"jobs: {write_jobs(args.config, args.jobs, out=args.out)}")
        return 0
    if args.collect:
        from .sweep import collect, load_sweep

        print(f"results: {collect(args.out or load_sweep(args.config).out)}")
        return 0
    results = run_sweep(args.config, workers=args.workers, threads_per_worker=args.threads_per_worker,
                        out=args.out, progress=args.progress)
    print(f"results: {results}")
    return 0


def _cmd_plot(args) -> int:
    plot_results = _optional_import("plots", "plot_results", "plot")
    results = Path(args.results)
    if not results.is_file():
        raise FileNotFoundError(f"results file {results} not found")
    out = Path(args.out) if args.out else results.parent / "plots"
    for path in plot_results(results, out):
        print(path)
    return 0


# (tasks, folder under the data home, what the loaders read there, how to get it)
DEFAULT_DATA = (
    ("har2 har6", "hapt", "UCI-HAR windows built from the HAPT recordings", "str-rnn data hapt"),
    ("kws12 kws35", "synth_kws", "synthetic Speech-Commands-layout corpus", "str-rnn data synth-kws"),
    ("fsdd", "fsdd", "Free Spoken Digit Dataset recordings",
     "git clone https://github.com/Jakobovski/free-spoken-digit-dataset {folder}"),
)


def _file_count(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def _list_data(home: Path) -> None:
    print(f"data home: {home.resolve()}  (set $STR_RNN_DATA to move it; --data DIR reads any other folder)")
    for tasks, name, what, how in DEFAULT_DATA:
        folder = home / name
        if folder.is_dir():
            state = f"present, {_file_count(folder):,} files"
        else:
            state = f"absent; get it with: {how.format(folder=folder)}"
        print(f"  {tasks:<12} {folder}  {what} ({state})")
    known = {name for _, name, _, _ in DEFAULT_DATA}
    others = sorted(p for p in home.iterdir() if p.name not in known and not p.name.startswith(".")) \
        if home.is_dir() else []
    for p in others:
        print(f"  {'':<12} {p}  ({_file_count(p):,} files)" if p.is_dir() else f"  {'':<12} {p}")


def _cmd_data(args) -> int:
    from .datasets import data_home

    home = data_home()
    if args.action == "list":
        _list_data(home)
        return 0
    if args.action == "download":
        from .datasets.download import ARCHIVES, download

        if args.name not in ARCHIVES:
            raise UsageError(f"data download: name {args.name!r} is not one of {', '.join(ARCHIVES)}")
        print(download(args.name, args.out, url=args.url, sha256=args.sha256, progress=args.progress))
        return 0
    if args.name is not None:
        raise UsageError(f"data {args.action}: unexpected argument {args.name!r}")
    if args.action == "hapt":
        if args.speakers is not None:
            raise UsageError("--speakers applies to synth-kws only")
        build = _optional_import("datasets.hapt", "build_hapt_windows", "data hapt")
        print(build(args.out, progress=args.progress))
        return 0
    generate = _optional_import("datasets.synth_kws", "generate", "data synth-kws")
    out = Path(args.out) if args.out else home / "synth_kws"
    kwargs = {} if args.speakers is None else {"speakers": args.speakers}
    print(generate(out, seed=args.seed, progress=args.progress, **kwargs))
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "summary": _cmd_summary, "compact": _cmd_compact,
            "sweep": _cmd_sweep, "plot": _cmd_plot, "data": _cmd_data}


def main(argv=None) -> int:
    """Entry point of ``str-rnn``; returns the exit status (0 ok, 1 failed, 2 bad input, 130 Ctrl-C)."""
    from .train import TrainingInterrupted

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return e.code
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as e:
        print(f"str-rnn {args.command}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"str-rnn {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"str-rnn {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
