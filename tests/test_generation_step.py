"""The one-token step that generation runs: the WKV operators' single steps (src/ops/step.py:
wkv6_step, wkv7_step, which wkv6 and wkv7 take for T = 1) against the float64 references, values and
gradients; and a model read one token at a time through generation's own path (load_model and
model_step, as generate.py runs them) against the same model run over the whole sequence in
float64, logits at every position and the final state, both families, with and without an adapter.
That greedy text equals the `rwkv` package's is tests/test_generate.py's."""
import importlib

import pytest
import torch

from src.generation import load_model, model_step
from src.ops import wkv6, wkv7
from src.ops.wkv6_reference import wkv6_reference
from src.ops.wkv7_reference import wkv7_reference
from tests import test_wkv6_cpu as wkv6_tests
from tests import test_wkv7_cpu as wkv7_tests
from tests.test_merge import make_pair
from tests.tiny import save_random_checkpoint

pytestmark = pytest.mark.numerical
# The operator modules themselves (src.ops.wkv6 as an attribute is the function of that name).
wkv6_module, wkv7_module = importlib.import_module("src.ops.wkv6"), importlib.import_module("src.ops.wkv7")

T = 24


def one_token_at_a_time(op, n_seq):
    """op over a sequence, called once per token with the state carried (every call takes the
    single step): the first n_seq arguments run over the tokens, the last is the state."""
    def run(*inputs):
        seq, fixed, state = inputs[:n_seq], inputs[n_seq:-1], inputs[-1]
        ys = []
        for t in range(seq[0].shape[1]):
            y, state = op(*(x[:, t:t + 1] for x in seq), *fixed, state)
            ys.append(y)
        return torch.cat(ys, 1), state
    return run


# Each family's inputs as its CPU op tests make them (WKV6: r, k, v, w, u, state; WKV7: r, w, k,
# v, a, b, state), its reference, and its op run a token at a time.
FAMILIES = {
    "wkv6": (lambda dtype: wkv6_tests.make_inputs(2, T, 2, 16, w_low=-4, w_high=1.5, seed=3, dtype=dtype),
             wkv6_reference, one_token_at_a_time(lambda *x: wkv6(*x, op="cpu"), 4)),
    "wkv7": (lambda dtype: wkv7_tests.make_inputs(2, T, 2, 16, dtype=dtype, seed=3),
             wkv7_reference, one_token_at_a_time(lambda *x: wkv7(*x, op="cpu"), 6)),
}


def step_errors(family, dtype):
    """Relative errors (max |got - truth| / max |truth|) of y, the final state and every input's
    gradient: the sequence a token at a time against the float64 reference over all of it."""
    make, reference, stepped = FAMILIES[family]
    inputs = [x.to(torch.promote_types(x.dtype, dtype)) for x in make(dtype)]     # float64: the state too
    truth = wkv6_tests.outputs_and_grads(reference, [x.double() for x in inputs])
    got = wkv6_tests.outputs_and_grads(stepped, inputs)
    return [((g - t).abs().max() / t.abs().max()).item() for g, t in zip(got, truth)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_steps_equal_the_float64_reference(family):
    """float64: the reference's own arithmetic in another order (measured <= 5e-16). fp32: the
    bound the chunked CPU ops meet (1e-5 of the values' scale); measured <= 2.1e-7 for values and
    gradients (MKL's AVX-512, AVX2 and COMPATIBLE paths, one thread), 45x below."""
    assert max(step_errors(family, torch.float64)) <= 1e-12
    assert max(step_errors(family, torch.float32)) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_broken_step_is_caught(family, monkeypatch):
    """Without the bonus u (WKV6) or the removal along a (WKV7) the single step must fail the test above."""
    if family == "wkv6":
        real = wkv6_module.wkv6_step
        monkeypatch.setattr(wkv6_module, "wkv6_step", lambda r, k, v, w, u, s: real(r, k, v, w, 0 * u, s))
    else:
        real = wkv7_module.wkv7_step
        monkeypatch.setattr(wkv7_module, "wkv7_step", lambda r, w, k, v, a, b, s: real(r, w, k, v, 0 * a, b, s))
    assert max(step_errors(family, torch.float64)) > 1e-3


def test_single_steps_keep_the_dtype_contract_and_the_callers_state():
    """bf16 in: y in bf16, the state fp32; the state passed in is left as it was (a chat returns to it)."""
    r, k, v, w, u, s0 = wkv6_tests.make_inputs(1, 1, 2, 8, dtype=torch.bfloat16)
    before = s0.clone()
    y, s = wkv6(r, k, v, w, u, s0)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32 and torch.equal(s0, before)
    r, w, k, v, a, b, s0 = wkv7_tests.make_inputs(1, 1, 2, 8, torch.bfloat16)
    before = s0.clone()
    y, s = wkv7(r, w, k, v, a, b, s0)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32 and torch.equal(s0, before)


# Relative to the largest logit (and to each state tensor's largest value). fp32 one token at a time
# against float64 over the whole sequence: measured up to 5.3e-7 for logits and 2.8e-7 for states,
# both families, with and without an adapter, on MKL's AVX-512, AVX2 and COMPATIBLE paths and one
# thread, 9x below; the fp32 pass over the whole sequence (as training runs it) measures the same,
# up to 6.6e-7 and 3.4e-7.
TOL = 5e-6


@pytest.fixture(scope="module", params=[("small", None), ("small", "bone"), ("small7", None), ("small7", "bone")],
                ids=["x060", "x060-bone", "x070", "x070-bone"])
def files(request, tmp_path_factory):
    shape, mode = request.param
    d = tmp_path_factory.mktemp(shape)
    if mode is None:
        return save_random_checkpoint(str(d), shape, seed=2)[0], None
    return make_pair(d, shape, mode, 16, base_dtype="fp32", seed=2)


def relative(got, truth):
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


def test_generation_steps_equal_the_float64_sequence(files, monkeypatch):
    base, adapter = files
    tokens = torch.randint(0, 260, (T,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        truth, truth_state = load_model(base, adapter, dtype=torch.float64)(tokens[None])
    # Every token through the single step: the chunked operators are never entered.
    monkeypatch.setattr(wkv6_module, "wkv6_cpu", None)
    monkeypatch.setattr(wkv7_module, "wkv7_cpu", None)
    step, state = model_step(load_model(base, adapter)), None
    for t, token in enumerate(tokens.tolist()):
        logits, state = step([token], state)
        assert relative(logits, truth[0, t]) <= TOL, t
    for ours, theirs in zip(state, truth_state):
        for a, b in zip(ours, theirs):
            assert relative(a, b) <= TOL


def test_a_step_leaves_the_state_it_was_given(files):
    base, adapter = files
    step = model_step(load_model(base, adapter))
    _, state = step([1, 2, 3], None)
    before = [[t.clone() for t in layer] for layer in state]
    first, _ = step([4], state)
    again, _ = step([4], state)
    assert torch.equal(first, again)
    assert all(torch.equal(a, b) for layer, kept in zip(state, before) for a, b in zip(layer, kept))
