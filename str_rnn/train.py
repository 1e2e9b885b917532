"""The training engine behind ``str-rnn train``, sweeps and the experiment drivers.

``train(config, run_dir) -> result row`` trains a :class:`~str_rnn.SequenceClassifier`
on one task and leaves a run directory (see :mod:`str_rnn.runs`). One step::

    loss  = cross_entropy(model(x, lengths), y)           padded batch, true lengths
    g     = ∇loss;  |g| = sqrt(Σ g²) in float64           (float32 overflows near 1e19)
    |g| or loss not finite -> stop (on_nonfinite=stop) or skip the step (skip)
    g    *= min(1, grad_clip / |g|)
    p    -= lr_p · λ_p · p                                 decoupled decay, per group:
              weights / factors: weight_decay
              σ (spectra):       spectrum_decay (l2), or |σ| -= lr·λ clipped at 0 (l1)
              s (thresholds):    s -= lr·λ_s·(s - threshold_target)
    p    -= Adam/SGD step                                  factors at lr · lr_factors
    σ, s decay only during prune_epochs (then s frozen), and with target_params only while
    the model's effective parameters are above the gradual-pruning schedule; on steps
    without it, σ's optimiser state is cleared at pruned directions (hold_pruned)
    exact_target: the directions this step pruned stay pruned one at a time, smallest margin
    first, while the model is above the schedule; the rest get their margin back
    every reorth_every steps: re-SVD each learned-rank matrix, reset its optimiser state
    U    *= min(1, recurrent_norm_cap / ‖U‖₂)              every recurrent matrix, when capped

Decay is applied outside the optimiser's normalisation (as AdamW does): an L2 term inside
Adam is divided by Adam's running gradient scale, which made s move at the same speed
for every λ.

How ranks fall, and the two documented ways to push harder than STR's recipe:

* STR's decay pulls ``s`` towards 0, so with ``g = exp`` the threshold ``exp(s)`` rises
  from ``exp(s_init)`` but can never pass ``exp(0) = 1`` (``sigmoid``: 0.5); singular
  values the loss keeps above 1 are never pruned. ``threshold_target = t`` pulls ``s``
  towards ``t`` instead, so the threshold can grow to ``exp(t)``.
* ``spectrum_penalty = "l1"`` shrinks ``|σ|`` by ``lr · λ`` per step (the proximal step of
  the nuclear norm when ``A``, ``B`` are orthonormal): entries the loss does not defend
  reach 0, under any threshold, in finite time, where the multiplicative ``l2`` decay
  only approaches 0. With ``threshold_decay = 0`` this prunes under the fixed small
  threshold ``g(s_init)`` alone.

Data enter through :func:`load_splits` (``str_rnn.datasets.load``); pass ``datasets=`` to
:func:`train` (or replace ``str_rnn.train.load_splits``) to train on any torch
``Dataset`` of ``(x [T, F], y)`` items with a ``.classes`` list.

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP (gloo on
CPU, NCCL on GPU), each process reads a ``DistributedSampler`` shard of every global batch
(``batch_size / world_size`` items), and only rank 0 writes files. Gradients are averaged,
so every rank holds the same parameters and thresholds. As with any ``DistributedSampler``,
an epoch repeats a few items when the training split is not a multiple of the process count.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from . import runs
from .accounting import count_params, flops, matrices, model_size_bytes, ranks, thresholds
from .config import TrainConfig
from .convert import compact
from .cells import RNNCell
from .lowrank import FixedRank, LowRankSTR, Matrix
from .models import SequenceClassifier
from .optim import param_groups
from .rnn import RNN
from .serialize import save

__all__ = ["train", "evaluate", "count_correct", "load_splits", "build_model", "split_statistics",
           "make_optimizer", "make_scheduler", "apply_decay", "freeze_thresholds", "grad_norm", "reorthogonalize",
           "cap_recurrent_norm", "recurrent_norm", "recurrent_matrices",
           "NonFiniteError", "TrainingInterrupted"]

CHECKPOINT_VERSION = 1


class NonFiniteError(FloatingPointError):
    """Training met a NaN/inf loss or gradient norm with ``on_nonfinite=stop``."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the run directory holds the last finished epoch's checkpoint."""


# -- data and model ------------------------------------------------------------------------

def load_splits(config: TrainConfig, splits=("train", "val", "test")) -> dict:
    """``{split: Dataset}`` from :func:`str_rnn.datasets.load` for the config's task.

    The one place the engine reads data; tests and drivers may replace it.
    """
    from .datasets import load

    options = {"progress": config.progress, **config.data_options}
    return {s: load(config.task, s, config.data.data, **options) for s in splits}


def split_statistics(dataset) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-feature ``(mean, std)`` over the true frames of ``dataset``, and its mean length.

    The statistics come from :func:`str_rnn.features.feature_stats`; the mean length (the
    sequence length FLOPs are reported for) from the items themselves.
    """
    from .features import feature_stats

    mean, std = feature_stats(dataset)
    offsets = getattr(dataset, "offsets", None)  # a FeatureDataset's frame store: no item reads
    lengths = getattr(dataset, "lengths", None)  # augmented datasets know their lengths too
    if lengths is None:
        lengths = np.diff(offsets) if offsets is not None else [len(dataset[i][0]) for i in range(len(dataset))]
    return mean, std, max(1, round(float(np.mean(lengths))))


def build_model(config: TrainConfig, input_size: int, num_classes: int, mean=None, std=None) -> SequenceClassifier:
    """The :class:`SequenceClassifier` a config describes (initialised from the torch RNG).

    Raises:
        ValueError: a rank larger than its matrix (the message names the matrix size).
    """
    kwargs = {"matrix": config.mode, "rank_w": config.rank_w, "rank_u": config.rank_u}
    if config.mode in ("str", "sparse"):
        kwargs.update(g=config.g, s_init=config.s_init)
    if config.mode == "str":
        kwargs["init"] = config.init
    rnn = RNN(config.cell, input_size, config.hidden_size, num_layers=config.num_layers, **kwargs)
    return SequenceClassifier(rnn, num_classes, mean=mean, std=std)


def _check_splits(splits: dict) -> tuple[int, list]:
    """Input size and class names, after checking the splits agree."""
    for name in ("train", "val", "test"):
        if name not in splits:
            raise ValueError(f"datasets: missing the {name!r} split (have {sorted(splits)})")
        if len(splits[name]) == 0:
            raise ValueError(f"datasets: the {name!r} split is empty")
    classes = list(getattr(splits["train"], "classes", []))
    if len(classes) < 2:
        raise ValueError("datasets: the train split needs a .classes list of at least 2 names")
    for name in ("val", "test"):
        other = getattr(splits[name], "classes", classes)
        if list(other) != classes:
            raise ValueError(f"datasets: the {name!r} split's classes {list(other)} differ from train's {classes}")
    x = np.asarray(splits["train"][0][0])
    if x.ndim != 2:
        raise ValueError(f"datasets: items must be (x [T, F], y); got x of shape {x.shape}")
    return int(x.shape[1]), classes


# -- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def count_correct(model: nn.Module, dataset, *, batch_size: int = 500, device="cpu",
                  rank: int = 0, world: int = 1) -> tuple[int, int]:
    """``(correct, total)`` of ``model`` on items ``rank, rank + world, ...`` of ``dataset``."""
    from .datasets import pad_collate

    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=pad_collate)
    was_training = model.training
    model.eval()
    correct = 0
    for x, lengths, y in loader:
        logits = model(x.to(device), lengths=lengths)
        correct += int((logits.argmax(1).cpu() == y).sum())
    model.train(was_training)
    return correct, len(indices)


def evaluate(model: nn.Module, dataset, *, batch_size: int = 500, device="cpu") -> float:
    """Accuracy of ``model`` on ``dataset`` in percent."""
    correct, total = count_correct(model, dataset, batch_size=batch_size, device=device)
    return 100.0 * correct / max(total, 1)


# -- optimisation ---------------------------------------------------------------------------

def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD over named groups, each with its own lr and decoupled decay.

    Groups: ``weights`` (lr, weight_decay), ``factors`` (A, B, W1, W2: lr · lr_factors,
    weight_decay), ``spectra`` (σ: lr, spectrum_decay), ``thresholds`` (s: lr,
    threshold_decay). The optimiser's own ``weight_decay`` is 0 in every group; the decay
    is kept under the group key ``"decay"`` and applied by :func:`apply_decay`.
    """
    groups = param_groups(model, config.weight_decay, threshold_decay=config.threshold_decay,
                          spectrum_decay=config.spectrum_decay)
    factor_ids = set()
    for m in model.modules():
        if isinstance(m, LowRankSTR):
            factor_ids |= {id(m.A), id(m.B)}
        elif isinstance(m, FixedRank):
            factor_ids |= {id(m.W1), id(m.W2)}
    out = []
    for g in groups:
        decay = g["weight_decay"]
        if g["name"] == "weights":
            factors = [p for p in g["params"] if id(p) in factor_ids]
            others = [p for p in g["params"] if id(p) not in factor_ids]
            out += [{"name": "weights", "params": others, "lr": config.lr, "decay": decay},
                    {"name": "factors", "params": factors, "lr": config.lr * config.lr_factors, "decay": decay}]
        else:
            out.append({"name": g["name"], "params": g["params"], "lr": config.lr, "decay": decay})
    out = [g for g in out if g["params"]]
    for g in out:
        g["weight_decay"] = 0.0
    if config.optimizer == "adam":
        return torch.optim.Adam(out, lr=config.lr)
    return torch.optim.SGD(out, lr=config.lr, momentum=config.momentum)


def make_scheduler(optimizer, config: TrainConfig):
    """Per-epoch schedule: ``step`` (MultiStepLR at lr_steps), ``cosine`` or ``none``."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    steps = config.lr_steps if config.schedule == "step" else []
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=config.lr_gamma)


PRUNING_GROUPS = ("spectra", "thresholds")
"""The optimiser groups whose decay learns the ranks (see :func:`apply_decay`)."""


@torch.no_grad()
def apply_decay(optimizer, config: TrainConfig, prune: bool = True) -> None:
    """Decoupled decay of every group by ``lr_group · decay_group`` (see the module
    docstring); ``prune=False`` leaves out the groups that learn the ranks
    (:data:`PRUNING_GROUPS`), keeping plain weight decay."""
    for group in optimizer.param_groups:
        rate = group["lr"] * group["decay"]
        if rate == 0 or (not prune and group["name"] in PRUNING_GROUPS):
            continue
        for p in group["params"]:
            if group["name"] == "thresholds":
                p.sub_(rate * (p - config.threshold_target))
            elif group["name"] == "spectra" and config.spectrum_penalty == "l1":
                p.copy_(p.sign() * (p.abs() - rate).clamp_min(0))
            else:
                p.mul_(1 - rate)


PRUNE_RAMP = 0.75
"""Share of ``prune_epochs`` over which the schedule of ``target_params`` falls from the
starting size to the target; the rest of the pruning phase only holds the target."""


def scheduled_params(start: int, target: int, progress: float) -> float:
    r"""Effective parameters allowed at ``progress`` (epochs done / ``prune_epochs``) when
    pruning to ``target_params``: the cubic schedule of gradual pruning (Zhu & Gupta, "To
    prune, or not to prune", 2017),

    ``target + (start - target) · (1 - p)³``,  ``p = min(1, progress / PRUNE_RAMP)``:

    fast at first, while the directions the loss does not need go, and slow near the target,
    where every further direction costs accuracy and the rest must adapt. The decay acts on
    a step only while the model is above this curve, so the rank falls along it whatever
    the data set's steps per epoch, instead of at a speed λ sets.
    """
    p = min(1.0, max(0.0, progress) / PRUNE_RAMP)
    return target + (start - target) * (1.0 - p) ** 3


def freeze_thresholds(optimizer) -> None:
    """Drop the thresholds' gradients so that the optimiser leaves every ``s`` where it is.

    Used after ``prune_epochs``: with no decay and fixed thresholds, pruned entries of σ
    (below the threshold, so without loss gradient) stay pruned and the survivors train
    freely — prune, then fine-tune at the learned rank.
    """
    for group in optimizer.param_groups:
        if group["name"] == "thresholds":
            for p in group["params"]:
                p.grad = None


@torch.no_grad()
def hold_pruned(model: nn.Module, optimizer) -> None:
    """Clear the optimiser's running averages of σ at every pruned direction (gain 0).

    A pruned direction gets no gradient, but Adam's (or SGD's) momentum from before would
    go on moving its σ for tens of steps and could lift it back over the threshold. Called
    before every step on which the rank-learning decay does not act (the fine-tuning phase,
    or ``target_params`` holding the schedule), so that what is pruned stays pruned unless
    the loss itself lowers the threshold under it.
    """
    for m in model.modules():
        if isinstance(m, LowRankSTR):
            state = optimizer.state.get(m.sigma)
            if not state:
                continue
            dead = m.gains() == 0
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if state.get(key) is not None:
                    state[key][dead] = 0


def grad_norm(parameters) -> float:
    """Global L2 norm of the gradients, accumulated in float64 (inf/NaN if any entry is)."""
    norms = [p.grad.detach().double().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def recurrent_matrices(model: nn.Module) -> list[Matrix]:
    """The recurrent matrix ``U`` of every cell of ``model``."""
    return [m.U for m in model.modules() if isinstance(m, RNNCell)]


def recurrent_norm(model: nn.Module) -> float:
    """The largest spectral norm ``‖U‖₂`` over the recurrent matrices of ``model`` (0 if none)."""
    return max((u.spectral_norm() for u in recurrent_matrices(model)), default=0.0)


@torch.no_grad()
def cap_recurrent_norm(model: nn.Module, cap: float) -> int:
    r"""Project every recurrent matrix onto the ball ``‖U‖₂ <= cap``: ``U <- U · cap / ‖U‖₂``
    where ``‖U‖₂ > cap`` (:meth:`~str_rnn.lowrank.Matrix.scale_`, exact, rank unchanged).

    Why: backprop through time multiplies one Jacobian ``∂h_t/∂h_{t-1}`` per step, and
    each carries ``U`` times gate derivatives; once ``‖U‖₂`` has grown to the hundreds, a
    128-step product explodes (measured on HAR-2 with the factors at the full lr: gradient
    norms to 1e27 while ``‖U‖₂`` rose to 130-220, against 6-9 in runs that stayed stable).
    Clipping the gradient cannot stop that growth, since Adam's steps are about ``lr``
    whatever the gradient's size. Returns the number of matrices scaled.
    """
    scaled = 0
    for u in recurrent_matrices(model):
        norm = u.spectral_norm()
        if norm > cap * (1 + 1e-5):  # not again for float32 rounding of the last projection
            u.scale_(cap / norm)
            scaled += 1
    return scaled


@torch.no_grad()
def spectra_snapshot(model: nn.Module) -> list[tuple[LowRankSTR, torch.Tensor, torch.Tensor]]:
    """``(matrix, σ, g(s))`` of every learned-rank matrix of ``model``, copied (for
    :func:`limit_pruning` after a step)."""
    return [(m, m.sigma.detach().clone(), m.threshold().detach().clone())
            for m in model.modules() if isinstance(m, LowRankSTR)]


@torch.no_grad()
def limit_pruning(model: nn.Module, before, floor: float) -> int:
    r"""Undo the prunings of one step that take ``model`` under ``floor`` effective parameters.

    A direction ``j`` was pruned by the step when its gain ``S_g(σ_j, s)`` went from nonzero
    (``|σ₀_j| > g(s₀)`` in ``before``, a :func:`spectra_snapshot`) to 0. One decay step moves
    every ``σ`` at once and Adam's momentum moves them further, so a step can prune several
    directions that sat just above the threshold, each costing ``out + in`` parameters.
    Here they are pruned one at a time, smallest margin ``|σ₀_j| - g(s₀)`` first, while the
    model holds more than ``floor`` parameters: the first goes whenever the model was above
    the floor (so pruning progresses) and the model ends at most one direction under it.
    Every other direction gets its margin back over the step's new threshold,
    ``σ_j <- sign(σ₀_j) (g(s) + |σ₀_j| - g(s₀))``, so it stays active. Returns their number.
    """
    pruned = []
    for m, sigma0, thr0 in before:
        margin0 = sigma0.abs() - thr0
        for j in ((margin0 > 0) & (m.gains() == 0)).nonzero().flatten().tolist():
            pruned.append((float(margin0[j]), m, j, sigma0[j]))
    if not pruned:
        return 0
    pruned.sort(key=lambda item: item[0])
    after = [m.sigma[j].clone() for _, m, j, _ in pruned]
    for margin0, m, j, sigma0_j in pruned:
        thr = m.threshold().detach()
        back = torch.maximum(thr + margin0, torch.nextafter(thr, torch.tensor(float("inf"))))
        m.sigma[j] = torch.sign(sigma0_j) * back
    kept = 0
    for (_, m, j, _), sigma_after in zip(pruned, after):
        if count_params(model) > floor:
            m.sigma[j] = sigma_after
        else:
            kept += 1
    return kept


@torch.no_grad()
def reorthogonalize(model: nn.Module, optimizer) -> int:
    """Re-SVD every learned-rank matrix (same product) and drop its factors' optimiser state."""
    n = 0
    for m in model.modules():
        if isinstance(m, LowRankSTR):
            m.reorthogonalize()
            for p in (m.A, m.sigma, m.B):
                optimizer.state.pop(p, None)
            n += 1
    return n


# -- determinism ------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # plain lists and tensors only, so the checkpoint loads with weights_only=True
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- distributed ----------------------------------------------------------------------------

class _Dist:
    """Process-group facts; a no-op stand-in when not launched distributed."""

    def __init__(self, device_choice: str):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
        if device_choice == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda: no CUDA device is available")
        self.device = torch.device(f"cuda:{local}" if use_cuda and self.world > 1 else "cuda" if use_cuda else "cpu")
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# -- the engine -------------------------------------------------------------------------------

def _model_facts(model: nn.Module, seq_len: int) -> dict:
    """Ranks, thresholds, effective params, bytes and FLOPs of ``model`` (JSON-able)."""
    r = ranks(model)
    return {"ranks": {k: v[0] for k, v in r.items()}, "thresholds": thresholds(model),
            "params": count_params(model), "bytes": model_size_bytes(model), "flops": flops(model, seq_len),
            "recurrent_norm": recurrent_norm(model)}


def _rank_sums(row: dict) -> dict:
    """Ranks of W and U summed over layers (``(r_W, r_U)`` of the papers for one layer)."""
    return {f"rank_{k.lower()}_total": sum(v for name, v in row["ranks"].items() if name.endswith(f".{k}"))
            for k in ("W", "U")}


def _flat_value(v):
    import json

    return json.dumps(v) if isinstance(v, (list, dict)) else v


class _Trainer:
    """One run: data, model, optimiser and the loop; see :func:`train`."""

    def __init__(self, config: TrainConfig, run_dir: Path, dist: _Dist, datasets, resume: bool):
        self.config, self.run_dir, self.dist = config, run_dir, dist
        c = config
        seed_everything(c.seed)
        self.splits = datasets if datasets is not None else load_splits(c)
        self.input_size, self.classes = _check_splits(self.splits)
        if c.batch_size % dist.world:
            raise ValueError(f"batch_size={c.batch_size} is not divisible by the {dist.world} processes")
        mean, std, self.seq_len = split_statistics(self.splits["train"])
        self.model = build_model(c, self.input_size, len(self.classes), mean, std).to(dist.device)
        self.start_params = count_params(self.model)  # before any pruning, also when resuming
        self.optimizer = make_optimizer(self.model, c)
        self.scheduler = make_scheduler(self.optimizer, c)
        self.sampler = DistributedSampler(self.splits["train"], num_replicas=dist.world, rank=dist.rank,
                                          shuffle=True, seed=c.seed)
        from .datasets import pad_collate

        self.loader = DataLoader(self.splits["train"], batch_size=c.batch_size // dist.world,
                                 sampler=self.sampler, collate_fn=pad_collate, num_workers=c.num_workers)
        self.epoch, self.steps, self.rows, self.best = 0, 0, [], None
        if resume:
            self._restore(runs.load_checkpoint(run_dir, map_location=dist.device))
        elif dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            runs.write_config(run_dir, c)
            runs.write_metrics(run_dir, [])
        self.net = self.model
        if dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    # -- checkpoints --
    def _checkpoint(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "epoch": self.epoch, "steps": self.steps,
                "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(), "rows": self.rows, "best": self.best}

    def _restore(self, ck: dict) -> None:
        if ck.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{self.run_dir / runs.CHECKPOINT}: checkpoint version {ck.get('version')!r}, "
                             f"expected {CHECKPOINT_VERSION}")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        self.epoch, self.steps, self.rows, self.best = ck["epoch"], ck["steps"], ck["rows"], ck["best"]
        self.saved_epoch = self.epoch
        if self.dist.main:
            runs.write_metrics(self.run_dir, self.rows)  # drop rows of an epoch cut short

    # -- one epoch --
    def _train_epoch(self, bar) -> dict:
        c, dist = self.config, self.dist
        self.net.train()
        self.sampler.set_epoch(self.epoch)  # the shuffle is a function of (seed, epoch): resumable
        if hasattr(self.splits["train"], "set_epoch"):
            self.splits["train"].set_epoch(self.epoch)  # a fresh augmentation draw per epoch
        params = [p for p in self.model.parameters() if p.requires_grad]
        n_batches = self._batches_per_epoch
        pruning = c.prune_epochs is None or self.epoch < c.prune_epochs
        loss_sum = correct = count = skipped = decayed = capped = kept = 0
        norm_max = 0.0
        for i, (x, lengths, y) in enumerate(self.loader):
            if c.limit_batches and i >= c.limit_batches:
                break
            x, y = x.to(dist.device), y.to(dist.device)
            logits = self.net(x, lengths=lengths)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = grad_norm(params)
            loss_value = float(loss.detach())
            bad_here = not (math.isfinite(loss_value) and math.isfinite(norm))
            bad = self.dist.all_sum([float(bad_here)])[0] > 0  # every rank takes the same branch
            if bad:
                where = f"epoch {self.epoch + 1}, batch {i + 1}"
                what = f"loss {loss_value}, gradient norm {norm}"
                if c.on_nonfinite == "stop":
                    kept = (f"the last good checkpoint is {self.run_dir / runs.CHECKPOINT} (epoch {self.epoch})"
                            if self.epoch else "no epoch had finished, so there is no checkpoint")
                    raise NonFiniteError(
                        f"non-finite training step at {where} ({what}); stopped: {kept}. Lower lr or "
                        f"lr_factors, set grad_clip, or resume with --on-nonfinite skip")
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                if bar is not None:
                    bar.write(f"skipped a non-finite step at {where} ({what})")
                continue
            norm_max = max(norm_max, norm)
            if c.grad_clip and norm > c.grad_clip:
                scale = c.grad_clip / (norm + 1e-6)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            floor = self._params_floor(i, n_batches)
            prune = pruning and (floor is None or count_params(self.model) > floor)
            before = spectra_snapshot(self.model) if c.exact_target else None
            if not pruning:
                freeze_thresholds(self.optimizer)  # fine-tuning phase: the learned ranks stay
            apply_decay(self.optimizer, c, prune=prune)
            if not prune:
                hold_pruned(self.model, self.optimizer)
            decayed += prune
            self.optimizer.step()
            if before is not None:
                kept += limit_pruning(self.model, before, floor)
            self.steps += 1
            if c.reorth_every and self.steps % c.reorth_every == 0:
                reorthogonalize(self.model, self.optimizer)
            if c.recurrent_norm_cap:
                capped += cap_recurrent_norm(self.model, c.recurrent_norm_cap) > 0
            loss_sum += loss_value * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            count += len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{100 * correct / count:.1f}")
        loss_sum, correct, count, skipped = self.dist.all_sum([loss_sum, correct, count, skipped])
        return {"train_loss": loss_sum / count if count else float("nan"),
                "train_acc": 100.0 * correct / count if count else float("nan"),
                "skipped_steps": int(skipped), "grad_norm_max": norm_max, "pruning_steps": decayed,
                "capped_steps": capped, "pruning_undone": kept}

    @property
    def _batches_per_epoch(self) -> int:
        """Batches an epoch trains on (``limit_batches`` caps the loader's)."""
        n = len(self.loader)
        return min(self.config.limit_batches, n) if self.config.limit_batches else n

    def _params_floor(self, batch: int, n_batches: int) -> float | None:
        """The size the model is pruned towards on this step (batch ``batch`` of the epoch):
        with ``target_params``, :func:`scheduled_params` (``target_params`` once the pruning
        phase is over), else None. The rank-learning decay acts on a step of the pruning
        phase only while the model is above it (parameters are the same on every process,
        so every process decides alike)."""
        c = self.config
        if c.target_params is None:
            return None
        progress = (self.epoch + batch / n_batches) / c.prune_epochs
        return scheduled_params(self.start_params, c.target_params, progress)

    def _accuracy(self, split: str) -> float:
        c, dist = self.config, self.dist
        correct, total = count_correct(self.model, self.splits[split], batch_size=c.eval_batch_size,
                                       device=dist.device, rank=dist.rank, world=dist.world)
        correct, total = self.dist.all_sum([correct, total])
        return 100.0 * correct / total

    def _select(self, row: dict) -> None:
        """Update the selected epoch (validation accuracy only; never the test split)."""
        c = self.config
        if c.select == "last":
            return
        if c.select == "budget":
            if c.budget_params is not None and row["params"] > c.budget_params:
                return
            if c.budget_bytes is not None and row["bytes"] > c.budget_bytes:
                return
        if self.best is None or row["val_acc"] > self.best["val_acc"]:  # ties keep the earlier epoch
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = {"epoch": row["epoch"], "val_acc": row["val_acc"], "state_dict": state}

    def fit(self) -> dict:
        c, dist = self.config, self.dist
        show = c.progress and dist.main
        self.saved_epoch = self.epoch
        epochs_bar = tqdm(total=c.epochs, initial=self.epoch, desc="epochs", disable=not show, file=sys.stderr)
        try:
            while self.epoch < c.epochs:
                start = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                with tqdm(total=self._batches_per_epoch, desc=f"epoch {self.epoch + 1}", leave=False, disable=not show,
                          file=sys.stderr) as bar:
                    stats = self._train_epoch(bar if show else None)
                self.epoch += 1
                self.scheduler.step()
                row = {"epoch": self.epoch, **stats, "val_acc": self._accuracy("val"),
                       "test_acc": self._accuracy("test"), **_model_facts(self.model, self.seq_len),
                       "lr": lr, "seconds": time.perf_counter() - start}
                self.rows.append(row)
                self._select(row)
                if dist.main:
                    runs.write_metrics(self.run_dir, self.rows)
                    runs.save_checkpoint(self.run_dir, self._checkpoint())
                self.saved_epoch = self.epoch
                epochs_bar.update(1)
                if show:
                    epochs_bar.write(_epoch_line(row, c.epochs), file=sys.stderr)
            epochs_bar.close()
            return self._finish()
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"interrupted; the checkpoint in {self.run_dir} holds epoch {self.saved_epoch} of {c.epochs}; "
                f"continue with: str-rnn train --resume {self.run_dir}") from None
        finally:
            epochs_bar.close()

    def _finish(self) -> dict:
        c = self.config
        final = self.rows[-1]
        if c.select == "last":
            selected = final
            best_model = self.model
        elif self.best is not None:
            selected = self.rows[self.best["epoch"] - 1]
            best_model = build_model(c, self.input_size, len(self.classes))
            best_model.load_state_dict(self.best["state_dict"])
        else:
            selected, best_model = None, None
        row = {k: _flat_value(v) for k, v in c.flat().items()}
        row.update(run_dir=str(self.run_dir), status="finished", world_size=self.dist.world,
                   input_size=self.input_size, num_classes=len(self.classes), seq_len=self.seq_len,
                   epochs_done=self.epoch, skipped_steps=sum(r["skipped_steps"] for r in self.rows),
                   seconds=sum(r["seconds"] for r in self.rows))
        for prefix, r in (("final", final), ("selected", selected)):
            keys = ("epoch", "train_loss", "train_acc", "val_acc", "test_acc", "params", "bytes", "flops")
            row.update({f"{prefix}_{k}": (r[k] if r else None) for k in keys})
            sums = _rank_sums(r) if r else {"rank_w_total": None, "rank_u_total": None}
            row.update({f"{prefix}_{k}": v for k, v in sums.items()})
            for name, v in (r["ranks"].items() if r else ()):
                row[f"{prefix}_rank:{name}"] = v
        for name, m in matrices(self.model).items():
            row[f"max_rank:{name}"] = m.max_rank
        for name, v in final["thresholds"].items():
            row[f"final_threshold:{name}"] = v
        if self.dist.main:
            self._write_models(final, selected, best_model)
            runs.write_result(self.run_dir, row)  # last: its presence marks the run finished
            if self.model.rnn.layers[0].W.rank == 0:
                # too fast a pruning can take every direction of W: the accuracy then shows
                # chance, but not why
                warnings.warn(f"{self.run_dir}: the first layer's input matrix W was pruned to rank 0, so the "
                              f"model ignores its input; prune more slowly (more --prune-epochs, a smaller "
                              f"--spectrum-decay)", stacklevel=4)  # at the caller of train()
        return row

    def _write_models(self, final: dict, selected: dict | None, best_model) -> None:
        c = self.config
        base = {"config": c.to_dict(), "seed": c.seed, "task": c.task, "classes": self.classes,
                "seq_len": self.seq_len, "select": c.select}
        save(self.model, self.run_dir / "final", {**base, "epoch": final["epoch"], "metrics": final,
                                                   "ranks": final["ranks"]})
        if best_model is not None:
            save(best_model, self.run_dir / "best", {**base, "epoch": selected["epoch"], "metrics": selected,
                                                      "ranks": selected["ranks"]})
        small = compact(self.model).cpu()
        save(small, self.run_dir / "compact", {
            **base, "epoch": final["epoch"], "metrics": final, "ranks": final["ranks"], "compacted": True,
            "params": count_params(small), "bytes": model_size_bytes(small),
            "normalisation": {"mean": small.mean.tolist(), "std": small.std.tolist()}})


def _epoch_line(row: dict, epochs: int) -> str:
    r = _rank_sums(row)
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%  "
            f"val {row['val_acc']:.2f}%  test {row['test_acc']:.2f}%  ranks W {r['rank_w_total']} "
            f"U {r['rank_u_total']}  params {row['params']:,}  lr {row['lr']:.2g}"
            + (f"  skipped {row['skipped_steps']}" if row["skipped_steps"] else ""))


def train(config: TrainConfig, run_dir, *, resume: bool = False, datasets: dict | None = None) -> dict:
    """Train the model ``config`` describes and write the run directory ``run_dir``.

    Args:
        config: the run's configuration. With ``resume=True`` it may be ``None`` (use the
            saved one) or differ from the saved one only in fields that do not change the
            numbers (:data:`str_rnn.config.RESUMABLE_CHANGES`).
        run_dir: where the run's files go (must not exist or be empty unless resuming).
        resume: continue the run in ``run_dir`` from its checkpoint; the result equals an
            uninterrupted run's.
        datasets: ``{"train", "val", "test"}`` torch Datasets to use instead of
            :func:`load_splits` (items ``(x [T, F], y)``, a ``.classes`` list).

    Returns:
        the flat result row also written to ``run_dir/result.json``.

    Raises:
        ValueError: an invalid config (named field), a non-empty ``run_dir`` without
            ``resume``, a finished or incompatible run with ``resume``. Nothing is written.
        FileNotFoundError: missing data, or ``run_dir`` is not a run directory (resume).
        NonFiniteError: a NaN/inf step with ``on_nonfinite=stop`` (the checkpoint of the
            last finished epoch is kept).
        TrainingInterrupted: Ctrl-C (resumable from the last finished epoch).
    """
    run_dir = Path(run_dir)
    if resume:
        config = runs.check_resumable(run_dir, config)
        # killed before its first checkpoint: nothing to continue, start afresh in place
        resume = (run_dir / runs.CHECKPOINT).is_file()
    else:
        config = config.resolved()
        runs.check_new_run_dir(run_dir)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    # After the checks above on every process: init_process_group waits for all ranks, so
    # rank 0 cannot create the run directory before another rank has checked it is new.
    dist = _Dist(config.device)
    try:
        return _Trainer(config, run_dir, dist, datasets, resume).fit()
    finally:
        dist.close()
        torch.set_num_threads(threads)
