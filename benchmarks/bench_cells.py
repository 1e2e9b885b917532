"""Speed and memory of the str_rnn recurrent layers against torch's own modules.

Every figure is a ratio against ``torch.nn.GRU`` / ``torch.nn.LSTM`` run in the same
process, interleaved round by round (each round times every model once, in a shuffled
order), so that load from other jobs on a shared machine hits both sides of a ratio
alike; a ratio is the median over rounds of the per-round ratio. Shape of the STR paper's
Google-12 model by default: batch 100, 99 steps, 32 inputs, 100 hidden units.

Targets (the issue):

1. STR FastGRNN at full rank, training step (forward + backward, loss on the last state):
   at least 3x faster than ``torch.nn.GRU``.
2. STR FastGRNN with active ranks (r_W, r_U) = (12, 40): faster than at full rank.
3. STR LSTM and STR GRU at full rank: no slower than ``torch.nn.LSTM`` / ``torch.nn.GRU``.
4. Peak memory of a training step: STR FastGRNN no more than ``torch.nn.GRU``.
5. A compacted FastGRNN (:func:`str_rnn.compact`), batch 1: one 99-step sequence, and
   streaming one step at a time (:meth:`str_rnn.RNN.step`), at least 2x faster than
   ``torch.nn.GRU`` doing the same (the whole sequence; one call per step).

Peak memory (CPU) is read from the profiler's allocator events: every allocation and
free of torch's CPU allocator during one training step, in time order; the peak of the
running sum is the most memory the step held at once beyond what existed before it
(parameters and input excluded, gradients included). On CUDA it is
``torch.cuda.max_memory_allocated`` above the step's start. The bytes saved for backward
(``saved_tensors_hooks``, each storage once) are shown alongside.

Example::

    python benchmarks/bench_cells.py --threads 2 --repeats 21
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from str_rnn import RNN, compact
from str_rnn.lowrank import LowRankSTR


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
def prune_to_rank(m: LowRankSTR, rank: int) -> None:
    """Set the threshold midway between the ``rank``-th and next largest ``|σ|``, so that
    exactly ``rank`` directions stay active."""
    with torch.no_grad():
        mags = m.sigma.abs().sort(descending=True).values.double()
        cut = float((mags[rank - 1] + mags[rank]) / 2) if rank < len(mags) else float(mags[-1] / 2)
        m.threshold.s.fill_(math.log(cut) if m.threshold.g == "exp" else math.log(cut / (1 - cut)))
    if m.rank != rank:
        raise RuntimeError(f"pruning to rank {rank} left rank {m.rank}")


def training_models(args) -> dict[str, nn.Module]:
    """The models timed in a training step, by display name."""
    i, h = args.input, args.hidden

    def pruned(rank_w, rank_u):
        rnn = RNN("fastgrnn", i, h)
        prune_to_rank(rnn.layers[0].W, min(rank_w, rnn.layers[0].W.max_rank))
        prune_to_rank(rnn.layers[0].U, min(rank_u, rnn.layers[0].U.max_rank))
        return rnn

    models = {
        "torch.nn.GRU": nn.GRU(i, h, batch_first=True),
        "torch.nn.LSTM": nn.LSTM(i, h, batch_first=True),
        "STR FastGRNN full rank": RNN("fastgrnn", i, h),
        f"STR FastGRNN ranks ({args.rank_w}, {args.rank_u})": pruned(args.rank_w, args.rank_u),
    }
    for rw, ru in args.extra_ranks:
        models[f"STR FastGRNN ranks ({rw}, {ru})"] = pruned(rw, ru)
    models.update({
        "STR GRU full rank": RNN("gru", i, h),
        "STR LSTM full rank": RNN("lstm", i, h),
        "FastGRNN reference loop": RNN("fastgrnn", i, h, fused=False),
    })
    return models


def last_state(h_n) -> torch.Tensor:
    return (h_n[0] if isinstance(h_n, tuple) else h_n)[-1]


def make_step(model: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """One training step: forward, a loss on the last layer's final state, backward."""
    def step():
        _, h_n = model(x)
        (last_state(h_n) * weight).sum().backward()
    return step


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(fns: dict, rounds: int, sync, before=None, progress: bool = True, desc: str = "",
                clock: str = "wall") -> dict:
    """Seconds of every function in every round on ``clock``; each round runs all of them
    once, in an order shuffled per round (seeded), after ``before(name)`` (untimed)."""
    from tqdm import tqdm

    now = CLOCKS[clock]
    times = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in tqdm(range(rounds), desc=desc, disable=not progress, leave=False):
        rng.shuffle(order)
        for name in order:
            if before is not None:
                before(name)
            sync()
            start = now()
            fns[name]()
            sync()
            times[name].append(now() - start)
    return times


def median_ms(ts) -> float:
    return 1e3 * statistics.median(ts)


def ratio(num: list, den: list) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return statistics.median(a / b for a, b in zip(num, den))


# ---------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 to /dev/null: torch's profiler (kineto) logs a line to the process's
    stderr at every start and stop, which would bury the report. Python exceptions still
    propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes_cpu(step) -> int:
    """Peak of the running sum of torch's CPU allocations and frees during ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def peak_bytes_cuda(step, device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages the autograd graph saves for backward."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, h_n = model(x)
    del h_n
    return sum(seen.values())


# ---------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rounds = args.repeats

    # -- training step ------------------------------------------------------------------
    models = {name: m.to(device) for name, m in training_models(args).items()}
    x = torch.randn(args.batch, args.steps, args.input, device=device)
    weight = torch.randn(args.hidden, device=device)
    steps = {name: make_step(m, x, weight) for name, m in models.items()}
    for fn in steps.values():  # warm-up (allocator, thread pools, first-call paths)
        fn()
        fn()

    def zero(name):
        models[name].zero_grad(set_to_none=True)

    train = interleaved(steps, rounds, sync, zero, args.progress, "training steps", args.clock)

    # -- memory -------------------------------------------------------------------------
    memory = {}
    for name, m in models.items():
        zero(name)
        peak = peak_bytes_cuda(steps[name], device) if device.type == "cuda" else peak_bytes_cpu(steps[name])
        zero(name)
        memory[name] = {"peak": peak, "saved": saved_bytes(m, x)}

    # -- inference, batch 1 ---------------------------------------------------------------
    low_name = f"STR FastGRNN ranks ({args.rank_w}, {args.rank_u})"
    small = compact(models[low_name]).to(device)
    gru = models["torch.nn.GRU"]
    x1 = torch.randn(1, args.steps, args.input, device=device)
    xs = list(x1.unbind(1))
    h1 = torch.zeros(1, 1, args.hidden, device=device)

    def seq_ours():
        small(x1)

    def seq_gru():
        gru(x1)

    def stream_ours():
        state = None
        for x_t in xs:
            _, state = small.step(x_t, state)

    def stream_gru():
        h = h1
        for x_t in xs:
            _, h = gru(x_t.unsqueeze(1), h)

    infer_fns = {"sequence: compacted STR FastGRNN": seq_ours, "sequence: torch.nn.GRU": seq_gru,
                 "streaming: compacted STR FastGRNN": stream_ours, "streaming: torch.nn.GRU": stream_gru}
    with torch.no_grad():
        for fn in infer_fns.values():
            fn()
            fn()
        infer = interleaved(infer_fns, rounds * args.infer_factor, sync, None, args.progress, "inference", args.clock)

    # -- targets --------------------------------------------------------------------------
    full = "STR FastGRNN full rank"
    results = [
        ("1", "STR FastGRNN full rank: speed-up over torch.nn.GRU (training step)",
         ratio(train["torch.nn.GRU"], train[full]), ">=", 3.0),
        ("2", f"STR FastGRNN ranks ({args.rank_w}, {args.rank_u}): speed-up over full rank",
         ratio(train[full], train[low_name]), ">", 1.0),
        ("3a", "STR LSTM full rank: time / torch.nn.LSTM", ratio(train["STR LSTM full rank"], train["torch.nn.LSTM"]),
         "<=", 1.0),
        ("3b", "STR GRU full rank: time / torch.nn.GRU", ratio(train["STR GRU full rank"], train["torch.nn.GRU"]),
         "<=", 1.0),
        ("4", "STR FastGRNN full rank: peak memory / torch.nn.GRU",
         memory[full]["peak"] / memory["torch.nn.GRU"]["peak"], "<=", 1.0),
        ("5a", "compacted FastGRNN, batch 1, 99-step sequence: speed-up over torch.nn.GRU",
         ratio(infer["sequence: torch.nn.GRU"], infer["sequence: compacted STR FastGRNN"]), ">=", 2.0),
        ("5b", "compacted FastGRNN, batch 1, streaming step: speed-up over torch.nn.GRU",
         ratio(infer["streaming: torch.nn.GRU"], infer["streaming: compacted STR FastGRNN"]), ">=", 2.0),
    ]
    checks = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<=": lambda v, t: v <= t}
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "no_progress")},
        "machine": machine(),
        "train_ms": {k: median_ms(v) for k, v in train.items()},
        "memory_mib": {k: {kk: vv / 2**20 for kk, vv in v.items()} for k, v in memory.items()},
        "infer_ms": {k: median_ms(v) for k, v in infer.items()},
        "targets": [{"id": i, "what": w, "value": v, "op": op, "target": t, "pass": checks[op](v, t)}
                    for i, w, v, op, t in results],
    }


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "load_1min": load, "python": platform.python_version(),
            "torch": torch.__version__}


def report(res: dict) -> str:
    c, m = res["config"], res["machine"]
    lines = [
        f"str_rnn cells benchmark: batch {c['batch']}, {c['steps']} steps, input {c['input']}, "
        f"hidden {c['hidden']}; {c['threads']} threads on {c['device']}; {c['repeats']} rounds; {c['clock']} clock",
        f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_1min']:.1f} at the start; "
        f"torch {m['torch']}, Python {m['python']}",
        "",
        f"{'training step (forward + backward)':44s} {'median ms':>10s} {'peak MiB':>9s} {'saved MiB':>10s}",
    ]
    for name, ms in res["train_ms"].items():
        mem = res["memory_mib"][name]
        lines.append(f"  {name:42s} {ms:10.2f} {mem['peak']:9.1f} {mem['saved']:10.1f}")
    lines += ["", f"{'inference, batch 1, no_grad':44s} {'median ms':>10s}"]
    for name, ms in res["infer_ms"].items():
        lines.append(f"  {name:42s} {ms:10.3f}")
    lines += ["", f"{'#':3s} {'target':78s} {'value':>7s} {'goal':>7s}  result"]
    for t in res["targets"]:
        lines.append(f"{t['id']:3s} {t['what']:78s} {t['value']:7.2f} {t['op'] + format(t['target'], 'g'):>7s}  "
                     f"{'PASS' if t['pass'] else 'FAIL'}")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    """Atomic write: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rank_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            rw, ru = (int(v) for v in part.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected 'r_W,r_U' (two integers)") from None
        if rw < 1 or ru < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: ranks must be positive")
        pairs.append((rw, ru))
    return pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=21, help="rounds of the training-step timing (each times every model once)")
    p.add_argument("--infer-factor", type=int, default=3, help="inference rounds per training round")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: 3 rounds, 20 steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: CPU time of the process (all threads), robust to other "
                        "jobs on a shared machine but meaningful only with --threads 1 (idle worker threads "
                        "spin) and on the CPU")
    p.add_argument("--batch", type=int, default=100, help="training batch size")
    p.add_argument("--steps", type=int, default=99, help="sequence length")
    p.add_argument("--input", type=int, default=32, help="input features")
    p.add_argument("--hidden", type=int, default=100, help="hidden units")
    p.add_argument("--rank-w", type=int, default=12, help="active rank of W for target 2")
    p.add_argument("--rank-u", type=int, default=40, help="active rank of U for target 2")
    p.add_argument("--extra-ranks", type=_rank_pairs, default="9,24",
                   help="more (r_W, r_U) pairs timed for information, e.g. '9,24;4,10' ('' for none)")
    p.add_argument("--seed", type=int, default=0, help="random seed of weights and inputs")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.progress = not args.no_progress
    if args.quick:
        args.repeats, args.steps, args.infer_factor = 3, 20, 1
    for name in ("repeats", "threads", "batch", "steps", "input", "hidden", "rank_w", "rank_u", "infer_factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.clock == "cpu" and args.device != "cpu":
        p.error(f"--clock=cpu with --device={args.device}: CPU time does not see the device's work")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device={args.device}: CUDA is not available on this machine")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(report(res))
    if args.json is not None:
        write_json(args.json, res)
    return 1 if args.check and not all(t["pass"] for t in res["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
