"""The fused time loops (str_rnn.fused) and the no-gradient loops (str_rnn.infer) against
the reference loop (plain autograd through every step): outputs, final states and the
gradient of every parameter and of the initial state, for every cell and matrix kind."""
from __future__ import annotations

import collections
import copy
import math

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from str_rnn import CELLS, RNN, compact
from str_rnn import fused as fused_mod
from str_rnn import fused_ops, jit
from str_rnn import infer as infer_mod
from str_rnn.lowrank import LowRankSTR

F, H = 8, 6
# longer than one backward chunk, so chunk boundaries are crossed
T = fused_mod.CHUNK + 5
B = 3


def _prune(m: LowRankSTR, r: int) -> None:
    """Raise the threshold so that exactly the ``r`` largest ``|σ|`` stay active."""
    with torch.no_grad():
        mags = m.sigma.abs().sort(descending=True).values.double()
        cut = float((mags[r - 1] + mags[r]) / 2) if r else 2 * float(mags[0])
        m.threshold.s.fill_(math.log(cut) if m.threshold.g == "exp" else math.log(cut / (1 - cut)))
    assert m.rank == r


def _model(cell: str, matrix: str, num_layers: int) -> RNN:
    """A float64 reference model; ``str-pruned`` has factored (two-matrix) chains;
    ``str-u0`` and ``fixed-u0`` a recurrent matrix of rank 0 (empty factors)."""
    kind = {"str-pruned": "str", "str-u0": "str", "fixed-u0": "fixed"}.get(matrix, matrix)
    kwargs = {"rank_w": 2, "rank_u": 0 if matrix == "fixed-u0" else 2} if kind == "fixed" else {}
    rnn = RNN(cell, F, H, num_layers=num_layers, matrix=kind, fused=False, **kwargs).double()
    if matrix in ("str-pruned", "str-u0"):
        for layer in rnn.layers:
            _prune(layer.W, 1)
            _prune(layer.U, 0 if matrix == "str-u0" else 1)
            # the factored path of the kernels is what is tested
            assert len(fused_ops.chain(layer.W, fused_ops.INPUT_FACTORED_MAX)) == 2
            assert len(fused_ops.chain(layer.U)) == 2
    with torch.no_grad():  # move the biases and scalars off their round initial values
        for name, p in rnn.named_parameters():
            if name.endswith(("bias_z", "bias_h", "bias", "zeta", "nu", "alpha", "beta")):
                p.add_(0.3 * torch.randn_like(p))
    return rnn


def _pair(cell, matrix, num_layers):
    ref = _model(cell, matrix, num_layers)
    fast = copy.deepcopy(ref)
    fast.fused = True
    return ref, fast


def _parts(state):
    return state if isinstance(state, tuple) else (state,)


def _run(model, x, state, lengths, loss_on):
    """Outputs, final state and every gradient of one forward/backward pass."""
    model.zero_grad(set_to_none=True)
    state = tuple(s.detach().clone().requires_grad_() for s in _parts(state))
    out, h_n = model(x, state if len(state) == 2 else state[0], lengths=lengths)
    torch.manual_seed(123)  # the same loss weights for both models
    loss = 0.0
    if loss_on in ("outputs", "both"):
        loss = loss + (out * torch.randn(out.shape, dtype=out.dtype).to(out.device)).sum()
    if loss_on in ("final", "both"):
        for s in _parts(h_n):
            loss = loss + (s * torch.randn(s.shape, dtype=s.dtype).to(s.device)).sum()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for i, s in enumerate(state):
        grads[f"state{i}"] = s.grad
    return out.detach(), tuple(s.detach() for s in _parts(h_n)), grads


def _assert_same(a, b, tol=1e-5):
    out_a, fin_a, g_a = a
    out_b, fin_b, g_b = b
    torch.testing.assert_close(out_b, out_a, atol=tol, rtol=tol)
    for p, q in zip(fin_a, fin_b, strict=True):
        torch.testing.assert_close(q, p, atol=tol, rtol=tol)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        assert g_b[name] is not None, f"{name}: no gradient on the fused path"
        assert g_a[name] is not None, f"{name}: no gradient on the reference path"
        torch.testing.assert_close(g_b[name], g_a[name], atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that ``out`` depends on."""
    names, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


def _inputs(cell, num_layers, dtype=torch.float64):
    x = torch.randn(B, T, F, dtype=dtype)
    h0 = torch.randn(num_layers, B, H, dtype=dtype)
    state = (h0, torch.randn(num_layers, B, H, dtype=dtype)) if cell == "lstm" else h0
    return x, state


def _compiled_kernels():
    """str_rnn.fused_kernels, or a skip where numba is not installed."""
    kernels = jit.load("fused_kernels")
    if kernels is None:
        pytest.skip("numba is not installed: the compiled element-wise steps are not available")
    return kernels


@pytest.fixture(params=[True, False], ids=["compiled", "torch-ops"])
def compiled(request, monkeypatch):
    """Run a test with the compiled element-wise steps (numba) and with the torch operations."""
    if request.param:
        _compiled_kernels()
    monkeypatch.setattr(fused_ops, "USE_COMPILED", request.param)
    return request.param


# -- training path: fused kernels against plain autograd ------------------------------------

@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("use_lengths", [False, True])
@pytest.mark.parametrize("matrix", ["str", "str-pruned", "str-u0", "fixed", "fixed-u0", "dense",
                                    "sparse"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_fused_outputs_and_gradients_equal_reference(cell, matrix, use_lengths, num_layers, compiled):
    ref, fast = _pair(cell, matrix, num_layers)
    x, state = _inputs(cell, num_layers)
    lengths = torch.tensor([T, 3, T - 4]) if use_lengths else None
    _assert_same(_run(ref, x, state, lengths, "both"), _run(fast, x, state, lengths, "both"))


@pytest.mark.parametrize("loss_on", ["outputs", "final"])
@pytest.mark.parametrize("use_lengths", [False, True])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradient_from_outputs_only_or_final_state_only(cell, loss_on, use_lengths, compiled):
    ref, fast = _pair(cell, "str-pruned", 2)
    x, state = _inputs(cell, 2)
    lengths = torch.tensor([5, T, 1]) if use_lengths else None
    _assert_same(_run(ref, x, state, lengths, loss_on), _run(fast, x, state, lengths, loss_on))


@pytest.mark.parametrize("steps", [1, 2, fused_mod.CHUNK, fused_mod.CHUNK + 1])
@pytest.mark.parametrize("cell", ["fastgrnn", "lstm"])
def test_short_sequences_and_chunk_boundaries(cell, steps, compiled):
    ref, fast = _pair(cell, "str", 1)
    x, state = _inputs(cell, 1)
    x = x[:, :steps]
    lengths = torch.tensor([steps, 1, max(1, steps - 1)])
    _assert_same(_run(ref, x, state, lengths, "both"), _run(fast, x, state, lengths, "both"))
    _assert_same(_run(ref, x, state, None, "final"), _run(fast, x, state, None, "final"))


@pytest.mark.parametrize("cell", list(CELLS))
def test_fused_kernels_pass_gradcheck(cell, compiled):
    """Finite differences on the fused layer alone (input projection and recurrence)."""
    rnn = _model(cell, "str-pruned", 1)
    layer = rnn.layers[0]
    x = torch.randn(5, F, 2, dtype=torch.float64, requires_grad=True)  # [T, F, B]
    h0 = torch.randn(2, H, dtype=torch.float64, requires_grad=True)
    state = (h0, torch.randn(2, H, dtype=torch.float64, requires_grad=True)) if cell == "lstm" else h0
    last = torch.tensor([4, 2])

    def f(x, *state):
        seq, final = fused_mod.fused_scan(layer, x, state if len(state) == 2 else state[0], last)
        return (seq, *_parts(final))

    assert torch.autograd.gradcheck(f, (x, *_parts(state)), eps=1e-6, atol=1e-6)


def test_fused_is_the_default_and_the_reference_loop_stays():
    x = torch.randn(B, T, F)
    fast, ref = RNN("fastgrnn", F, H), RNN("fastgrnn", F, H, fused=False)
    assert fast.fused and not ref.fused
    assert "FastGRNNScanBackward" in _graph_nodes(fast(x)[1])
    assert "FastGRNNScanBackward" not in _graph_nodes(ref(x)[1])
    with pytest.raises(ValueError, match="fused=1"):
        RNN("gru", F, H, fused=1)
    assert not RNN.from_cells(list(fast.layers), fused=False).fused


@pytest.mark.parametrize("cell", ["lstm", "fastgrnn"])
def test_backward_twice_with_retain_graph_gives_the_same_gradients(cell, compiled):
    """The backward passes must not modify what the forward pass saved."""
    rnn = RNN(cell, F, H, num_layers=2).double()
    x, _ = _inputs(cell, 2)
    out, h_n = rnn(x, lengths=torch.tensor([T, 2, 7]))
    loss = out.pow(2).sum() + sum(s.sum() for s in _parts(h_n))
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in rnn.parameters()]
    rnn.zero_grad()
    loss.backward()
    for a, p in zip(first, rnn.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_all_lengths_full_equals_no_lengths_and_packed_input():
    rnn = RNN("gru", F, H, num_layers=2)
    x = torch.randn(B, T, F)
    out, h_n = rnn(x)
    out_l, h_l = rnn(x, lengths=[T] * B)
    torch.testing.assert_close(out_l, out)
    torch.testing.assert_close(h_l, h_n)
    lengths = torch.tensor([T, 4, 9])
    packed_out, packed_h = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    ref = copy.deepcopy(rnn)
    ref.fused = False
    ref_out, ref_h = ref(x, lengths=lengths)
    padded, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=T)
    torch.testing.assert_close(padded, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed_h, ref_h, atol=1e-6, rtol=1e-6)


def test_every_parameter_gets_a_gradient_for_ddp():
    """DDP with find_unused_parameters=False needs a gradient for every parameter, and no
    parameter may change in the forward pass."""
    rnn = RNN("fastgrnn", F, H, num_layers=2)
    _prune(rnn.layers[0].U, 2)
    before = {n: p.detach().clone() for n, p in rnn.named_parameters()}
    out, h_n = rnn(torch.randn(B, T, F), lengths=torch.tensor([T, 5, 2]))
    (out.sum() + h_n.sum()).backward()
    for name, p in rnn.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.detach(), before[name]), name


_DDP_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from str_rnn import RNN
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
rnn = RNN("lstm", 5, 7)
ddp = torch.nn.parallel.DistributedDataParallel(rnn)
for _ in range(2):
    out, (h, c) = ddp(torch.randn(3, 4, 5))
    (out.sum() + h.sum()).backward()
ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in rnn.parameters())
print("OK" if ok else "MISSING-GRAD", flush=True)
# skip interpreter teardown: freeing a DDP reducer after its gloo group can block in
# ProcessGroupGloo's destructor (seen here), which is torch's business, not this test's
os._exit(0)
"""


def test_runs_under_distributed_data_parallel(tmp_path):
    """One-process gloo group: DDP wraps the layer, two steps reduce every gradient.

    Runs in a child process with a timeout, so a hang inside torch.distributed fails the
    test instead of stalling the suite.
    """
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    done = subprocess.run([sys.executable, "-c", _DDP_SCRIPT, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("OK"), done.stdout + done.stderr[-2000:]


# -- no-gradient paths ---------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, infer_mod.MAX_BATCH + 2])
@pytest.mark.parametrize("matrix", ["str-pruned", "str-u0", "fixed", "fixed-u0", "dense", "sparse"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_no_grad_forward_equals_reference(cell, matrix, batch):
    """Small batches take the NumPy loops, larger ones the fused kernels without a graph."""
    ref, fast = _pair(cell, matrix, 2)
    ref, fast = ref.float(), fast.float()
    x = torch.randn(batch, T, F)
    lengths = torch.randint(1, T + 1, (batch,))
    with torch.no_grad():
        for lens in (None, lengths):
            out_r, h_r = ref(x, lengths=lens)
            out_f, h_f = fast(x, lengths=lens)
            torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
            for p, q in zip(_parts(h_r), _parts(h_f)):
                torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_no_grad_path_is_taken_only_without_gradients():
    rnn = RNN("fastgrnn", F, H)
    x = torch.randn(1, T, F)
    assert infer_mod.needs_grad(rnn, x, [torch.zeros(1, H)])
    with torch.no_grad():
        assert not infer_mod.needs_grad(rnn, x, [torch.zeros(1, H)])
    rnn.requires_grad_(False)
    assert not infer_mod.needs_grad(rnn, x, [torch.zeros(1, H)])
    assert infer_mod.needs_grad(rnn, x.requires_grad_(), [torch.zeros(1, H)])
    out, _ = rnn(x)
    assert out.requires_grad  # the gradient w.r.t. x still flows


@pytest.mark.parametrize("cell", list(CELLS))
def test_streaming_steps_of_a_compacted_model_equal_forward(cell):
    rnn = RNN(cell, F, H, num_layers=2)
    _prune(rnn.layers[0].U, 2)
    small = compact(rnn)
    x = torch.randn(1, T, F)
    with torch.no_grad():
        out, h_n = rnn(x)
        state, outs = None, []
        for t in range(T):
            y, state = small.step(x[:, t], state)
            outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), out, atol=1e-5, rtol=1e-5)
    for p, q in zip(_parts(h_n), _parts(state)):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


# -- CUDA ----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", list(CELLS))
def test_cuda_fused_equals_reference(cell):
    ref, fast = _pair(cell, "str-pruned", 2)
    ref, fast = ref.cuda(), fast.cuda()
    x, state = _inputs(cell, 2)
    x = x.cuda()
    state = tuple(s.cuda() for s in _parts(state))
    state = state if len(state) == 2 else state[0]
    lengths = torch.tensor([T, 3, T - 4])
    a = _run(ref, x, state, lengths, "both")
    b = _run(fast, x, state, lengths, "both")
    assert b[0].device.type == "cuda"
    _assert_same(a, b)
    with torch.no_grad():  # inference on the device takes the fused kernels, not NumPy
        out, _ = fast(x[:1])
    assert out.device.type == "cuda"


def test_streaming_plan_follows_weight_changes_and_is_not_copied():
    rnn = compact(RNN("fastgrnn", F, H))
    x = torch.randn(2, F)
    with torch.no_grad():
        first, _ = rnn.step(x)
        rnn.layers[0].bias_h.data.add_(1.0)  # in place, even through .data: the plan reads the same memory
        second, _ = rnn.step(x)
        rnn.layers[0].bias_h = torch.nn.Parameter(rnn.layers[0].bias_h.detach() - 1.0)  # replaced
        third, _ = rnn.step(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(third, first)
    ref = copy.deepcopy(rnn)
    assert "_stream_cache" in rnn.__dict__ and "_stream_cache" not in ref.__dict__
    ref.fused = False
    with torch.no_grad():
        torch.testing.assert_close(ref.step(x)[0], third)


def test_dense_lstm_kernel_choice(compiled):
    """A full-rank STR LSTM runs the fused kernel where its element-wise steps run compiled;
    without them it hands torch's fused LSTM (oneDNN) its dense weights instead (same
    result). A learned low rank, and lengths, always take the fused kernel."""
    dense = RNN("lstm", F, H, num_layers=2)
    low = copy.deepcopy(dense)
    _prune(low.layers[0].U, 1)

    def kernels(model, lengths=None):
        return _graph_nodes(model(torch.randn(B, T, F), lengths=lengths)[1][0])

    assert ("LSTMScanBackward" in kernels(dense)) == compiled
    assert "LSTMScanBackward" in kernels(low)
    assert "LSTMScanBackward" in kernels(dense, lengths=torch.tensor([T, 2, 5]))  # lengths: fused
    ref = copy.deepcopy(dense)
    ref.fused = False
    x = torch.randn(B, T, F)
    for a, b in zip(dense(x)[1], ref(x)[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- the compiled element-wise steps (str_rnn.fused_kernels, numba) ----------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_sigmoid_is_accurate_saturates_and_keeps_nan(dtype):
    kernels = _compiled_kernels()
    finfo = np.finfo(dtype)
    x = np.concatenate([np.linspace(-120, 120, 48001), [0.0, -0.0, 1e-30, -1e-30]]).astype(dtype)
    out = np.empty_like(x)
    kernels.sigmoid(x, out)
    ref = torch.sigmoid(torch.from_numpy(x).double()).numpy()
    normal = ref >= finfo.tiny
    # within 2 units in the last place wherever the result is a normal number
    assert np.all(np.abs(out[normal] - ref[normal]) <= 2 * finfo.eps * ref[normal])
    # below: saturated at about the smallest normal number instead of an underflow
    assert np.all(out[~normal] <= 2 * finfo.tiny) and np.all(out[~normal] > 0)
    special = np.array([np.inf, -np.inf, np.nan, 1e6, -1e6], dtype=dtype)
    out = np.empty_like(special)
    kernels.sigmoid(special, out)
    assert out[0] == 1 and out[3] == 1 and 0 < out[1] <= 2 * finfo.tiny and 0 < out[4] <= 2 * finfo.tiny
    assert np.isnan(out[2])


@pytest.mark.parametrize("cell", ["fastgrnn", "lstm"])
def test_compiled_steps_run_for_float32_and_match_the_reference(cell, monkeypatch):
    """float32 training takes the compiled steps (once per time step, forward and
    backward) and agrees with the float32 reference loop."""
    kernels = _compiled_kernels()
    calls = collections.Counter()
    names = {"fastgrnn": ("fastgrnn_forward", "fastgrnn_backward", "fastgrnn_carry_backward", "fastgrnn_carry"),
             "lstm": ("lstm_forward", "lstm_backward")}[cell]
    for name in names:
        def counted(*args, _f=getattr(kernels, name), _name=name):
            calls[_name] += 1
            return _f(*args)
        monkeypatch.setattr(kernels, name, counted)
    ref, fast = _pair(cell, "str", 1)
    ref, fast = ref.float(), fast.float()
    x, state = _inputs(cell, 1, torch.float32)
    _assert_same(_run(ref, x, state, None, "both"), _run(fast, x, state, None, "both"))
    expected = {"fastgrnn": {"fastgrnn_forward": T, "fastgrnn_backward": 1, "fastgrnn_carry_backward": T - 1,
                             "fastgrnn_carry": 1},
                "lstm": {"lstm_forward": T, "lstm_backward": T}}[cell]
    assert dict(calls) == expected


def test_without_numba_the_torch_operations_run(monkeypatch):
    """numba is optional: where it cannot be imported the kernels run as torch operations."""
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    jit.load.cache_clear()
    try:
        assert fused_ops.compiled(torch.zeros(1)) is None
        for cell in ("fastgrnn", "lstm"):
            ref, fast = _pair(cell, "str", 1)
            x, state = _inputs(cell, 1)
            _assert_same(_run(ref, x, state, None, "both"), _run(fast, x, state, None, "both"))
    finally:
        jit.load.cache_clear()
