"""The training engine: resume, non-finite steps, decoupled decay, selection, DDP, files.

Every run trains a tiny FastGRNN on a tiny in-memory two-class dataset (seconds), passed
through ``train(..., datasets=...)``.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch

import str_rnn
from str_rnn import runs
from str_rnn import train as engine
from str_rnn.accounting import count_params
from str_rnn.config import TrainConfig
from str_rnn.train import NonFiniteError, TrainingInterrupted, train

# Several tests prune these tiny models as far as they go; their warning that W reached
# rank 0 is tested once, in test_a_model_whose_input_matrix_is_pruned_away_is_reported.
pytestmark = pytest.mark.filterwarnings("ignore:.*ignores its input:UserWarning")


class Tiny(torch.utils.data.Dataset):
    """``n`` sequences ``[steps, 3]`` whose class shifts the mean of the first feature."""

    classes = ["low", "high"]

    def __init__(self, n: int, seed: int, steps: int = 12):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, steps, 3, generator=g) + 3
        self.x[:, :, 0] += 2 * self.y.view(-1, 1)
        self.targets = self.y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Faulty(Tiny):
    """A :class:`Tiny` that misbehaves once ``armed``, after ``after`` item reads.

    ``fault="nan"``: item 0 comes back with a NaN (every read past ``after``);
    ``fault="interrupt"``: the read number ``after`` raises ``KeyboardInterrupt``.
    """

    def __init__(self, n, seed, *, fault: str, after: int):
        super().__init__(n, seed)
        self.fault, self.after, self.reads, self.armed = fault, after, 0, False

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        if self.armed:
            self.reads += 1
            if self.fault == "interrupt" and self.reads == self.after:
                raise KeyboardInterrupt
            if self.fault == "nan" and self.reads > self.after and i == 0:
                x = x.clone()
                x[0, 0] = float("nan")
        return x, y


def tiny_splits(n_train=60, train_cls=Tiny, **kw) -> dict:
    return {"train": train_cls(n_train, 0, **kw), "val": Tiny(30, 1), "test": Tiny(30, 2)}


def tiny_config(**changes) -> TrainConfig:
    base = dict(hidden_size=6, epochs=3, batch_size=10, progress=False, threads=1, device="cpu")
    return TrainConfig().replace(**{**base, **changes})


@pytest.fixture
def arm_faults(monkeypatch):
    """Statistics straight from the tensors, then arm any Faulty train split (reads count from here)."""

    def stats(ds):
        if isinstance(ds, Faulty):
            ds.armed = True
        flat = ds.x.reshape(-1, ds.x.shape[-1])
        return flat.mean(0), flat.std(0), ds.x.shape[1]

    monkeypatch.setattr(engine, "split_statistics", stats)


def strip_times(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def state(path):
    return torch.load(Path(path) / "model.pt", weights_only=True)


# -- files, config ------------------------------------------------------------------------

def test_run_directory_contents(tmp_path):
    row = train(tiny_config(epochs=2, select="best-val"), tmp_path / "run", datasets=tiny_splits())
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "result.json", "best/model.pt",
                 "final/meta.json", "compact/meta.json"):
        assert (run / name).is_file(), name
    assert TrainConfig.from_json(run / "config.json") == tiny_config(epochs=2, select="best-val").resolved()
    rows = runs.read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "val_acc", "test_acc", "ranks", "thresholds", "params", "bytes",
                "flops", "lr", "skipped_steps", "seconds"):
        assert key in rows[0], key
    assert rows[0]["ranks"] == {"rnn.layers.0.W": 3, "rnn.layers.0.U": 6}
    assert json.loads((run / "result.json").read_text()) == row
    assert row["final_test_acc"] == rows[-1]["test_acc"]
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    assert row["selected_epoch"] == best["epoch"] and row["selected_test_acc"] == best["test_acc"]
    meta = json.loads((run / "compact" / "meta.json").read_text())
    assert meta["normalisation"]["mean"] == pytest.approx(state(run / "final")["mean"].tolist())
    # the checkpoint loads with weights_only=True and holds the resume state
    ck = runs.load_checkpoint(run)
    assert ck["epoch"] == 2 and set(ck) >= {"model", "optimizer", "scheduler", "rng", "rows", "best"}


def test_compacted_model_scores_like_the_model(tmp_path):
    splits = tiny_splits()
    train(tiny_config(epochs=2, spectrum_decay=3.0, spectrum_penalty="l1"), tmp_path / "r", datasets=splits)
    model, small = str_rnn.load(tmp_path / "r" / "final"), str_rnn.load(tmp_path / "r" / "compact")
    assert str_rnn.count_params(small) == str_rnn.count_params(model)
    for split in ("val", "test"):
        assert engine.evaluate(small, splits[split]) == engine.evaluate(model, splits[split])
    x = splits["test"].x
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_fixed_rank_trains_without_a_recurrent_matrix(tmp_path):
    """``rank_u=0``: the (r, 0) allocation learned rank reaches on small budgets, as a
    fixed-rank baseline. U costs nothing, stays zero, and the saved models score alike."""
    splits = tiny_splits()
    rows = {}
    for rank_u in (0, 1):
        rows[rank_u] = train(tiny_config(epochs=2, mode="fixed", rank_w=2, rank_u=rank_u),
                             tmp_path / f"u{rank_u}", datasets=splits)
    assert (rows[0]["final_rank_w_total"], rows[0]["final_rank_u_total"]) == (2, 0)
    hidden = 6  # tiny_config's FastGRNN: U is hidden x hidden, one rank of it costs 2 * hidden
    assert rows[1]["final_params"] - rows[0]["final_params"] == 2 * hidden
    model, small = str_rnn.load(tmp_path / "u0" / "final"), str_rnn.load(tmp_path / "u0" / "compact")
    u = model.rnn.layers[0].U
    assert u.rank == 0 and sum(p.numel() for p in u.parameters()) == 0 and not u.weight.any()
    x = splits["test"].x
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert engine.evaluate(model, splits["test"]) == rows[0]["final_test_acc"]


@pytest.mark.parametrize("changes, message", [
    ({"mode": "fixed", "rank_w": 0, "rank_u": 2}, "rank_w=0: expected a positive integer"),
    ({"mode": "str", "rank_u": 0}, r"rank_u=0: expected a positive integer \(0 only with mode=fixed\)"),
])
def test_config_allows_rank_zero_only_for_a_fixed_u(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes).resolved()
    assert tiny_config(mode="fixed", rank_w=2, rank_u=0).resolved().rank_u == 0


def test_fresh_run_refuses_a_used_directory_and_bad_ranks_write_nothing(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ValueError, match="already exists"):
        train(tiny_config(), tmp_path / "used", datasets=tiny_splits())
    with pytest.raises(ValueError, match="rank"):
        train(tiny_config(mode="fixed", rank_w=4, rank_u=2), tmp_path / "bad", datasets=tiny_splits())
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("bad, message", [
    ({"colour": 1}, "'colour' is unknown"),
    ({"lr": "fast"}, "'lr': expected a number"),
    ({"model": {"lr": 0.1}}, "'model.lr' is unknown"),
    ({"epochs": 2.5}, "'epochs': expected an integer"),
    ({"cell": "rnn"}, "'cell': 'rnn' is not one of"),
    ({"progress": "yes"}, "'progress': expected true or false"),
])
def test_config_rejects_unknown_keys_and_wrong_types(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(bad)


def test_config_round_trips_and_resolves_task_defaults():
    c = TrainConfig().replace(task="kws12", epochs=30, spectrum_decay=0.5)
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert TrainConfig.from_dict(c.flat()) == c
    r = c.resolved()
    assert (r.hidden_size, r.lr_steps, r.threshold_decay, r.lr_factors) == (100, [20], 0.5, 1.0)
    assert (TrainConfig().resolved().hidden_size, TrainConfig().resolved().lr_factors) == (80, 0.1)
    assert TrainConfig().replace(task="fsdd").resolved().lr_factors == 1.0
    assert c.replace(lr_factors=0.1).resolved().lr_factors == 0.1  # given: kept
    with pytest.raises(ValueError, match="mode=fixed needs rank_w"):
        TrainConfig().replace(mode="fixed").resolved()
    with pytest.raises(ValueError, match="select=budget needs"):
        TrainConfig().replace(select="budget").resolved()


# -- resume ---------------------------------------------------------------------------------

def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, arm_faults):
    cfg = tiny_config(epochs=3, lr_steps=[2], select="best-val", reorth_every=4, spectrum_decay=0.5,
                      threshold_target=2.0)
    straight = train(cfg, tmp_path / "a", datasets=tiny_splits())

    # Ctrl-C in the middle of epoch 3 (60 items per epoch)
    splits = tiny_splits(train_cls=Faulty, fault="interrupt", after=2 * 60 + 25)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cfg, tmp_path / "b", datasets=splits)
    assert runs.load_checkpoint(tmp_path / "b")["epoch"] == 2
    assert len(runs.read_metrics(tmp_path / "b")) == 2 and not runs.is_finished(tmp_path / "b")

    resumed = train(cfg, tmp_path / "b", resume=True, datasets=tiny_splits())
    assert strip_times(runs.read_metrics(tmp_path / "b")) == strip_times(runs.read_metrics(tmp_path / "a"))
    for folder in ("final", "best", "compact"):
        a, b = state(tmp_path / "a" / folder), state(tmp_path / "b" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    drop = ("run_dir", "seconds")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in straight.items() if k not in drop}


def test_resume_before_the_first_checkpoint_starts_afresh(tmp_path, arm_faults):
    cfg = tiny_config(epochs=1)
    straight = train(cfg, tmp_path / "a", datasets=tiny_splits())
    with pytest.raises(TrainingInterrupted, match="holds epoch 0 of 1"):
        train(cfg, tmp_path / "b", datasets=tiny_splits(train_cls=Faulty, fault="interrupt", after=10))
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    resumed = train(cfg, tmp_path / "b", resume=True, datasets=tiny_splits())
    assert resumed["final_train_loss"] == straight["final_train_loss"]


def test_resume_refuses_finished_incompatible_and_non_runs(tmp_path, arm_faults):
    cfg = tiny_config(epochs=2)
    train(cfg, tmp_path / "done", datasets=tiny_splits())
    with pytest.raises(ValueError, match="finished"):
        train(cfg, tmp_path / "done", resume=True, datasets=tiny_splits())
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "cut", datasets=tiny_splits(train_cls=Faulty, fault="interrupt", after=70))
    with pytest.raises(ValueError, match=r"lr=0\.5 \(run has 0\.01\)"):
        train(cfg.replace(lr=0.5), tmp_path / "cut", resume=True, datasets=tiny_splits())
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        train(cfg, tmp_path, resume=True, datasets=tiny_splits())
    # progress / threads may change on resume
    train(cfg.replace(progress=True), tmp_path / "cut", resume=True, datasets=tiny_splits())
    assert runs.is_finished(tmp_path / "cut")


def test_deterministic_for_a_seed(tmp_path):
    a = train(tiny_config(epochs=1), tmp_path / "a", datasets=tiny_splits())
    b = train(tiny_config(epochs=1), tmp_path / "b", datasets=tiny_splits())
    c = train(tiny_config(epochs=1, seed=1), tmp_path / "c", datasets=tiny_splits())
    assert a["final_train_loss"] == b["final_train_loss"] != c["final_train_loss"]


# -- non-finite steps -----------------------------------------------------------------------

def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path, arm_faults):
    splits = tiny_splits(train_cls=Faulty, fault="nan", after=60)  # NaN from epoch 2 on
    with pytest.raises(NonFiniteError, match=r"epoch 2.*checkpoint.*\(epoch 1\)"):
        train(tiny_config(), tmp_path / "r", datasets=splits)
    ck = runs.load_checkpoint(tmp_path / "r")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert len(runs.read_metrics(tmp_path / "r")) == 1 and not runs.is_finished(tmp_path / "r")


def test_nonfinite_skip_counts_and_logs_the_steps(tmp_path, arm_faults):
    splits = tiny_splits(train_cls=Faulty, fault="nan", after=60)
    row = train(tiny_config(on_nonfinite="skip"), tmp_path / "r", datasets=splits)
    assert [r["skipped_steps"] for r in runs.read_metrics(tmp_path / "r")] == [0, 1, 1]
    assert row["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in state(tmp_path / "r" / "final").values())


def test_grad_norm_survives_float32_overflow():
    # float32 squares overflow past ~1.8e19: torch's clip_grad_norm_ then returns inf and
    # scales every gradient to 0; the engine's norm is accumulated in float64
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 1e20)
    assert engine.grad_norm([p]) == pytest.approx(2e20)
    p.grad[0] = float("inf")
    assert engine.grad_norm([p]) == math.inf


# -- decay ----------------------------------------------------------------------------------

def test_decay_is_decoupled_and_acts_as_lambda_says():
    cfg = tiny_config(spectrum_decay=0.5, weight_decay=0.1, threshold_target=2.0).resolved()
    model = engine.build_model(cfg, 3, 2)
    opt = engine.make_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"weights", "factors", "spectra", "thresholds"}
    assert groups["factors"]["lr"] == pytest.approx(cfg.lr * cfg.lr_factors)
    assert all(g["weight_decay"] == 0 for g in opt.param_groups)  # nothing inside Adam
    w = model.rnn.layers[0].W
    before = {n: p.detach().clone() for n, p in (("sigma", w.sigma), ("s", w.threshold.s), ("A", w.A),
                                                 ("bias", model.head.bias))}
    engine.apply_decay(opt, cfg)
    lr = cfg.lr
    torch.testing.assert_close(w.sigma, before["sigma"] * (1 - lr * 0.5))
    torch.testing.assert_close(w.threshold.s, before["s"] - lr * 0.5 * (before["s"] - 2.0))
    torch.testing.assert_close(w.A, before["A"] * (1 - lr * cfg.lr_factors * 0.1))
    torch.testing.assert_close(model.head.bias, before["bias"] * (1 - lr * 0.1))
    l1 = cfg.replace(spectrum_penalty="l1")
    engine.apply_decay(engine.make_optimizer(model, l1), l1)
    assert (w.sigma.abs() < before["sigma"].abs()).all()


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_spectrum_decay_lowers_the_rank_and_zero_keeps_it_full(tmp_path, penalty):
    rows = [train(tiny_config(epochs=2, hidden_size=12, spectrum_decay=lam, spectrum_penalty=penalty),
                  tmp_path / str(lam), datasets=tiny_splits()) for lam in (0.0, 5.0, 15.0)]
    full, weak, strong = rows
    assert (full["final_rank_w_total"], full["final_rank_u_total"]) == (3, 12)
    assert strong["final_rank_u_total"] < 12 and strong["final_params"] < full["final_params"]
    assert full["final_rank_u_total"] >= weak["final_rank_u_total"] >= strong["final_rank_u_total"]
    # decay on s raises the threshold, further for a larger lambda (it is not divided by Adam's scale)
    u = "final_threshold:rnn.layers.0.U.threshold"
    assert full[u] < 1e-4 < weak[u] < strong[u] < 1


def test_a_model_whose_input_matrix_is_pruned_away_is_reported(tmp_path, recwarn):
    train(tiny_config(epochs=1, spectrum_penalty="l1", spectrum_decay=1.0), tmp_path / "kept", datasets=tiny_splits())
    assert not [w for w in recwarn if "ignores its input" in str(w.message)]
    with pytest.warns(UserWarning, match="input matrix W was pruned to rank 0, so the model ignores its input"):
        row = train(tiny_config(epochs=2, spectrum_penalty="l1", spectrum_decay=50.0), tmp_path / "gone",
                    datasets=tiny_splits())
    assert row["final_rank_w_total"] == 0


def test_prune_epochs_freezes_thresholds_and_stops_decay(tmp_path):
    cfg = tiny_config(epochs=4, hidden_size=12, spectrum_decay=15.0, prune_epochs=2)
    train(cfg, tmp_path / "run", datasets=tiny_splits())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    u = "rnn.layers.0.U.threshold"
    # decay raised the threshold while pruning ...
    assert rows[1]["thresholds"][u] > rows[0]["thresholds"][u] > 1e-4
    # ... after prune_epochs it is frozen, and no rank comes back
    assert rows[3]["thresholds"][u] == rows[2]["thresholds"][u] == rows[1]["thresholds"][u]
    for name in rows[1]["ranks"]:
        assert rows[3]["ranks"][name] <= rows[1]["ranks"][name]


def test_scheduled_params_falls_cubically_from_start_to_target():
    start, target = 1000, 100
    assert engine.scheduled_params(start, target, 0.0) == start
    ramp = engine.PRUNE_RAMP
    assert engine.scheduled_params(start, target, ramp) == target == engine.scheduled_params(start, target, 1.0)
    # half-way along the ramp, (1/2)^3 of the distance is left
    assert engine.scheduled_params(start, target, ramp / 2) == pytest.approx(target + (start - target) / 8)
    values = [engine.scheduled_params(start, target, p / 20) for p in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_target_params_stops_pruning_at_the_target(tmp_path):
    """Decay acts only while the model is above the schedule: the same lambda that prunes
    everything without a target stops at the target (under it by at most what the last
    decay step took) and holds it through fine-tuning."""
    base = dict(epochs=5, hidden_size=24, spectrum_penalty="l1", spectrum_decay=5.0, prune_epochs=4)
    free = train(tiny_config(**base), tmp_path / "free", datasets=tiny_splits())
    target = 600
    row = train(tiny_config(**base, target_params=target), tmp_path / "target", datasets=tiny_splits())
    rows, free_rows = runs.read_metrics(tmp_path / "target"), runs.read_metrics(tmp_path / "free")
    assert free["final_rank_u_total"] == 0 and free["final_params"] < 200
    assert rows[0]["params"] > target >= row["final_params"] > free["final_params"]
    assert row["final_rank_u_total"] > 0
    # no decay once the target is held, nor while fine-tuning; the ranks stay
    assert rows[-2]["pruning_steps"] == rows[-1]["pruning_steps"] == 0
    assert rows[-1]["ranks"] == rows[-2]["ranks"]
    assert sum(r["pruning_steps"] for r in rows) < sum(r["pruning_steps"] for r in free_rows)


def test_limit_pruning_prunes_smallest_margins_first_down_to_the_floor():
    """Four directions of U die on one simulated step: with the floor one direction under
    the model's size only the smallest-margin one stays pruned and the other three get
    their old margin back over the new threshold; with a low floor all four stay pruned."""
    cfg = tiny_config(hidden_size=24).resolved()
    for floor_directions, expect_kept in ((1, 3), (100, 0)):
        torch.manual_seed(0)
        model = engine.build_model(cfg, 3, 2)
        u = model.rnn.layers[0].U
        cost = u.in_features + u.out_features
        with torch.no_grad():
            u.threshold.s.fill_(math.log(0.05))
            u.sigma.zero_()  # rank 8 of 24: each direction costs out + in
            u.sigma[:8] = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.4, 0.3, 0.2, 0.1])
        size = count_params(model)
        before = engine.spectra_snapshot(model)
        with torch.no_grad():
            u.sigma[4:8] = -0.01  # the last four fall under the threshold at once
            u.threshold.s.fill_(math.log(0.06))  # and the threshold moved
        floor = max(0, size - floor_directions * cost)
        kept = engine.limit_pruning(model, before, floor)
        assert kept == expect_kept
        assert count_params(model) == size - (4 - kept) * cost
        if kept:
            assert u.gains()[7] == 0  # smallest margin: pruned
            torch.testing.assert_close(u.sigma[4:7].detach(), torch.tensor([0.4, 0.3, 0.2]) - 0.05 + 0.06)
        assert u.rank == 8 - (4 - kept)


def test_exact_target_lands_within_one_direction_of_the_target(tmp_path):
    """A decay strong enough to prune every direction in one step: the plain schedule
    overshoots the target by many directions, exact_target lands at most one under."""
    base = dict(epochs=3, hidden_size=24, spectrum_penalty="l1", spectrum_decay=60.0, prune_epochs=2,
                target_params=500)  # from 748
    loose = train(tiny_config(**base), tmp_path / "loose", datasets=tiny_splits())
    exact = train(tiny_config(**base, exact_target=True), tmp_path / "exact", datasets=tiny_splits())
    direction = 24 + 24  # a direction of U (24 x 24) costs out + in
    assert loose["final_params"] < 500 - 2 * direction
    assert 500 - direction <= exact["final_params"] <= 500
    assert sum(r["pruning_undone"] for r in runs.read_metrics(tmp_path / "exact")) > 0
    assert all(r["pruning_undone"] == 0 for r in runs.read_metrics(tmp_path / "loose"))


def test_exact_target_needs_target_params():
    with pytest.raises(ValueError, match="exact_target=true .* needs target_params"):
        tiny_config(exact_target=True).resolved()


@pytest.mark.parametrize("changes, message", [
    ({"mode": "fixed", "rank_w": 2, "rank_u": 2}, "needs mode str"),
    ({"prune_epochs": 0}, "needs prune_epochs >= 1"),
    ({"spectrum_decay": 0.0}, "needs spectrum_decay > 0"),
    ({"target_params": 0}, "target_params=0: expected a positive integer"),
])
def test_target_params_rejects_settings_it_cannot_use(changes, message):
    cfg = tiny_config(spectrum_decay=1.0, prune_epochs=2, target_params=100).replace(**changes)
    with pytest.raises(ValueError, match=message):
        cfg.resolved()


@pytest.mark.parametrize("task, decay, prune_epochs", [("har2", 2.0, 100), ("fsdd", 4.0, 150), ("kws12", 1.0, 60)])
def test_target_params_takes_the_tasks_pruning_recipe_where_not_given(task, decay, prune_epochs):
    """l1, the task's λ and its share of the epochs (300 here); what the user gives is kept,
    and without target_params nothing prunes (λ 0, l2, decay all run)."""
    cfg = TrainConfig().replace(task=task, epochs=300, target_params=2000).resolved()
    assert (cfg.spectrum_penalty, cfg.spectrum_decay, cfg.threshold_decay, cfg.prune_epochs) == (
        "l1", decay, decay, prune_epochs)
    given = TrainConfig().replace(task=task, target_params=2000, spectrum_penalty="l2", spectrum_decay=0.5,
                                  prune_epochs=7).resolved()
    assert (given.spectrum_penalty, given.spectrum_decay, given.prune_epochs) == ("l2", 0.5, 7)
    plain = TrainConfig().replace(task=task).resolved()
    assert (plain.spectrum_penalty, plain.spectrum_decay, plain.threshold_decay, plain.prune_epochs) == (
        "l2", 0.0, 0.0, None)


def test_hold_pruned_stops_momentum_reviving_a_pruned_direction():
    """A σ entry pushed to 0 keeps Adam's momentum: without hold_pruned the next steps move
    it (and could lift it over the threshold); with it, it stays where it is."""
    cfg = tiny_config().resolved()
    moved = {}
    for hold in (False, True):
        torch.manual_seed(0)
        model = engine.build_model(cfg, 3, 2)
        opt = engine.make_optimizer(model, cfg)
        u = model.rnn.layers[0].U
        x = torch.randn(4, 5, 3)
        for _ in range(3):  # build up momentum on every σ entry
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        with torch.no_grad():
            u.sigma[0] = 0.0  # pruned: gain 0, so no gradient from here on
        opt.zero_grad()
        model(x).sum().backward()
        assert u.sigma.grad[0] == 0
        if hold:
            engine.hold_pruned(model, opt)
        opt.step()
        moved[hold] = float(u.sigma.detach()[0].abs())
    assert moved[False] > 1e-4 and moved[True] == 0


@pytest.mark.parametrize("mode", ["str", "fixed", "dense"])
def test_cap_recurrent_norm_projects_only_the_matrices_above_the_cap(mode):
    ranks = dict(rank_w=2, rank_u=3) if mode == "fixed" else {}
    cfg = tiny_config(mode=mode, hidden_size=8, num_layers=2, **ranks).resolved()
    torch.manual_seed(0)
    model = engine.build_model(cfg, 3, 2)
    us = engine.recurrent_matrices(model)
    assert len(us) == 2
    with torch.no_grad():
        us[0].scale_(5.0 / us[0].spectral_norm())  # above the cap: projected onto it
        us[1].scale_(1.0 / us[1].spectral_norm())  # under it: untouched
    w0 = model.rnn.layers[0].W.weight.detach().clone()
    u0, u1 = (u.weight.detach().clone() for u in us)
    assert engine.recurrent_norm(model) == pytest.approx(5.0)
    assert engine.cap_recurrent_norm(model, 2.0) == 1
    assert us[0].spectral_norm() == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(us[0].weight.detach(), u0 * 0.4)
    assert torch.equal(us[1].weight.detach(), u1)
    assert torch.equal(model.rnn.layers[0].W.weight.detach(), w0)  # W is not recurrent
    assert engine.cap_recurrent_norm(model, 2.0) == 0


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_recurrent_norm_cap_rejects_a_negative_or_nan_cap(value):
    with pytest.raises(ValueError, match=f"recurrent_norm_cap={value!r}: expected a non-negative number"):
        tiny_config(recurrent_norm_cap=value).resolved()


def test_nan_decay_is_rejected():
    with pytest.raises(ValueError, match="weight_decay=nan: expected a non-negative number"):
        tiny_config(weight_decay=float("nan")).resolved()


def test_recurrent_norm_cap_bounds_training(tmp_path):
    """Without the cap, a high learning rate drives ||U||_2 above 0.5 within two epochs;
    with it, every step ends projected back and the metrics say so."""
    base = dict(epochs=2, hidden_size=8, lr=0.05, lr_factors=1.0)
    train(tiny_config(**base), tmp_path / "free", datasets=tiny_splits())
    train(tiny_config(**base, recurrent_norm_cap=0.5), tmp_path / "cap", datasets=tiny_splits())
    free, capped = runs.read_metrics(tmp_path / "free"), runs.read_metrics(tmp_path / "cap")
    assert max(r["recurrent_norm"] for r in free) > 0.5
    assert all(r["recurrent_norm"] <= 0.5 * (1 + 1e-5) for r in capped)
    assert capped[0]["capped_steps"] > 0 and free[0]["capped_steps"] == 0


def test_reorthogonalize_keeps_the_model_and_resets_optimiser_state():
    cfg = tiny_config().resolved()
    model = engine.build_model(cfg, 3, 2)
    opt = engine.make_optimizer(model, cfg)
    x = torch.randn(4, 5, 3)
    model(x).sum().backward()
    opt.step()
    before = model(x).detach()
    assert engine.reorthogonalize(model, opt) == 2
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    w = model.rnn.layers[0].W
    assert w.A not in opt.state and w.sigma not in opt.state and w.threshold.s in opt.state


# -- selection ----------------------------------------------------------------------------------

def test_budget_selection_uses_validation_within_the_budget(tmp_path):
    cfg = tiny_config(epochs=3, spectrum_decay=4.0, spectrum_penalty="l1", select="budget")
    free = train(cfg.replace(budget_params=10**6), tmp_path / "free", datasets=tiny_splits())
    rows = runs.read_metrics(tmp_path / "free")
    assert free["selected_epoch"] == max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    smallest = min(r["params"] for r in rows)
    tight = train(cfg.replace(budget_params=smallest), tmp_path / "tight", datasets=tiny_splits())
    assert tight["selected_params"] <= smallest
    none = train(cfg.replace(budget_bytes=4), tmp_path / "none", datasets=tiny_splits())
    assert none["selected_epoch"] is None and not (tmp_path / "none" / "best").exists()


# -- distributed ----------------------------------------------------------------------------------

DDP_RUN = dict(epochs=1, batch_size=8, spectrum_decay=2.0)


def _ddp_worker(rank: int, port: int, run_dir: str, out: str) -> None:
    """One process of a 2-process group, set up through the environment as torchrun does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    row = train(tiny_config(**DDP_RUN), run_dir, datasets=tiny_splits(n_train=48))
    Path(out).write_text(json.dumps(row))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_single_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # first the single-process run: it also imports what the optimiser loads lazily (seconds)
    single = train(tiny_config(**DDP_RUN), tmp_path / "single", datasets=tiny_splits(n_train=48))
    # fork: the children inherit the imported modules (a fresh interpreter takes seconds to import torch)
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, str(tmp_path / "ddp"), str(tmp_path / f"row{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"a DDP process exited with {p.exitcode}"
    rows = [json.loads((tmp_path / f"row{r}.json").read_text()) for r in range(2)]
    thresholds = [{k: v for k, v in r.items() if k.startswith("final_threshold:")} for r in rows]
    assert thresholds[0] == thresholds[1]  # every rank holds the same thresholds
    assert rows[0]["world_size"] == 2
    a, b = state(tmp_path / "ddp" / "final"), state(tmp_path / "single" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    for key in ("final_val_acc", "final_test_acc", "final_train_acc"):
        assert rows[0][key] == single[key], key
    assert rows[0]["final_train_loss"] == pytest.approx(single["final_train_loss"], abs=1e-5)
