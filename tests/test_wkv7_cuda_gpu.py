"""The WKV7 CUDA kernels on a real GPU against the float64 reference (skipped without a GPU).
The first run builds the extension into the cache (see src/ops/wkv7_cuda.py)."""
import pytest
import torch

from src.ops.wkv7_cuda import load_extension, wkv7_cuda
from tests.wkv7_cuda_cases import NAMES, assert_close, make_case, reference, relative_errors, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the real-kernel tests need one")

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DTYPES
@pytest.mark.parametrize("T", [1, 63, 1024, 4097])
def test_matches_reference(T, dtype):
    B, H = (2, 2) if T <= 1024 else (1, 2)
    case = make_case(B, T, H, 64, dtype, device="cuda", seed=T)
    got = run(wkv7_cuda, case)
    assert got["y"].dtype == dtype and got["s_end"].dtype == torch.float32
    assert_close(got, reference(case), dtype, label=f"T={T} {dtype}")


@pytest.mark.parametrize("strong_decay", [False, True], ids=["model-decays", "strong-decays"])
def test_fp32_as_accurate_as_a_plain_fp32_loop(strong_decay):
    case = make_case(1, 300, 2, 64, torch.float32, device="cuda", seed=5, strong_decay=strong_decay)
    truth = reference(case)
    got = relative_errors(run(wkv7_cuda, case), truth)
    loop = relative_errors(reference(case, dtype=torch.float32), truth)
    for name in NAMES:
        assert got[name] <= 1e-5 and got[name] <= 3 * max(loop[name], 2.0 ** -24), (name, got[name], loop[name])


def test_bf16_matches_fp32_rounded():
    case = make_case(2, 40, 2, 64, torch.bfloat16, device="cuda", seed=1)
    got16 = run(wkv7_cuda, case)
    got32 = run(wkv7_cuda, {n: x.float() for n, x in case.items()})
    for name in NAMES:
        want = got32[name] if name in ("s_end", "gs0") else got32[name].bfloat16()
        assert torch.equal(got16[name], want), name


def test_no_state_and_non_contiguous_inputs():
    case = make_case(1, 20, 2, 64, torch.float32, device="cuda", seed=4)
    r, w, k, v, a, b = (case[n] for n in ("r", "w", "k", "v", "a", "b"))
    y, s = wkv7_cuda(r, w, k, v, a, b)
    want = reference({**case, "s0": torch.zeros_like(case["s0"])})
    for got, ref in ((y, want["y"]), (s, want["s_end"])):
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    parts = torch.cat([r, w, k, v, a, b], dim=-1).split(64, dim=-1)
    assert not parts[0].is_contiguous()
    y2, s2 = wkv7_cuda(*parts)
    assert torch.equal(y2, y) and torch.equal(s2, s)


def test_second_load_reuses_the_build():
    first = load_extension(64, torch.device("cuda"))
    assert load_extension(64, torch.device("cuda")) is first
    assert first.head_size() == 64
