"""Speed of the feature pipeline: files -> log-mel, and a cached reload.

Writes ``--clips`` synthetic one-second 16-bit PCM WAV files (tones in noise) into a
temporary folder, warms up, then times

- ``compute_many`` on thread pools of 1 and ``--workers`` threads,
- the same chunks on a process pool (the alternative the thread pool was chosen over),
- ``cached_features`` cold (compute + atomic write) and warm (reload),

and prints each time with its ratio to the targets (10,000 clips in 10 s; cached reload
in 1 s; ratios below 1 meet them). Example::

    python benchmarks/bench_features.py --clips 10000 --workers 2
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from str_rnn.features import (FeatureConfig, _chunk_features, _join, cached_features,
                              compute_many)

TARGET_COMPUTE_S = 10.0  # for 10,000 clips; scaled linearly to --clips
TARGET_RELOAD_S = 1.0


def write_clips(folder: Path, n: int, sample_rate: int, seed: int) -> list[Path]:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(sample_rate) / sample_rate
    paths = []
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
        wave = (tone + 0.05 * rng.standard_normal(sample_rate)).astype(np.float32)
        path = folder / f"clip_{i:05d}.wav"
        sf.write(path, wave, sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn):
    """``(result, wall seconds, CPU seconds)``: on a shared machine the CPU time shows
    the work done, the wall time what other jobs left of the cores."""
    start, cpu = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - start, cpu_seconds() - cpu


def process_pool(paths, config, workers, chunk_size=200):
    chunks = [list(enumerate(paths))[i:i + chunk_size] for i in range(0, len(paths), chunk_size)]
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_chunk_features, chunks, [config] * len(chunks),
                                [False] * len(chunks)))
    return _join(results, config.n_features)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=10000, help="number of one-second clips")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads (and processes) of the parallel runs")
    parser.add_argument("--sample-rate", type=int, default=16000,
                        help="rate the clips are written at (8000 also times resampling)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the best counts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic clips")
    args = parser.parse_args(argv)

    config = FeatureConfig()
    target = TARGET_COMPUTE_S * args.clips / 10000
    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp:
        tmp = Path(tmp)
        (tmp / "wav").mkdir()
        (paths, t_write, _) = timed(lambda: write_clips(tmp / "wav", args.clips,
                                                     args.sample_rate, args.seed))
        print(f"wrote {len(paths)} clips at {args.sample_rate} Hz in {t_write:.1f} s; "
              f"cores: {os.cpu_count()}")
        compute_many(paths[:400], config, workers=args.workers, progress=False)  # warm-up

        def best(fn):
            runs = [timed(fn) for _ in range(args.repeats)]
            return min(runs, key=lambda run: run[1])

        rows = []
        for workers in sorted({1, args.workers}):
            out, t, cpu = best(lambda: compute_many(paths, config, workers=workers,
                                                    progress=False))
            rows.append((f"compute, {workers} thread(s)", t, cpu, target))
        ref = out
        if args.workers > 1:
            out, t, cpu = best(lambda: process_pool(paths, config, args.workers))
            assert np.array_equal(out.data, ref.data)
            rows.append((f"compute, {args.workers} processes", t, cpu, target))
        cache = tmp / "cache"
        _, t, cpu = timed(lambda: cached_features(paths, config, dataset="bench", split="all",
                                                  cache_dir=cache, progress=False,
                                                  workers=args.workers))
        rows.append(("cached, first run (compute + write)", t, cpu, target))
        out, t, cpu = best(lambda: cached_features(paths, config, dataset="bench",
                                                   split="all", cache_dir=cache,
                                                   progress=False))
        assert np.array_equal(out.data, ref.data)
        rows.append(("cached, reload", t, cpu, TARGET_RELOAD_S))
        size = sum(p.stat().st_size for p in cache.glob("*.npz")) / 2**20

    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(above the core count, other jobs took part of the cores)")
    print(f"{'step':38s} {'wall s':>7s} {'cpu s':>7s} {'target':>7s} {'ratio':>6s} {'clips/s':>8s}")
    for name, t, cpu, tgt in rows:
        print(f"{name:38s} {t:7.2f} {cpu:7.2f} {tgt:7.2f} {t / tgt:6.2f} {args.clips / t:8.0f}")
    print(f"features: {ref.data.shape} float32 ({len(ref.offsets) - 1} clips); "
          f"cache bundle {size:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
