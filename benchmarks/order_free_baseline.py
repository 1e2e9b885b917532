"""Order-free baseline: softmax regression on each clip's log-mel mean and standard deviation.

It tells how much a keyword task needs a sequence model: the features ignore the order of
the frames entirely, so whatever accuracy it reaches, a recurrent model gets for free.
(On FSDD it reaches ~96.7%, as high as the RNNs; on the first 23-voice synthetic corpus
85.9%.) A corpus that separates good sequence models from bad ones should leave this
baseline well below them.

Recipe: per clip ``[mean_t x_t, std_t x_t]`` of the ``T x F`` log-mel frames (2F inputs),
standardised with training statistics; multinomial logistic regression
``p(y | z) = softmax(W z + b)`` fit on train by full-batch L-BFGS (strong Wolfe line
search) on ``mean cross-entropy + l2/2 * ||W||^2`` until the gradient is flat; accuracy
on train, val and test. Deterministic (full batch, zero init).

Examples::

    python benchmarks/order_free_baseline.py                       # kws12, default corpus
    python benchmarks/order_free_baseline.py --task kws35 --root data/synth_kws
    python benchmarks/order_free_baseline.py --task fsdd --root ../shared/data/fsdd

Measured (2 cores):

- default synthetic corpus (``synth_kws`` v1, seed 0), kws12: train 42.85 / val 42.31 /
  test 41.70%; kws35: test 24.81% (for comparison, ``str-rnn train --task kws12 --data
  DIR --cell gru --mode dense --epochs 12 --lr 3e-3``: test 84.13%);
- FSDD, default split (train takes 10-49): val 94.33 / test 94.67%; with
  ``--option val_takes=0`` (train on takes 5-49, as the 96.7% quoted in DESIGN.md): 96.33%.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from str_rnn.datasets import SPLITS, TASKS, load

SPEECH_TASKS = tuple(t for t in TASKS if not t.startswith("har"))


def clip_statistics(ds) -> tuple[np.ndarray, np.ndarray]:
    """``(Z [N, 2F], y [N])``: every item's per-feature mean and standard deviation over time."""
    if hasattr(ds, "offsets") and hasattr(ds, "data"):  # FeatureDataset: frames back to back
        data = ds.data.astype(np.float64)
        starts, lengths = ds.offsets[:-1], np.diff(ds.offsets)
        if (lengths == 0).any():
            raise ValueError("an item has no frames; expected at least one frame per clip")
        mean = np.add.reduceat(data, starts, axis=0) / lengths[:, None]
        sq = np.add.reduceat(data**2, starts, axis=0) / lengths[:, None]
        std = np.sqrt(np.maximum(sq - mean**2, 0.0))
        y = np.asarray(ds.targets)
    else:  # any dataset of (x [T, F], label)
        rows, labels = [], []
        for x, label in ds:
            x = np.asarray(x, dtype=np.float64)
            rows.append(np.concatenate([x.mean(0), x.std(0)]))
            labels.append(int(label))
        stats = np.stack(rows)
        half = stats.shape[1] // 2
        mean, std, y = stats[:, :half], stats[:, half:], np.asarray(labels)
    return np.concatenate([mean, std], axis=1).astype(np.float32), y.astype(np.int64)


def fit_softmax(z: torch.Tensor, y: torch.Tensor, n_classes: int, *, l2: float = 1e-4,
                max_iter: int = 1000) -> tuple[torch.nn.Linear, dict]:
    """Multinomial logistic regression by full-batch L-BFGS.

    Args:
        z: standardised inputs ``[N, D]``.
        y: labels ``[N]`` in ``range(n_classes)``.
        l2: weight of ``0.5 * ||W||^2`` (the bias is not penalised).
        max_iter: L-BFGS iterations at most.

    Returns:
        ``(model, info)`` with the final loss, iterations and gradient norm in ``info``.
    """
    if l2 < 0 or max_iter < 1:
        raise ValueError(f"l2={l2}, max_iter={max_iter}: expected l2 >= 0 and max_iter >= 1")
    model = torch.nn.Linear(z.shape[1], n_classes).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    z = z.double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(z), y) + 0.5 * l2 * model.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    loss = closure()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).abs().max().item()
    state = opt.state[opt._params[0]]
    return model, {"loss": loss.item(), "iterations": int(state.get("n_iter", 0)),
                   "max_abs_grad": grad}


@torch.no_grad()
def accuracy(model: torch.nn.Linear, z: torch.Tensor, y: torch.Tensor) -> float:
    return (model(z.double()).argmax(1) == y).double().mean().item() * 100


def parse_option(text: str) -> tuple[str, object]:
    """``"key=value"`` -> ``(key, value)`` with ints, floats, booleans and None parsed."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    words = {"true": True, "false": False, "none": None}
    if value.lower() in words:
        return key, words[value.lower()]
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="kws12", choices=SPEECH_TASKS, help="speech task (default kws12)")
    p.add_argument("--root", default=None,
                   help="dataset folder (default: the loader's default; for kws12/kws35 the "
                        "synthetic corpus under the data home, generated if missing)")
    p.add_argument("--seed", type=int, default=0, help="loader seed (unknown/silence draws)")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 weight on W (default 1e-4)")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations at most")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra loader option, repeatable, e.g. --option val_takes=0 or "
                        "--option clip_seconds=1.0 (numbers and true/false/none are parsed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    options = {"progress": args.progress, **dict(parse_option(o) for o in args.option)}
    if args.task != "fsdd":
        options.setdefault("seed", args.seed)
    stats = {}
    classes = None
    for split in SPLITS:
        try:
            ds = load(args.task, split, args.root, **options)
        except ValueError as err:
            if split != "val":
                raise
            print(f"  (no val split: {err})")
            continue
        classes = ds.classes
        stats[split] = clip_statistics(ds)
    load_s = time.perf_counter() - start
    splits = list(stats)

    z_train, y_train = stats["train"]
    mu, sd = z_train.mean(0), z_train.std(0) + 1e-6
    tensors = {s: (torch.from_numpy((z - mu) / sd), torch.from_numpy(y)) for s, (z, y) in stats.items()}
    start = time.perf_counter()
    model, info = fit_softmax(*tensors["train"], len(classes), l2=args.l2, max_iter=args.max_iter)
    fit_s = time.perf_counter() - start

    result = {"task": args.task, "root": args.root, "classes": len(classes),
              "inputs": int(z_train.shape[1]), "l2": args.l2,
              **{f"n_{s}": int(len(stats[s][1])) for s in splits},
              **{f"{s}_acc": round(accuracy(model, *tensors[s]), 2) for s in splits},
              **info, "load_s": round(load_s, 1), "fit_s": round(fit_s, 1)}
    print(f"order-free softmax regression on log-mel mean+std ({result['inputs']} inputs, "
          f"{len(classes)} classes), {args.task} at {args.root or 'default root'}")
    for s in splits:
        print(f"  {s:5s} {result[f'{s}_acc']:6.2f}%  ({result[f'n_{s}']} clips)")
    print(f"  L-BFGS: {info['iterations']} iterations, loss {info['loss']:.4f}, "
          f"max |grad| {info['max_abs_grad']:.1e}; load {load_s:.1f} s, fit {fit_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
