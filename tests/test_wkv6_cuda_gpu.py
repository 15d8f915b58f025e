"""The CUDA kernels on a real GPU against the float64 reference (skipped without a GPU).
The first run builds the extension into the cache (see src/ops/wkv6_cuda.py)."""
import pytest
import torch

from src.ops.wkv6 import wkv6
from src.ops.wkv6_cuda import load_extension, wkv6_cuda
from tests.wkv6_cuda_cases import assert_close, make_case, reference, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the real-kernel tests need one")

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DTYPES
@pytest.mark.parametrize("T", [1, 63, 1024, 4097])
def test_matches_reference(T, dtype):
    B, H = (2, 2) if T <= 1024 else (1, 2)
    case = make_case(B, T, H, 64, dtype, device="cuda", seed=T)
    got = run(wkv6_cuda, case)
    assert got["y"].dtype == dtype and got["s_end"].dtype == torch.float32
    assert_close(got, reference(case), dtype, label=f"T={T} {dtype}")


@DTYPES
def test_dispatcher_runs_the_kernel(dtype):
    """op="cuda" and op="auto" on GPU tensors give exactly the kernel's results."""
    case = make_case(2, 37, 2, 64, dtype, device="cuda", seed=3)
    direct = run(wkv6_cuda, case)
    for op in ("cuda", "auto"):
        through = run(lambda *a: wkv6(*a, op=op), case)
        for name, x in direct.items():
            assert torch.equal(through[name], x), (op, name)
    assert_close(direct, reference(case), dtype)


def test_no_state_and_non_contiguous_inputs():
    case = make_case(1, 20, 2, 64, torch.float32, device="cuda", seed=4)
    r, k, v, w, u = (case[n] for n in ("r", "k", "v", "w", "u"))
    y, s = wkv6_cuda(r, k, v, w, u)
    want = reference({**case, "s0": torch.zeros_like(case["s0"])})
    for got, ref in ((y, want["y"]), (s, want["s_end"])):
        assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    # Strided views (as from one wide projection) are made contiguous by the wrapper.
    parts = torch.cat([r, k, v, w], dim=-1).split(64, dim=-1)
    assert not parts[0].is_contiguous()
    y2, s2 = wkv6_cuda(*parts, u)
    assert torch.equal(y2, y) and torch.equal(s2, s)


def test_second_load_reuses_the_build():
    first = load_extension(64, torch.device("cuda"))
    assert load_extension(64, torch.device("cuda")) is first
    assert first.head_size() == 64
