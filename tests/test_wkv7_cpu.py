"""The CPU WKV7 op against the float64 step-by-step reference: outputs, the final state and the
gradients of r, w, k, v, a, b and the initial state; and a broken variant that must fail."""
import re

import pytest
import torch
import torch.nn.functional as F

import src.ops.wkv7_cpu as wkv7_cpu_module
from src.ops import wkv7
from src.ops.wkv7_cpu import wkv7_cpu
from src.ops.wkv7_reference import wkv7_reference
from tests import test_wkv6_cpu as wkv6_tests

NAMES = ("r", "w", "k", "v", "a", "b", "s0")


def make_inputs(B, T, H, N, dtype=torch.float64, seed=0, strong=False):
    """As the model makes them: kk unit-norm per head, a = -kk, b = kk * rate, w <= -0.5
    (strong: w down to -8 as well, decays from 0.9997 to 0.545)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(B, T, H, N, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rand(), rand(), rand()
    w = -F.softplus(-rand() * (3 if strong else 1)) - 0.5
    kk = F.normalize(rand(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rand())
    s0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (r, w, k, v, a, b)] + [s0.to(dtype if dtype == torch.float64 else torch.float32)]


def outputs_and_grads(fn, inputs, seed=1):
    """y, final state and every input's gradient of a random linear function of both (in float64)."""
    return dict(zip(["y", "state"] + [f"d{n}" for n in NAMES], wkv6_tests.outputs_and_grads(fn, inputs, seed)))


def relative_errors(got, want):
    """max |got - want| / max |want| per tensor: errors against the values' scale."""
    return {k: ((got[k].double() - want[k]).abs().max() / want[k].abs().max()).item() for k in want}


def reference(inputs):
    return outputs_and_grads(lambda *x: wkv7_reference(*x[:6], x[6]), [x.double() for x in inputs])


CASES = [(1, 1, 1, 8, 16), (2, 37, 2, 16, 8), (1, 64, 1, 16, 16), (1, 50, 2, 64, 16), (2, 100, 1, 8, 32),
         (1, 300, 2, 64, 16)]


@pytest.mark.numerical
@pytest.mark.parametrize("B, T, H, N, chunk", CASES)
def test_float64_equals_the_reference(B, T, H, N, chunk):
    inputs = make_inputs(B, T, H, N, seed=T)
    got = outputs_and_grads(lambda *x: wkv7_cpu(*x[:6], x[6], chunk_len=chunk), inputs)
    errors = relative_errors(got, reference(inputs))
    assert max(errors.values()) <= 1e-10, errors


@pytest.mark.numerical
@pytest.mark.parametrize("strong", [False, True], ids=["model-decays", "strong-decays"])
@pytest.mark.parametrize("B, T, H, N, chunk", CASES[1:])
def test_float32_within_1e_5_of_the_values_scale(B, T, H, N, chunk, strong):
    inputs = make_inputs(B, T, H, N, seed=T, strong=strong)
    got = outputs_and_grads(lambda *x: wkv7_cpu(*x[:6], x[6], chunk_len=chunk), make_inputs(B, T, H, N, torch.float32, T, strong))
    errors = relative_errors(got, reference(inputs))
    assert max(errors.values()) <= 1e-5, errors
    y, s = wkv7_cpu(*make_inputs(1, 3, 1, 8, torch.float32))
    assert y.dtype == torch.float32 and s.dtype == torch.float32


@pytest.mark.numerical
def test_bf16_inputs_give_bf16_outputs_within_bf16_rounding():
    inputs = make_inputs(1, 20, 2, 16, torch.bfloat16, seed=3)
    got = outputs_and_grads(lambda *x: wkv7_cpu(*x[:6], x[6]), inputs)
    want = reference([x.double() for x in inputs])     # the same (rounded) inputs
    y, s = wkv7_cpu(*inputs)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    errors = relative_errors(got, want)
    assert max(errors.values()) <= 2 ** -7, errors       # one bf16 rounding of the result


@pytest.mark.numerical
@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_decays_past_the_factor_limit_take_the_pairwise_path(dtype, bound, monkeypatch):
    """w up to 2 (decay down to 6e-4 a step): a chunk of 16 decays by up to 118 > FACTOR_LIMIT, where
    e^{-c} would overflow fp32; the pairwise path runs, to the same bounds as above."""
    calls = []
    pairwise = wkv7_cpu_module._pairwise
    monkeypatch.setattr(wkv7_cpu_module, "_pairwise", lambda *a: calls.append(1) or pairwise(*a))
    inputs = make_inputs(1, 50, 2, 16, seed=4)
    inputs[1] = torch.rand(inputs[1].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3 - 1
    got = outputs_and_grads(lambda *x: wkv7_cpu(*x[:6], x[6]), [x.to(dtype) for x in inputs])
    errors = relative_errors(got, reference(inputs))
    assert calls and max(errors.values()) <= bound, errors
    calls.clear()
    wkv7_cpu(*make_inputs(1, 50, 2, 16, torch.float32, strong=True))     # the model's decays: the factored path
    assert not calls


@pytest.mark.numerical
def test_a_sequence_in_pieces_equals_it_at_once():
    """The state carried out of one call into the next (with its gradient) is exact."""
    inputs = make_inputs(1, 30, 2, 8, seed=5)

    def in_pieces(r, w, k, v, a, b, s0):
        ys, s = [], s0
        for piece in (slice(0, 7), slice(7, 19), slice(19, 30)):
            y, s = wkv7_cpu(r[:, piece], w[:, piece], k[:, piece], v[:, piece], a[:, piece], b[:, piece], s, chunk_len=4)
            ys.append(y)
        return torch.cat(ys, 1), s
    errors = relative_errors(outputs_and_grads(in_pieces, inputs), reference(inputs))
    assert max(errors.values()) <= 1e-10, errors


@pytest.mark.numerical
def test_a_broken_recurrence_is_caught(monkeypatch):
    """Drop the S a b^T term: the comparison with the reference must fail, for outputs and gradients."""
    def terms_without_removal(r, w, k, v, a, b, L):
        return real(r, w, k, v, 0 * a, b, L)       # a still in the graph, its effect gone
    real = wkv7_cpu_module._chunk_terms
    inputs = make_inputs(1, 20, 1, 8, seed=2)
    monkeypatch.setattr(wkv7_cpu_module, "_chunk_terms", terms_without_removal)
    errors = relative_errors(outputs_and_grads(lambda *x: wkv7_cpu(*x[:6], x[6]), inputs), reference(inputs))
    assert errors["y"] > 1e-3 and errors["dw"] > 1e-3, errors


@pytest.mark.numerical
def test_a_backward_missing_a_path_is_caught(monkeypatch):
    """The written-out backward of the chunk terms with the chunk decay's gradient dropped: the values
    still match, the w gradient must not."""
    real = wkv7_cpu_module._FactoredTerms.backward

    def without_decay(ctx, gW, gB_end, gd, *rest):
        return real(ctx, gW, gB_end, torch.zeros_like(gd), *rest)
    monkeypatch.setattr(wkv7_cpu_module._FactoredTerms, "backward", staticmethod(without_decay))
    inputs = make_inputs(1, 40, 1, 8, seed=2)
    errors = relative_errors(outputs_and_grads(lambda *x: wkv7_cpu(*x[:6], x[6], chunk_len=8), inputs), reference(inputs))
    assert errors["y"] <= 1e-10 and errors["dw"] > 1e-3, errors


@pytest.mark.parametrize("bad,message", [
    (lambda x: {**x, "k": x["k"][:, :3]}, "k has shape"),
    (lambda x: {**x, "state": x["state"][:, :1]}, "state must have shape"),
    (lambda x: {**x, "r": x["r"][0]}, "shape [B, T, H, N]"),
    (lambda x: {**x, "op": "gpu"}, "Unknown WKV7 op 'gpu'"),
])
def test_bad_input_is_one_clear_sentence(bad, message):
    r, w, k, v, a, b, s0 = make_inputs(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=re.escape(message)):
        wkv7(**bad(dict(r=r, w=w, k=k, v=v, a=a, b=b, state=s0)))


def test_the_cuda_op_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_wkv7_cuda_gpu.py covers it")
    r, w, k, v, a, b, s0 = make_inputs(1, 4, 1, 8, torch.float32)
    with pytest.raises(Exception, match="GPU"):
        wkv7(r, w, k, v, a, b, s0, op="cuda")
