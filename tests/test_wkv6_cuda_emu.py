"""The real kernel source (cuda/wkv6_cuda.cu) and binding (cuda/wkv6_op.cpp), compiled by
g++ against cuda/emu/cuda_emu.h and run on the CPU, against the float64 reference."""
import shutil

import pytest
import torch

from src.ops.wkv6_cuda import wkv6_with
from src.ops.wkv6_reference import wkv6_reference
from tests import wkv6_cuda_fixture as fixture
from tests.cuda_cases import build_directory
from tests.wkv6_cuda_cases import assert_close, build_emulation, make_case, reference, relative_errors, run

pytestmark = [pytest.mark.numerical, pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                reason="building the CPU emulation of the kernel needs c++ and ninja")]


@pytest.fixture(scope="session")
def emu_builds(pytestconfig, tmp_path_factory):
    """Builds per head size, loaded once per test session."""
    cache = {}

    def get(head_size):
        if head_size not in cache:
            directory = build_directory(pytestconfig, tmp_path_factory, f"wkv6_emu_n{head_size}")
            cache[head_size] = build_emulation(head_size, directory)
        return cache[head_size]
    return get


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, T, H, N", [
    (1, 1, 1, 16),    # a single step
    (1, 16, 1, 16),   # exactly one chunk of the backward pass (16 steps for N <= 64)
    (2, 37, 2, 16),   # T prime: two full chunks and a partial one
    (1, 300, 1, 16),  # long enough for rounding to build up
    (1, 20, 2, 64),   # the production head size
    (1, 19, 1, 128),  # N = 128: 8 steps per chunk
])
def test_matches_reference(emu_builds, B, T, H, N, dtype):
    ops = emu_builds(N)
    assert ops.head_size() == N
    case = make_case(B, T, H, N, dtype, seed=T)
    got = run(lambda *a: wkv6_with(ops, *a), case)
    assert got["y"].dtype == dtype and got["s_end"].dtype == torch.float32
    assert_close(got, reference(case), dtype, label=f"B={B} T={T} H={H} N={N} {dtype}")


@pytest.mark.parametrize("w_range", [(-8.0, -7.0), (1.5, 3.0), (-8.0, 3.0)], ids=["weak", "strong", "mixed"])
def test_fp32_as_accurate_as_a_plain_fp32_loop(emu_builds, w_range):
    """No worse than 3x the error of the step-by-step loop run in fp32 (floored at one fp32
    rounding unit), also for extreme decays, where a decay gradient obtained as a difference
    of large terms would lose digits."""
    ops = emu_builds(16)
    case = make_case(1, 200, 2, 16, torch.float32, seed=5, w_range=w_range)
    truth = reference(case)
    kernel = relative_errors(run(lambda *a: wkv6_with(ops, *a), case), truth)
    loop = relative_errors(run(lambda *a: wkv6_reference(*a, dtype=torch.float32), case), truth)
    for name in kernel:
        assert kernel[name] <= 3 * max(loop[name], 2.0 ** -24), (name, kernel[name], loop[name])


def test_bf16_matches_fp32_rounded(emu_builds):
    """On bf16-representable inputs both instantiations do the same fp32 math, so the bf16
    results must be exactly the fp32 ones rounded to nearest even, as torch rounds."""
    ops = emu_builds(16)
    case = make_case(2, 20, 2, 16, torch.bfloat16, seed=1)
    got16 = run(lambda *a: wkv6_with(ops, *a), case)
    got32 = run(lambda *a: wkv6_with(ops, *a),
                {n: x.float() for n, x in case.items()})
    for name in ("y", "gr", "gk", "gv", "gw"):
        assert torch.equal(got16[name], got32[name].bfloat16()), name
    for name in ("s_end", "gs0"):
        assert torch.equal(got16[name], got32[name]), name


def test_state_defaults_to_zeros(emu_builds):
    ops = emu_builds(16)
    case = make_case(1, 5, 1, 16, torch.float32)
    args = [case[n] for n in ("r", "k", "v", "w", "u")]
    y_none, s_none = wkv6_with(ops, *args)
    y_zero, s_zero = wkv6_with(ops, *args, torch.zeros_like(case["s0"]))
    assert torch.equal(y_none, y_zero) and torch.equal(s_none, s_zero)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(r=c["r"][..., :8].contiguous(), k=c["k"][..., :8].contiguous(),
                        v=c["v"][..., :8].contiguous(), w=c["w"][..., :8].contiguous()),
     "head size N = 16 but r has N = 8"),
    (lambda c: c.update(k=c["k"].double()), "k has dtype Double but r has Float"),
    (lambda c: c.update(v=c["v"].transpose(1, 2).contiguous().transpose(1, 2)), "v must be contiguous"),
    (lambda c: c.update(s0=c["s0"][:, :, :4]), "state must have shape"),
    (lambda c: c.update(r=c["r"].half(), k=c["k"].half(), v=c["v"].half(), w=c["w"].half()),
     "must be bfloat16 or float32"),
])
def test_binding_rejects_bad_arguments(emu_builds, change, message):
    """The binding's checks, called directly (the Python wrapper would fix some of these up)."""
    ops = emu_builds(16)
    case = make_case(1, 4, 2, 16, torch.float32)
    change(case)
    with pytest.raises(RuntimeError, match=message):
        ops.forward(*(case[n] for n in ("r", "k", "v", "w", "u", "s0")))


@pytest.mark.parametrize("name", list(fixture.CASES))
def test_bit_identical_to_the_stored_kernel(emu_builds, name):
    """The outputs and gradients of the kernel as stored in tests/data/wkv6_cuda_fixture.pt
    (see tests/wkv6_cuda_fixture.py), bit for bit: the kernel's changes keep its arithmetic."""
    stored = fixture.load()["cases"][name]
    ops = emu_builds(stored["inputs"]["r"].shape[-1])
    got = run(lambda *a: wkv6_with(ops, *a), stored["inputs"])
    for output, want in stored["outputs"].items():
        assert got[output].dtype == want.dtype and torch.equal(got[output], want), \
            f"{name} {output}: max difference {(got[output].double() - want.double()).abs().max():.3g}"


def test_decay_gradient_is_finite_where_exp_w_overflows(emu_builds):
    """w > 88.7: exp(w) is inf in fp32 and d = 0; the decay gradient -exp(w - exp(w)) * ... is 0
    there (as in the float64 reference, to fp32's range), never 0 * inf = NaN, and the other
    gradients still match the reference."""
    ops = emu_builds(16)
    case = make_case(1, 24, 1, 16, torch.float32, seed=3)
    case["w"][0, 5:9, 0, :4] = 90.0
    got = run(lambda *a: wkv6_with(ops, *a), case)
    truth = reference(case)
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
    assert (got["gw"][0, 5:9, 0, :4] == 0).all() and truth["gw"][0, 5:9, 0, :4].abs().max() < 1e-30
    assert_close(got, truth, torch.float32, label="w = 90 in places")
