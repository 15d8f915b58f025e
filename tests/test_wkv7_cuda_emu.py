"""The real WKV7 kernel source (cuda/wkv7_cuda.cu) and binding (cuda/wkv7_op.cpp), compiled by
g++ against cuda/emu/cuda_emu.h and run on the CPU, against the float64 reference
(src/ops/wkv7_reference.py): the output, the final state and every gradient."""
import shutil

import pytest
import torch

from src.ops.wkv7_cuda import wkv7_with
from tests.cuda_cases import build_directory
from tests.wkv7_cuda_cases import (NAMES, TOLERANCE, assert_close, build_emulation, make_case, reference,
                                   relative_errors, run)

pytestmark = [pytest.mark.numerical, pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                reason="building the CPU emulation of the kernel needs c++ and ninja")]


@pytest.fixture(scope="session")
def emu_builds(pytestconfig, tmp_path_factory):
    """Builds per (head size, extra defines), loaded once per test session."""
    cache = {}

    def get(head_size, defines=()):
        key = (head_size, tuple(defines))
        if key not in cache:
            directory = build_directory(pytestconfig, tmp_path_factory, "_".join([f"wkv7_emu_n{head_size}", *defines]))
            cache[key] = build_emulation(head_size, directory, defines)
        return cache[key]
    return get


def kernel(ops):
    return lambda *a: wkv7_with(ops, *a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, T, H, N", [
    (1, 1, 1, 16),    # a single step
    (1, 16, 1, 16),   # exactly one chunk of the backward pass (16 steps for N <= 64)
    (2, 37, 2, 16),   # T prime: two full chunks and a partial one, B > 1 and H > 1
    (1, 300, 1, 16),  # long enough for rounding to build up
    (1, 21, 1, 32),
    (1, 20, 2, 64),   # the production head size
])
def test_matches_reference(emu_builds, B, T, H, N, dtype):
    ops = emu_builds(N)
    assert ops.head_size() == N
    case = make_case(B, T, H, N, dtype, seed=T)
    got = run(kernel(ops), case)
    assert got["y"].dtype == dtype and got["s_end"].dtype == torch.float32 and got["gs0"].dtype == torch.float32
    assert all(got[name].dtype == dtype for name in ("gr", "gw", "gk", "gv", "ga", "gb"))
    assert_close(got, reference(case), dtype, label=f"B={B} T={T} H={H} N={N} {dtype}")


@pytest.mark.parametrize("strong_decay", [False, True], ids=["model-decays", "strong-decays"])
def test_fp32_as_accurate_as_a_plain_fp32_loop(emu_builds, strong_decay):
    """Within 1e-5 of the float64 truth and no worse than 3x the error of the step-by-step loop
    run in fp32 (floored at one fp32 rounding unit), also for decays down to 6e-4, where a
    backward pass that recovered states by undoing steps (dividing by d) would lose digits."""
    ops = emu_builds(16)
    case = make_case(1, 200, 2, 16, torch.float32, seed=5, strong_decay=strong_decay)
    truth = reference(case)
    got = relative_errors(run(kernel(ops), case), truth)
    loop = relative_errors(reference(case, dtype=torch.float32), truth)
    for name in NAMES:
        assert got[name] <= TOLERANCE[torch.float32], (name, got[name])
        assert got[name] <= 3 * max(loop[name], 2.0 ** -24), (name, got[name], loop[name])


def test_bf16_matches_fp32_rounded(emu_builds):
    """On bf16-representable inputs both instantiations do the same fp32 math, so the bf16
    results must be exactly the fp32 ones rounded to nearest even, as torch rounds."""
    ops = emu_builds(16)
    case = make_case(2, 20, 2, 16, torch.bfloat16, seed=1)
    got16 = run(kernel(ops), case)
    got32 = run(kernel(ops), {n: x.float() for n, x in case.items()})
    for name in ("y", "gr", "gw", "gk", "gv", "ga", "gb"):
        assert torch.equal(got16[name], got32[name].bfloat16()), name
    for name in ("s_end", "gs0"):
        assert torch.equal(got16[name], got32[name]), name


def test_state_defaults_to_zeros_and_chains(emu_builds):
    """state=None is zeros; two calls carrying the state give one call's output and state."""
    ops = emu_builds(16)
    case = make_case(1, 21, 1, 16, torch.float32, seed=2)
    args = [case[n] for n in ("r", "w", "k", "v", "a", "b")]
    y_none, s_none = wkv7_with(ops, *args)
    y_zero, s_zero = wkv7_with(ops, *args, torch.zeros_like(case["s0"]))
    assert torch.equal(y_none, y_zero) and torch.equal(s_none, s_zero)
    y1, s1 = wkv7_with(ops, *(x[:, :9] for x in args), case["s0"])
    y2, s2 = wkv7_with(ops, *(x[:, 9:] for x in args), s1)
    y, s = wkv7_with(ops, *args, case["s0"])
    assert torch.equal(torch.cat([y1, y2], dim=1), y) and torch.equal(s2, s)


def test_decay_gradient_is_finite_where_exp_w_overflows(emu_builds):
    """w > 88.7: exp(w) is inf in fp32 and d = 0; the decay gradient is 0 there, never 0 * inf = NaN."""
    ops = emu_builds(16)
    case = make_case(1, 24, 1, 16, torch.float32, seed=3)
    case["w"][0, 5:9, 0, :4] = 90.0
    got = run(kernel(ops), case)
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
    assert (got["gw"][0, 5:9, 0, :4] == 0).all()
    assert_close(got, reference(case), torch.float32, label="w = 90 in places")


def test_a_dropped_gradient_term_is_caught(emu_builds):
    """The kernel built with -DWKV7_TEST_DROP_GB_TERM leaves (G_t b_t) a_t^T out of the step
    back of G: the comparison must fail for every gradient that goes through G (w, k, v, a, b
    and the initial state) and still pass for what does not (y, the final state, r)."""
    broken = emu_builds(16, ("WKV7_TEST_DROP_GB_TERM",))
    case = make_case(1, 37, 1, 16, torch.float32, seed=37)
    errors = relative_errors(run(kernel(broken), case), reference(case))
    wrong = {name for name, error in errors.items() if error > TOLERANCE[torch.float32]}
    assert wrong == {"gw", "gk", "gv", "ga", "gb", "gs0"}, errors


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update({n: c[n][..., :8].contiguous() for n in ("r", "w", "k", "v", "a", "b")}),
     "head size N = 16 but r has N = 8"),
    (lambda c: c.update(a=c["a"].double()), "a has dtype Double but r has Float"),
    (lambda c: c.update(b=c["b"].transpose(1, 2).contiguous().transpose(1, 2)), "b must be contiguous"),
    (lambda c: c.update(s0=c["s0"][:, :, :4]), "state must have shape"),
    (lambda c: c.update({n: c[n].half() for n in ("r", "w", "k", "v", "a", "b")}),
     "r, w, k, v, a, b must be bfloat16 or float32"),
])
def test_binding_rejects_bad_arguments(emu_builds, change, message):
    """The binding's checks, called directly (the Python wrapper would fix some of these up)."""
    ops = emu_builds(16)
    case = make_case(1, 4, 2, 16, torch.float32)
    change(case)
    with pytest.raises(RuntimeError, match=message):
        ops.forward(*(case[n] for n in ("r", "w", "k", "v", "a", "b", "s0")))
