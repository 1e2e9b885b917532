"""Save and rebuild models as ``state_dict`` + a JSON description of their shapes.

``save(model, folder, meta=None)`` writes ``model.pt`` (the state_dict) and ``meta.json``
(``{"spec": model.spec(), ...meta}``). ``load(folder)`` rebuilds the module from the spec
alone and loads the weights with ``weights_only=True``, so a user who never saw the
original code path (e.g. the uncompacted model) gets the same outputs.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from . import cells as _cells
from . import lowrank as _lowrank
from .models import SequenceClassifier
from .rnn import RNN

SPEC_VERSION = 1


def build(spec: dict):
    """Rebuild an (untrained) module of the right shapes from its ``spec()``."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"spec: expected a dict with a 'type' key, got {spec!r:.80}")
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Dense":
        return _lowrank.Dense(**args)
    if kind == "FixedRank":
        return _lowrank.FixedRank(**args)
    if kind == "LowRankSTR":
        return _lowrank.LowRankSTR(**args)
    if kind == "SparseSTR":
        return _lowrank.SparseSTR(**args)
    if kind == "FixedSparse":
        return _lowrank.FixedSparse(**args)
    if kind in ("FastGRNNCell", "FastRNNCell", "LSTMCell", "GRUCell"):
        cls = getattr(_cells, kind)
        return cls(args["input_size"], args["hidden_size"], W=build(args["W"]), U=build(args["U"]))
    if kind == "RNN":
        return RNN.from_cells([build(c) for c in args["layers"]], batch_first=args["batch_first"])
    if kind == "SequenceClassifier":
        return SequenceClassifier(build(args["rnn"]), args["num_classes"])
    raise ValueError(f"spec type {kind!r} is unknown; expected a str_rnn module type")


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        # mkstemp creates 0600 files; give the result the usual permissions (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def save(model, folder, meta: dict | None = None) -> Path:
    """Write ``folder/model.pt`` (state_dict) and ``folder/meta.json`` (spec + ``meta``)."""
    if not hasattr(model, "spec"):
        raise TypeError(f"save: {type(model).__name__} is not a str_rnn module (it has no spec())")
    folder = Path(folder)
    atomic_write_bytes(folder / "model.pt", lambda f: torch.save(model.state_dict(), f))
    atomic_write_json(folder / "meta.json", {**(meta or {}), "spec": model.spec(), "spec_version": SPEC_VERSION})
    return folder


def load(folder, map_location="cpu"):
    """Rebuild the model saved by :func:`save` in ``folder``.

    Raises:
        FileNotFoundError: ``folder`` lacks ``model.pt`` or ``meta.json``.
    """
    folder = Path(folder)
    for name in ("meta.json", "model.pt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: expected a folder written by str_rnn.save")
    meta = json.loads((folder / "meta.json").read_text())
    model = build(meta["spec"])
    model.load_state_dict(torch.load(folder / "model.pt", map_location=map_location, weights_only=True))
    return model
