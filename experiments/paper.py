"""Reproduce the STR paper's Table 3 (FastGRNN, learned rank vs fixed rank) on real data.

    python experiments/paper.py har2 --data data/uci_har --workers 4
    python experiments/paper.py kws12 --data data/speech_commands_v0.01 --workers 4
    python experiments/paper.py kws12 --jobs jobs.sh       # one shell line per run, for a cluster
    python experiments/paper.py har2 --set epochs=2         # a smoke test of the whole pipeline

Runs the sweep ``experiments/paper/{kws12,har2}.json`` (3 seeds x (STR at the paper's λ,
fixed rank at the table's ranks, full rank); 300 epochs each), then prints a table and
writes the plots beside ``results.csv``. Rerunning skips finished runs and resumes
interrupted ones. With ``--jobs``, nothing is trained: run the lines anywhere, then
``python experiments/paper.py NAME --collect`` gathers and plots the results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from str_rnn.plots import plot_results, results_table
from str_rnn.sweep import collect, load_sweep, run_sweep, write_jobs

CONFIGS = Path(__file__).resolve().parent / "paper"


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(f.stem for f in CONFIGS.glob("*.json")), help="which table half")
    p.add_argument("--data", help="dataset folder (default: the config's data/...)")
    p.add_argument("--set", dest="settings", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                   help="override a config field on every run (repeatable; VALUE parsed as JSON)")
    p.add_argument("--out", help="sweep folder (default: the config's runs/paper_NAME)")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: 1)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch threads per run")
    p.add_argument("--jobs", metavar="FILE", help="write one shell command per run to FILE instead of running")
    p.add_argument("--collect", action="store_true", help="only gather results.csv and plot (after --jobs)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    config = CONFIGS / f"{args.name}.json"
    overrides = dict(args.settings)
    if args.data:
        overrides["data"] = args.data
    try:
        if args.jobs:
            print(write_jobs(config, args.jobs, out=args.out, overrides=overrides))
            return 0
        if args.collect:
            results = collect(args.out or load_sweep(config, overrides=overrides).out)
        else:
            results = run_sweep(config, workers=args.workers, threads_per_worker=args.threads_per_worker,
                                out=args.out, overrides=overrides, progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"paper.py: error: {e}", file=sys.stderr)
        return 2
    print(results_table(results))
    print(f"results: {results}")
    try:
        paths = plot_results(results)
    except ValueError as e:  # nothing finished yet
        print(f"paper.py: no plot: {e}", file=sys.stderr)
        return 1
    print(paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
