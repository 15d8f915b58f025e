"""The chunked CPU WKV6 against the float64 step-by-step reference, forward and every gradient."""
import re

import pytest
import torch

import src.ops.wkv6_cpu as wkv6_cpu_module
from src.ops import wkv6
from src.ops.wkv6_cpu import wkv6_cpu
from src.ops.wkv6_reference import wkv6_reference

pytestmark = pytest.mark.numerical

NAMES = ("y", "state", "r", "k", "v", "w", "u", "state0")
FP32_EPS = torch.finfo(torch.float32).eps


def make_inputs(B, T, H, N, w_low=-8.0, w_high=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.empty(B, T, H, N).uniform_(w_low, w_high, generator=g)
    u = torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    return [x.to(dtype) for x in (r, k, v, w, u)] + [s0]


def outputs_and_grads(fn, inputs, seed=1):
    """(y, final state, then d/d r, k, v, w, u, state0) of a fixed random projection of the outputs."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    y, s = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64)
    ((y.double() * gy).sum() + (s.double() * gs).sum()).backward()
    return [y.detach().double(), s.detach().double()] + [x.grad.double() for x in xs]


def relative_errors(results, truth):
    return {n: ((a - t).abs().max() / t.abs().max()).item() for n, a, t in zip(NAMES, results, truth)}


def assert_as_accurate_as_fp32_loop(inputs):
    """Within 1e-4 of the float64 truth, and never worse than 3x a plain fp32 step-by-step loop.
    The loop's error is floored at 4 fp32 rounding units: below that a ratio measures noise.
    Measured on MKL's AVX-512, AVX2 and COMPATIBLE paths and one thread: at most 2.8e-7 relative
    (360x below 1e-4, 5x below the floor's 1.4e-6); 2.3x the loop's error where the loop was lucky
    (COMPATIBLE: 2.8e-7 against 9e-8, under one eps), 1.5x elsewhere."""
    truth = outputs_and_grads(wkv6_reference, inputs)
    fast = relative_errors(outputs_and_grads(wkv6_cpu, inputs), truth)
    loop = relative_errors(outputs_and_grads(lambda *a: wkv6_reference(*a, dtype=torch.float32), inputs), truth)
    for name in NAMES:
        assert fast[name] <= 1e-4, (name, fast[name])
        assert fast[name] <= 3 * max(loop[name], 4 * FP32_EPS), (name, fast[name], loop[name])


@pytest.mark.parametrize("T", [1, 7, 64, 200, 1000])
def test_matches_float64_reference_and_fp32_loop(T):
    assert_as_accurate_as_fp32_loop(make_inputs(B=2, T=T, H=2, N=32, seed=T))


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("T", [7, 64, 1000])
def test_both_pair_forms_match_the_reference(T, factored, monkeypatch):
    """w <= 0 (no step decays by more than e^-1): the factored pair products, or the per-pair sums
    (the limit set to 0), on the same inputs; the other tests' w up to 3 take the per-pair sums."""
    if factored:
        monkeypatch.setattr(wkv6_cpu_module, "_pair_decays", lambda lw: pytest.fail("not the factored form"))
    else:
        monkeypatch.setattr(wkv6_cpu_module, "FACTOR_DECAY_LIMIT", 0.0)
    assert_as_accurate_as_fp32_loop(make_inputs(B=2, T=T, H=2, N=32, w_high=0.0, seed=T + 1))


@pytest.mark.parametrize("w_low,w_high", [(-8.0, -7.0), (1.5, 3.0), (-0.5, 0.5)])
def test_extreme_decays(w_low, w_high):
    """Decay near 1 (w = -8: exp(-exp(-8)) = 0.99966) and near 0 (w = 3: decay 2e-9), where
    chunked forms lose precision through cumulative decay sums."""
    assert_as_accurate_as_fp32_loop(make_inputs(B=1, T=300, H=2, N=32, w_low=w_low, w_high=w_high, seed=11))


@pytest.mark.parametrize("w_high", [1.5, 0.0])       # the per-pair sums, the factored products
def test_gradcheck_float64(w_high):
    """Finite differences against the hand-written backward (float64 in, float64 math)."""
    inputs = [x.double().requires_grad_() for x in make_inputs(B=2, T=11, H=2, N=4, w_low=-3, w_high=w_high, seed=5)]
    assert torch.autograd.gradcheck(lambda *a: wkv6_cpu(*a, chunk_len=4), inputs)


@pytest.mark.parametrize("chunk_len", [1, 3, 8, 64])
def test_any_chunk_length_gives_the_same_result(chunk_len):
    inputs = make_inputs(B=1, T=37, H=2, N=16, seed=2)
    truth = outputs_and_grads(wkv6_reference, inputs)
    errors = relative_errors(outputs_and_grads(lambda *a: wkv6_cpu(*a, chunk_len=chunk_len), inputs), truth)
    assert max(errors.values()) <= 1e-5, errors     # measured 2.4e-7 on every path: 40x headroom


def test_state_carried_across_calls_equals_one_call():
    r, k, v, w, u, s0 = make_inputs(B=2, T=50, H=2, N=16, seed=3)
    y, s = wkv6_cpu(r, k, v, w, u, s0)
    y1, s1 = wkv6_cpu(r[:, :19], k[:, :19], v[:, :19], w[:, :19], u, s0)
    y2, s2 = wkv6_cpu(r[:, 19:], k[:, 19:], v[:, 19:], w[:, 19:], u, s1)
    # fp32, values of order 1-10: two calls regroup the chunks; differences of a few eps x 10 = 1e-6.
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-5)
    assert torch.allclose(s2, s, atol=1e-5)


def test_bf16_inputs_give_bf16_output_within_bf16_tolerance():
    inputs = make_inputs(B=1, T=100, H=2, N=32, seed=4, dtype=torch.bfloat16)
    y, s = wkv6(*inputs[:5], op="cpu")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = wkv6_reference(*inputs[:5])
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()) <= 1e-2    # bf16's step is 2^-8 = 3.9e-3
    assert ((s.double() - s_ref).abs().max() / s_ref.abs().max()) <= 1e-5  # state stays fp32


def test_no_initial_state_means_zeros():
    r, k, v, w, u, _ = make_inputs(B=1, T=9, H=1, N=8, seed=6)
    y, s = wkv6(r, k, v, w, u, op="cpu")
    y_ref, s_ref = wkv6_reference(r, k, v, w, u)
    # fp32 over 9 steps of order-1 values: a few eps; a nonzero initial state would move them by order 1.
    assert torch.allclose(y.double(), y_ref, atol=1e-5) and torch.allclose(s.double(), s_ref, atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (lambda a: {**a, "k": a["k"][:, :3]}, "k has shape"),
    (lambda a: {**a, "u": a["u"][:1]}, "u must have shape"),
    (lambda a: {**a, "state": a["state"][:, :1]}, "state must have shape"),
    (lambda a: {**a, "r": a["r"][0]}, "shape [B, T, H, N]"),
    (lambda a: {**a, "op": "gpu"}, "Unknown WKV6 op 'gpu'"),
])
def test_bad_input_is_one_clear_sentence(bad, message):
    r, k, v, w, u, s0 = make_inputs(B=1, T=4, H=2, N=8)
    args = dict(r=r, k=k, v=v, w=w, u=u, state=s0)
    with pytest.raises(ValueError, match=re.escape(message)):
        wkv6(**bad(args))
