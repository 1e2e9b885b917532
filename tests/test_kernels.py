"""The compiled small-batch inference loops (str_rnn.kernels, numba) and their NumPy
fallback (str_rnn.infer, str_rnn.stream) against the reference loop: whole sequences
(lengths, several layers, the LSTM's cell state) and streaming steps, float32 and float64,
batch 1 and the largest batch they take; and the streaming plan's reuse rules."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

import str_rnn
from str_rnn import CELLS, RNN, compact
from str_rnn import infer, jit

F, H, T = 5, 7, 9  # T >= infer.MERGE_STEPS: the NumPy loops multiply the chain out
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-10}}


@pytest.fixture(params=["compiled", "numpy"])
def loops(request, monkeypatch):
    """Which loops run: the numba kernels, or the NumPy code that runs without numba."""
    if request.param == "compiled":
        pytest.importorskip("numba")
        assert infer.kernels() is not None
    else:
        monkeypatch.setattr(infer, "USE_KERNELS", False)
        assert infer.kernels() is None
    return request.param


@pytest.fixture
def models(prune_to_rank):
    """``models(cell, matrix, dtype) -> (reference loop, fast path)``, equal weights, two layers.

    ``dense``: one-matrix chains; ``compact``: learned ranks pruned and compacted (fixed-rank
    factors, read in place by the streaming plan); ``str``: learned-rank matrices, pruned
    (factors computed at every call); ``str-u0``: the same with ``U`` pruned to rank 0
    (empty factors, ``U = 0``).
    """
    def make(cell: str, matrix: str, dtype: torch.dtype = torch.float32) -> tuple[RNN, RNN]:
        rnn = RNN(cell, F, H, num_layers=2, matrix="dense" if matrix == "dense" else "str")
        if matrix != "dense":
            for layer in rnn.layers:
                prune_to_rank(layer.W, 2)
                prune_to_rank(layer.U, 0 if matrix == "str-u0" else 3)
        with torch.no_grad():  # biases and scalars off their round initial values
            for name, p in rnn.named_parameters():
                if name.endswith(("bias_z", "bias_h", "bias", "zeta", "nu", "alpha", "beta")):
                    p.add_(0.3 * torch.randn_like(p))
        fast = (compact(rnn) if matrix == "compact" else rnn).to(dtype)
        ref = copy.deepcopy(fast)
        ref.fused = False
        return ref, fast

    return make


def _parts(state):
    return state if isinstance(state, tuple) else (state,)


def _assert_close(a, b, dtype):
    for p, q in zip(_parts(a), _parts(b), strict=True):
        torch.testing.assert_close(p, q, **TOL[dtype])


def _initial(cell: str, batch: int, dtype):
    h0 = torch.randn(2, batch, H, dtype=dtype)
    return (h0, torch.randn(2, batch, H, dtype=dtype)) if cell == "lstm" else h0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, infer.MAX_BATCH])
@pytest.mark.parametrize("matrix", ["dense", "compact", "str", "str-u0"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_sequence_equals_reference(cell, matrix, batch, dtype, loops, models, monkeypatch):
    ref, fast = models(cell, matrix, dtype)
    calls = []
    scan = infer.scan
    monkeypatch.setattr(infer, "scan", lambda *a: calls.append(1) or scan(*a))
    x = torch.randn(batch, T, F, dtype=dtype)
    state = _initial(cell, batch, dtype)
    lengths = torch.randint(1, T + 1, (batch,))
    lengths[0] = T - 2
    with torch.no_grad():
        for lens in (None, lengths):
            out_r, h_r = ref(x, state, lengths=lens)
            out_f, h_f = fast(x, state, lengths=lens)
            _assert_close(out_f, out_r, dtype)
            _assert_close(h_f, h_r, dtype)
    assert calls  # the loops under test ran (not torch's LSTM or the fused kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, infer.MAX_BATCH])
@pytest.mark.parametrize("matrix", ["dense", "compact", "str", "str-u0"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_streaming_equals_reference(cell, matrix, batch, dtype, loops, models):
    ref, fast = models(cell, matrix, dtype)
    x = torch.randn(batch, T, F, dtype=dtype)
    state = _initial(cell, batch, dtype)
    with torch.no_grad():
        out_r, h_r = ref(x, state)
        s, outs = state, []
        for t in range(T):  # x[:, t] is strided for batch > 1
            y, s = fast.step(x[:, t], s)
            outs.append(y)
    _assert_close(torch.stack(outs, 1), out_r, dtype)
    _assert_close(s, h_r, dtype)
    plan = fast.__dict__["_stream_cache"]
    assert plan.reusable == (not matrix.startswith("str"))
    assert all((layer.kernel is not None) == (loops == "compiled") for layer in plan.layers)


def _relayout(model: torch.nn.Module, order: str) -> None:
    """Every matrix parameter in C (row-major) or F (column-major) order, same values."""
    for p in model.parameters():
        if p.dim() == 2:
            p.data = p.data.contiguous() if order == "C" else p.data.mT.contiguous().mT


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_any_parameter_layout_is_read_in_place(cell, order, loops, models):
    """The kernels read a weight from ``M`` or from ``Mᵀ``, whichever the memory holds."""
    ref, fast = models(cell, "compact", torch.float32)
    _relayout(fast, order)
    x, state = torch.randn(2, F), _initial(cell, 2, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fast.step(x, state)[0], ref.step(x, state)[0], atol=1e-5, rtol=1e-5)
        assert fast.__dict__["_stream_cache"].reusable
        for p in fast.parameters():  # in place, even through .data: the plan reads the same memory
            p.data.mul_(0.5)
        for p in ref.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(fast.step(x, state)[0], ref.step(x, state)[0], atol=1e-5, rtol=1e-5)


def test_strided_parameters_are_copied_and_the_plan_rebuilt(loops, models):
    """A weight neither C- nor F-contiguous cannot be read in place: the plan copies it and
    is not reused, so later in-place changes still count."""
    ref, fast = models("fastgrnn", "compact", torch.float32)
    w1 = fast.layers[0].U.W1
    w1.data = torch.zeros(w1.shape[0], 2 * w1.shape[1])[:, ::2].copy_(w1.data)
    x, h = torch.randn(1, F), torch.randn(2, 1, H)
    with torch.no_grad():
        torch.testing.assert_close(fast.step(x, h)[0], ref.step(x, h)[0], atol=1e-5, rtol=1e-5)
        # NumPy reads any strided view in place; the kernels need one of the two orders
        assert fast.__dict__["_stream_cache"].reusable == (loops == "numpy")
        w1.add_(0.1)
        ref.layers[0].U.W1.add_(0.1)
        torch.testing.assert_close(fast.step(x, h)[0], ref.step(x, h)[0], atol=1e-5, rtol=1e-5)


def test_plan_follows_optimizer_load_state_dict_and_conversions(loops, models):
    ref, fast = models("gru", "compact", torch.float32)
    x, h = torch.randn(1, F), torch.randn(2, 1, H)

    def same():
        with torch.no_grad():
            torch.testing.assert_close(fast.step(x, h)[0], ref.step(x, h)[0], atol=1e-5, rtol=1e-5)

    same()
    for model in (fast, ref):  # one optimizer step each, same gradients
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        torch.manual_seed(1)
        model(torch.randn(2, 3, F))[1].sum().backward()
        opt.step()
    same()
    state = {k: v + 0.1 for k, v in ref.state_dict().items()}
    fast.load_state_dict(state)
    ref.load_state_dict(state)
    same()
    fast.double()
    ref.double()
    x, h = x.double(), h.double()
    same()
    assert fast.__dict__["_stream_cache"].dtype == torch.float64
    layer = fast.layers[1].W
    layer.W2 = torch.nn.Parameter(layer.W2.detach() * 2)  # replaced
    ref.layers[1].W.W2 = torch.nn.Parameter(ref.layers[1].W.W2.detach() * 2)
    same()


def test_plan_notices_a_parameter_viewed_differently_in_the_same_memory(loops, models):
    """``p.data = p.data.mT``: the same address, other strides; the plan is rebuilt."""
    ref, fast = models("fastgrnn", "dense")
    x, h = torch.randn(1, F), torch.randn(2, 1, H)
    with torch.no_grad():
        fast.step(x, h)
        for model in (fast, ref):
            u = model.layers[0].U.weight  # square: H x H
            u.data = u.data.mT
        torch.testing.assert_close(fast.step(x, h)[0], ref.step(x, h)[0], atol=1e-5, rtol=1e-5)


def test_step_takes_a_list_or_another_dtype_and_reports_bad_shapes(loops, models):
    _, fast = models("lstm", "compact", torch.float32)
    x = torch.randn(2, F)
    h, c = torch.randn(2, 2, H), torch.randn(2, 2, H)
    with torch.no_grad():
        want = fast.step(x, (h, c))
        for state in ([h, c], (h.double(), c.double())):  # a list; a state in another dtype
            got = fast.step(x, state)
            for p, q in zip(want[1], got[1], strict=True):
                torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"state has shape \(2, 3, 7\)"):
            fast.step(x, (torch.zeros(2, 3, H), c))
        with pytest.raises(ValueError, match="input_size=5"):
            fast.step(torch.randn(2, F + 1), (h, c))


def test_kernels_fall_back_to_numpy_without_numba(monkeypatch, models):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "str_rnn.kernels", raising=False)
    monkeypatch.delattr(str_rnn, "kernels", raising=False)
    jit.load.cache_clear()
    try:
        assert infer.kernels() is None
        _, fast = models("fastgrnn", "compact", torch.float32)
        with torch.no_grad():
            fast(torch.randn(1, T, F))
            fast.step(torch.randn(1, F))
        assert fast.__dict__["_stream_cache"].layers[0].kernel is None
    finally:
        jit.load.cache_clear()

