"""Inputs and the float64 comparison shared by tests/test_wkv6_cuda_emu.py and _gpu.py, and the
CPU emulation build of the kernel (the machinery is tests/cuda_cases.py, shared with WKV7)."""
import torch

from src.ops.wkv6_reference import wkv6_reference
from tests import cuda_cases

NAMES = ("y", "s_end", "gr", "gk", "gv", "gw", "gu", "gs0")
# Largest error allowed, relative to the largest reference magnitude of the same tensor.
# bf16 outputs are rounded to 8 bits (relative step 2^-8, so at most 2^-9 off).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-3}
CASES = cuda_cases.OpCases(("r", "k", "v", "w", "u", "s0"), NAMES, wkv6_reference, TOLERANCE)
run = CASES.run                          # run(fn, case): fn(r, k, v, w, u, s0) -> (y, s_end)
reference = CASES.reference              # the float64 step-by-step reference on the same inputs
relative_errors = CASES.relative_errors
assert_close = CASES.assert_close        # assert_close(got, want, dtype, label="")


def make_case(B, T, H, N, dtype, device="cpu", seed=0, w_range=(-8.0, 3.0)):
    """Random r, k, v, w, u, s0 and output gradients gy, gs_end. w spans w_range; the default
    gives decays from exp(-exp(-8)) ~ 0.9997 (almost none) to exp(-exp(3)) ~ 2e-9."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    seq = (B, T, H, N)
    case = {
        "r": randn(*seq, scale=0.5), "k": randn(*seq, scale=0.5), "v": randn(*seq),
        "w": torch.rand(*seq, generator=g) * (w_range[1] - w_range[0]) + w_range[0], "u": randn(H, N, scale=0.5),
        "s0": randn(B, H, N, N, scale=0.5), "gy": randn(*seq), "gs_end": randn(B, H, N, N),
    }
    # Everything a model would hold in dtype is made in dtype; states stay fp32.
    return {name: x.to(device, dtype if name not in ("s0", "gs_end") else torch.float32)
            for name, x in case.items()}


def build_emulation(head_size, directory):
    """The real kernel source and binding compiled by g++ against cuda/emu/cuda_emu.h (CPU tensors)."""
    return cuda_cases.build_emulation("wkv6", head_size, directory)
