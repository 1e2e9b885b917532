"""Plots of sweeps and runs; they read only ``results.csv``, ``metrics.jsonl`` and saved models.

Three figures, each written as PNG and PDF:

1. **accuracy versus size** (:func:`plot_accuracy_vs_size`): x = effective parameters (or
   bytes, FLOPs, or ``r_W + r_U``) on a log axis, y = test accuracy. Runs that differ only
   in their seed form one point: the mean, with the standard deviation over seeds as error
   bars in both directions (learned ranks, and so sizes, vary with the seed). Each sweep
   group is a series: learned-rank (STR) groups as solid lines, fixed-rank ones dashed,
   dense baselines as a horizontal line with a ±std band and a marker at their own size.
   Points are annotated with their mean ranks ``(r_W, r_U)``.
2. **rank over training** (:func:`plot_rank_curves`): the rank of every matrix of the
   learned-rank runs after each epoch (``metrics.jsonl``), one line per seed.
3. **thresholded spectrum** (:func:`plot_spectrum`): for each matrix of a run's final
   model, ``|σ|`` sorted in decreasing order on a log axis with the threshold ``g(s)``; the
   entries above it survive (``S_g(σ, s) = sign(σ) relu(|σ| - g(s))``, the matrix's rank).
   Fixed-rank and dense matrices show their singular values.

Matplotlib is used through its object-oriented API with the Agg canvas (no ``pyplot``,
no global backend change), so plotting works without a display and inside other
programs. Files are written atomically.
"""
from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import runs
from .config import FIELDS
from .serialize import atomic_write_bytes

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter
except ImportError as e:  # pragma: no cover - matplotlib is an optional dependency
    raise ImportError("str_rnn.plots needs matplotlib: pip install 'str_rnn[plot]'") from e

__all__ = ["read_results", "results_table", "plot_results", "plot_run", "plot_accuracy_vs_size",
           "plot_rank_curves", "plot_spectrum"]

FORMATS = ("png", "pdf")
SIZES = ("params", "bytes", "flops", "rank")
AXIS_LABELS = {"params": "effective parameters (compacted model)", "bytes": "model size (bytes, 32-bit)",
               "flops": "FLOPs per sequence", "rank": "r_W + r_U (ranks summed over layers)"}
UNITS = {"params": "params", "bytes": "bytes", "flops": "FLOPs", "rank": "= r_W + r_U"}
MODE_STYLE = {  # marker, line style, description
    "str": ("o", "-", "learned rank (STR)"),
    "fixed": ("s", "--", "fixed rank"),
    "sparse": ("^", ":", "sparse STR"),
    "dense": ("D", "-", "dense"),
}
# config fields that do not change what a run computes: runs differing only in these
# (and the seed) are one point
_NOT_A_SETTING = {"seed", "progress", "threads", "device", "num_workers", "data"}
_SHORT = {"spectrum_decay": "λ", "threshold_decay": "λ_s", "s_init": "s₀", "rank_w": "r_W", "rank_u": "r_U"}


# -- reading -------------------------------------------------------------------------------------

def _parse(text: str):
    if text == "":
        return None
    if text in ("True", "False", "true", "false"):
        return text in ("True", "true")
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def read_results(results_csv) -> list[dict]:
    """Rows of a ``results.csv`` with numbers parsed and ``run_dir`` made usable.

    ``run_dir`` is resolved against the CSV's folder (where :mod:`str_rnn.sweep` writes
    it relative to), else kept as written.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is empty or lacks the columns a plot needs (named).
    """
    path = Path(results_csv)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} not found")
    with open(path, newline="") as f:
        rows = [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"results file {path}: no rows")
    missing = [c for c in ("mode", "task") if c not in rows[0]]
    if missing:
        raise ValueError(f"results file {path}: missing column(s) {', '.join(missing)}; expected a results.csv "
                         "written by str-rnn sweep")
    for row in rows:
        if row.get("run_dir") is not None:
            d = Path(str(row["run_dir"]))
            row["run_dir"] = d if d.is_absolute() or not (path.parent / d).exists() else path.parent / d
    return rows


def _finished(row: dict) -> bool:
    return row.get("status", "finished") == "finished" and row.get("final_test_acc") is not None


def _series_name(row: dict) -> tuple[str, str]:
    """``(group, mode)``: a sweep group is a series (split by mode if it mixes modes)."""
    return str(row.get("group") or row["mode"]), str(row["mode"])


def _point_key(row: dict) -> tuple:
    return tuple((k, str(row.get(k))) for k in FIELDS if k not in _NOT_A_SETTING)


def _size(row: dict, x: str, which: str) -> float | None:
    if x == "rank":
        w, u = row.get(f"{which}_rank_w_total"), row.get(f"{which}_rank_u_total")
        return None if w is None or u is None else w + u
    return row.get(f"{which}_{x}")


def _scored_on(rows: list[dict]) -> str:
    """What the accuracies are on: ``"test"``, or the dataset a rescored CSV names (:mod:`str_rnn.rescore`)."""
    where = rows[0].get("scored_on") if rows else None
    return f"{Path(str(where).rpartition(':')[0]).name} {str(where).rpartition(':')[2]}" if where else "test"


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _points(rows: list[dict], x: str, which: str) -> dict[str, list[dict]]:
    """``{(group, mode): [point, ...]}``; a point holds the mean/std of x, accuracy and ranks over seeds."""
    grouped = defaultdict(lambda: defaultdict(list))
    for row in rows:
        size, acc = _size(row, x, which), row.get(f"{which}_test_acc")
        if size is None or acc is None:
            continue
        grouped[_series_name(row)][_point_key(row)].append((row, size, acc))
    series = {}
    for name, points in grouped.items():
        out = []
        for members in points.values():
            rows_here = [m[0] for m in members]
            (xm, xs), (ym, ys) = _mean_std([m[1] for m in members]), _mean_std([m[2] for m in members])
            ranks = tuple(_mean_std([r.get(f"{which}_rank_{k}_total") or 0 for r in rows_here])[0] for k in "wu")
            out.append({"x": xm, "xerr": xs, "y": ym, "yerr": ys, "n": len(members), "ranks": ranks,
                        "per_seed": sorted((m[0].get("seed") or 0, m[2]) for m in members),
                        "mode": rows_here[0]["mode"], "variant": rows_here[0].get("variant") or "",
                        "cell": rows_here[0].get("cell")})
        series[name] = sorted(out, key=lambda p: p["x"])
    return series


def results_table(results_csv, *, which: str = "final", per_seed: bool = False) -> str:
    """A Markdown table of a ``results.csv``: one line per setting, mean ± std over seeds.

    Columns: task, group, setting (the sweep's grid values), seeds, effective parameters,
    ranks ``(r_W, r_U)``, test accuracy, and with ``per_seed`` each run's accuracy in the
    order of its seed. Failed and pending runs are counted below it.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_results`.
    """
    rows = read_results(results_csv)
    extra = " per seed |" if per_seed else ""
    lines = [f"| task | group | setting | seeds | params | (r_W, r_U) | {_scored_on(rows)} acc % |{extra}",
             "|---|---|---|---|---|---|---|" + ("---|" if per_seed else "")]
    for task in sorted({str(r["task"]) for r in rows}):
        here = [r for r in rows if _finished(r) and str(r["task"]) == task]
        for (group, mode), points in _points(here, "params", which).items():
            for p in sorted(points, key=lambda p: -p["x"]):
                lines.append(f"| {task} | {group} | {_variant_label(p['variant']) or mode} | {p['n']} | "
                             f"{p['x']:,.0f} ± {p['xerr']:,.0f} | ({p['ranks'][0]:.1f}, {p['ranks'][1]:.1f}) | "
                             f"{p['y']:.2f} ± {p['yerr']:.2f} |" +
                             (f" {' '.join(f'{acc:.2f}' for _, acc in p['per_seed'])} |" if per_seed else ""))
    others = [r for r in rows if not _finished(r)]
    if others:
        counts = defaultdict(int)
        for r in others:
            counts[str(r.get("status"))] += 1
        lines.append("")
        lines.append("not in the table: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return "\n".join(lines)


# -- writing -------------------------------------------------------------------------------------

def _new_figure(width=6.4, height=4.4) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, base: Path, formats=FORMATS) -> list[Path]:
    """Write ``base.png`` and ``base.pdf`` (atomically) and return their paths."""
    paths = []
    for fmt in formats:
        path = base.with_name(f"{base.name}.{fmt}")
        atomic_write_bytes(path, lambda f: fig.savefig(f, format=fmt, dpi=150))
        paths.append(path)
    return paths


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_") or "run"


def _variant_label(variant: str) -> str:
    parts = []
    for part in filter(None, variant.split(",")):
        key, _, value = part.partition("=")
        parts.append(f"{_SHORT.get(key, key)}={value}")
    return ", ".join(parts)


# -- 1. accuracy versus size -----------------------------------------------------------------------

def plot_accuracy_vs_size(rows: list[dict], out_base, *, x: str = "params", which: str = "final",
                          title: str | None = None) -> list[Path]:
    """Test accuracy against model size, one series per sweep group (see the module docstring).

    Args:
        rows: finished result rows (from :func:`read_results`) of one task.
        out_base: output path without extension.
        x: ``params | bytes | flops | rank``.
        which: ``final`` (last epoch) or ``selected`` (the run's selected epoch).
        title: figure title (default: task and what is plotted).

    Returns:
        the PNG and PDF paths.

    Raises:
        ValueError: unknown ``x`` or ``which``, or no row with both values.
    """
    if x not in SIZES:
        raise ValueError(f"x={x!r}: expected one of {', '.join(SIZES)}")
    if which not in ("final", "selected"):
        raise ValueError(f"which={which!r}: expected 'final' or 'selected'")
    series = _points(rows, x, which)
    if not series:
        raise ValueError(f"no finished run has both {which}_test_acc and a {which} {x} value to plot")
    fig = _new_figure()
    ax = fig.subplots()
    colors = iter(f"C{i}" for i in range(100))
    xs_all = [p["x"] for pts in series.values() for p in pts if p["x"] > 0]
    for (name, mode), points in series.items():
        color = next(colors)
        marker, line, desc = MODE_STYLE.get(mode, ("v", "-.", mode))
        seeds = max(p["n"] for p in points)
        label = desc if name == mode else f"{name}: {desc}"
        if mode == "dense":
            for p in points:
                ax.axhline(p["y"], color=color, ls="--", lw=1)
                ax.axhspan(p["y"] - p["yerr"], p["y"] + p["yerr"], color=color, alpha=0.12, lw=0)
                ax.errorbar([p["x"]], [p["y"]], yerr=[p["yerr"]], color=color, marker=marker, ls="none", capsize=3,
                            label=f"{label} ({p['x']:,.0f} {UNITS[x]}): {p['y']:.1f} ± {p['yerr']:.1f}%, n={p['n']}")
            continue
        ax.errorbar([p["x"] for p in points], [p["y"] for p in points], xerr=[p["xerr"] for p in points],
                    yerr=[p["yerr"] for p in points], color=color, marker=marker, ls=line, capsize=3,
                    label=f"{label} (n={seeds} seed{'s' if seeds > 1 else ''})")
        for p in points:
            text = "({},{})".format(*(f"{r:.0f}" if r == round(r) else f"{r:.1f}" for r in p["ranks"]))
            if mode == "str" and p["variant"]:
                text = f"{_variant_label(p['variant'])}\n{text}"
            ax.annotate(text, (p["x"], p["y"]), textcoords="offset points", xytext=(4, -10 if mode == "fixed" else 5),
                        fontsize=6.5, color=color)
    if xs_all:
        ax.set_xscale("log")
        # plain numbers (600, 2000) read better than 6×10² on a size axis
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel(AXIS_LABELS[x])
    ax.set_ylabel(f"{_scored_on(rows)} accuracy (%), {'last' if which == 'final' else 'selected'} epoch")
    task = rows[0].get("task", "")
    ax.set_title(title or f"{task}: accuracy vs {AXIS_LABELS[x].split(' (')[0]} (mean ± std over seeds)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(out_base))


# -- 2. rank over training -----------------------------------------------------------------------

def plot_rank_curves(run_groups: dict[str, list[Path]], out_base, *, title: str | None = None) -> list[Path]:
    """Rank of every matrix after each epoch, from the runs' ``metrics.jsonl``.

    Args:
        run_groups: ``{label: [run_dir, ...]}``; each label gets one colour, each run (seed)
            one line.
        out_base: output path without extension.
        title: figure title.

    Returns:
        the PNG and PDF paths.

    Raises:
        ValueError: no run has any epoch in ``metrics.jsonl``.
    """
    curves = {label: [runs.read_metrics(d) for d in dirs] for label, dirs in run_groups.items()}
    names = sorted({m for rows_list in curves.values() for rows in rows_list for r in rows for m in r["ranks"]},
                   key=lambda n: (n.rsplit(".", 1)[0], n.rsplit(".", 1)[-1] != "W"))
    if not names:
        raise ValueError("plot_rank_curves: no run has an epoch in metrics.jsonl")
    cols = min(len(names), 2)
    fig = _new_figure(4.2 * cols, 3.2 * math.ceil(len(names) / cols))
    axes = np.atleast_1d(fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False)).ravel()
    for i, (label, rows_list) in enumerate(curves.items()):
        for j, rows in enumerate(rows_list):
            for ax, name in zip(axes, names):
                pts = [(r["epoch"], r["ranks"][name]) for r in rows if name in r["ranks"]]
                if pts:
                    ax.plot(*zip(*pts), color=f"C{i}", lw=1.2, alpha=0.85, label=label if j == 0 else None)
    for ax, name in zip(axes, names):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("rank")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "rank of each matrix during training", fontsize=10)
    return _save(fig, Path(out_base))


# -- 3. thresholded spectrum ----------------------------------------------------------------------

def _spectra(model) -> dict[str, tuple[np.ndarray, float | None]]:
    """``{matrix name: (|σ| sorted decreasing, threshold or None)}`` of a model."""
    import torch

    from .accounting import matrices
    from .lowrank import LowRankSTR

    out = {}
    with torch.no_grad():
        for name, m in matrices(model).items():
            if isinstance(m, LowRankSTR):
                values, thr = m.sigma.abs().double().numpy(), float(m.threshold())
            else:
                values, thr = torch.linalg.svdvals(m.weight.double()).numpy(), None
            out[name] = (np.sort(values)[::-1], thr)
    return out


def plot_spectrum(run_dir, out_base, *, model: str = "final", title: str | None = None) -> list[Path]:
    """Sorted ``|σ|`` of every matrix of a run's saved model, with the threshold ``g(s)``.

    Entries above the threshold (filled markers) are the survivors, the nonzero entries of
    ``LowRankSTR.gains()``; pruned ones are hollow. Entries more than 1000 times below the
    threshold (exact zeros among them) are drawn on a floor line as triangles.

    Args:
        run_dir: a run folder with ``{model}/`` saved by the training engine.
        out_base: output path without extension.
        model: which saved model (``final``, ``best``, ``compact``).
        title: figure title.

    Returns:
        the PNG and PDF paths.

    Raises:
        FileNotFoundError: the run has no such saved model.
    """
    from .serialize import load

    spectra = _spectra(load(Path(run_dir) / model))
    names = list(spectra)
    cols = min(len(names), 2)
    fig = _new_figure(4.2 * cols, 3.2 * math.ceil(len(names) / cols))
    axes = np.atleast_1d(fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        values, thr = spectra[name]
        idx = np.arange(1, len(values) + 1)
        alive = values > (thr or 0)
        # entries far below the threshold (exact zeros, l1-clipped ones) would stretch the
        # log axis over dozens of decades: draw them on a floor line instead
        top = values.max() if values.size and values.max() > 0 else 1.0
        floor = min(thr if thr else top, top) * (1e-3 if thr else 1e-6)
        low = values <= floor
        ax.plot(idx[alive], values[alive], "o", ms=3.5, color="C0", label=f"survivors: rank {alive.sum()}")
        dead = ~alive & ~low
        if dead.any():
            ax.plot(idx[dead], values[dead], "o", ms=3.5, mfc="none", color="C7", label="pruned")
        if low.any():
            ax.plot(idx[low], np.full(low.sum(), floor), "v", ms=3.5, mfc="none", color="C7",
                    label=f"pruned, |σ| ≤ {floor:.1g}")
        if thr is not None:
            ax.axhline(thr, color="C3", lw=1.2, label=f"threshold g(s) = {thr:.3g}")
            ax.set_title(f"{name}: |σ| (learned rank {alive.sum()}/{len(values)})", fontsize=9)
        else:
            ax.set_title(f"{name}: singular values (rank {alive.sum()}/{len(values)})", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("index (sorted by |σ|)")
        ax.set_ylabel("|σ|")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title or f"spectrum at the end of training: {Path(run_dir).name}", fontsize=10)
    return _save(fig, Path(out_base))


# -- a run, a sweep ------------------------------------------------------------------------------

def _plot_curves(rows: list[dict], out_base: Path, title: str) -> list[Path]:
    fig = _new_figure(8, 3.4)
    acc, loss = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for key, color in (("train_acc", "C0"), ("val_acc", "C1"), ("test_acc", "C2")):
        acc.plot(epochs, [r[key] for r in rows], color=color, label=key.split("_")[0])
    acc.set_xlabel("epoch")
    acc.set_ylabel("accuracy (%)")
    acc.legend(fontsize=7)
    acc.grid(True, alpha=0.3)
    loss.plot(epochs, [r["train_loss"] for r in rows], color="C0", label="train loss")
    loss.set_xlabel("epoch")
    loss.set_ylabel("training loss")
    loss.grid(True, alpha=0.3)
    right = loss.twinx()
    right.plot(epochs, [r["params"] for r in rows], color="C3", ls="--", label="effective parameters")
    right.set_ylabel("effective parameters", color="C3")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_base)


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Plots of one run: accuracy/loss curves, ranks over epochs, final spectrum.

    Args:
        run_dir: a run folder written by the training engine.
        out_dir: where to write (default: ``run_dir/plots``).

    Returns:
        the paths written (the spectrum only once the run has a ``final/`` model).

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder or has no finished epoch.
    """
    run_dir = Path(run_dir)
    rows = runs.read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir / runs.METRICS} not found or empty: not a run folder with a finished epoch")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    paths = _plot_curves(rows, out / "curves", f"training: {run_dir.name}")
    paths += plot_rank_curves({run_dir.name: [run_dir]}, out / "ranks", title=f"ranks during training: {run_dir.name}")
    if (run_dir / "final" / "meta.json").is_file():
        paths += plot_spectrum(run_dir, out / "spectrum")
    return paths


def plot_results(results_csv, out_dir=None, *, x=("params", "rank"), spectra: bool = True) -> list[Path]:
    """All plots of a sweep's ``results.csv`` (see the module docstring).

    Writes, per task (the task name is appended when the CSV holds several):
    ``accuracy_vs_{x}`` for each ``x`` (and ``selected_accuracy_vs_{x}`` when runs select
    an epoch other than the last), ``rank_over_epochs`` over the learned-rank runs, and
    ``spectrum_{group}_{variant}`` for the first seed of each learned-rank setting.

    Args:
        results_csv: a ``results.csv`` written by :func:`str_rnn.sweep.run_sweep`.
        out_dir: output folder (default: ``plots/`` beside the CSV).
        x: the size measures to plot against (``params``, ``bytes``, ``flops``, ``rank``).
        spectra: also plot the final spectra (loads each model).

    Returns:
        every path written (PNG and PDF), the accuracy-versus-parameters PNG first.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no finished run in it, or a bad ``x``.
    """
    rows = read_results(results_csv)
    out = Path(out_dir) if out_dir is not None else Path(results_csv).parent / "plots"
    finished = [r for r in rows if _finished(r)]
    if not finished:
        raise ValueError(f"results file {results_csv}: no finished run to plot "
                         f"({len(rows)} rows, statuses {sorted({str(r.get('status')) for r in rows})})")
    x = (x,) if isinstance(x, str) else tuple(x)
    tasks = sorted({r["task"] for r in finished})
    paths = []
    for task in tasks:
        here = [r for r in finished if r["task"] == task]
        tail = f"_{task}" if len(tasks) > 1 else ""
        for size in x:
            paths += plot_accuracy_vs_size(here, out / f"accuracy_vs_{size}{tail}", x=size)
            if any(r.get("select") not in (None, "last") and r.get("selected_test_acc") is not None for r in here):
                paths += plot_accuracy_vs_size(here, out / f"selected_accuracy_vs_{size}{tail}", x=size,
                                               which="selected")
        learned = [r for r in rows if r["task"] == task and r["mode"] == "str" and r.get("run_dir")]
        groups = defaultdict(list)
        for r in learned:
            label = f"{r.get('group') or r['mode']}: {_variant_label(r.get('variant') or '')}".rstrip(": ")
            groups[label].append(r)
        with_metrics = {k: [r["run_dir"] for r in v if (Path(r["run_dir"]) / runs.METRICS).is_file()]
                        for k, v in groups.items()}
        with_metrics = {k: v for k, v in with_metrics.items() if v}
        if with_metrics:
            paths += plot_rank_curves(with_metrics, out / f"rank_over_epochs{tail}",
                                      title=f"{task}: rank of each matrix during training (learned rank)")
        if spectra:
            for label, members in groups.items():
                first = min((r for r in members if _finished(r)), key=lambda r: r.get("seed") or 0, default=None)
                if first is not None and (Path(first["run_dir"]) / "final" / "meta.json").is_file():
                    name = _safe(f"{first.get('group') or first['mode']}_{first.get('variant') or ''}")
                    paths += plot_spectrum(first["run_dir"], out / f"spectrum_{name}{tail}",
                                           title=f"{task}, {label}, seed {first.get('seed')}: final spectrum")
    return paths
