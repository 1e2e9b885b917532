"""Quick learned-rank versus fixed-rank comparison on HAR-2, on the embedded data.

Runs the sweep ``experiments/quick/har2.json`` (FastGRNN, hidden 80, HAPT-built HAR-2
windows, no download; learned-rank runs at three λ, fixed-rank runs at sizes from about
3,700 down to about 570 parameters, the dense baseline; two seeds each), prints a table
of the results, and plots accuracy against size. Rerunning skips finished runs.

    python experiments/quick.py                  # 2 workers x 1 thread
    python experiments/quick.py --workers 4 --out runs/quick_har2

The last line printed is the path of the accuracy-versus-parameters plot.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from str_rnn.datasets.hapt import build_hapt_windows
from str_rnn.plots import plot_results, results_table
from str_rnn.sweep import run_sweep

CONFIG = Path(__file__).resolve().parent / "quick" / "har2.json"


def _cpu_seconds() -> float:
    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: the config's, 2)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch threads per run (default: 1)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/quick_har2)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    start = time.perf_counter()
    # build the HAPT windows once here, not in every worker at the same time
    build_hapt_windows(progress=args.progress)
    results = run_sweep(CONFIG, workers=args.workers, threads_per_worker=args.threads_per_worker, out=args.out,
                        progress=args.progress)
    paths = plot_results(results)
    print(results_table(results))
    print(f"results: {results}")
    print(f"wall time {time.perf_counter() - start:.0f} s, CPU time {_cpu_seconds():.0f} s")
    print(paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
