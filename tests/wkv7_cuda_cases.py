"""Inputs and the float64 comparison shared by tests/test_wkv7_cuda_emu.py and _gpu.py, and the
CPU emulation build of the kernel (the machinery is tests/cuda_cases.py, shared with WKV6)."""
import torch
import torch.nn.functional as F

from src.ops.wkv7_reference import wkv7_reference
from tests import cuda_cases

NAMES = ("y", "s_end", "gr", "gw", "gk", "gv", "ga", "gb", "gs0")
# Largest error allowed, relative to the largest reference magnitude of the same tensor:
# fp32 1e-5; bf16 outputs are rounded to 8 significant bits (up to 2^-8 = 3.9e-3 of a value).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
CASES = cuda_cases.OpCases(("r", "w", "k", "v", "a", "b", "s0"), NAMES, wkv7_reference, TOLERANCE)
run = CASES.run                          # run(fn, case): fn(r, w, k, v, a, b, s0) -> (y, s_end)
reference = CASES.reference              # reference(case, dtype=torch.float64)
relative_errors = CASES.relative_errors
assert_close = CASES.assert_close        # assert_close(got, want, dtype, label="")


def make_case(B, T, H, N, dtype, device="cpu", seed=0, strong_decay=False):
    """Inputs as the x070 model makes them: kk unit-norm per head, a = -kk, b = kk * sigmoid(.),
    w = -softplus(-x) - 0.5 (w <= -0.5, here mostly in [-8, -0.5]: decays 0.9997 to 0.545).
    strong_decay: w uniform in [-1, 2] instead (decays 0.69 to 6e-4), beyond what the model
    makes. Plus an initial state and output gradients gy, gs_end."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    seq = (B, T, H, N)
    kk = F.normalize(randn(*seq), dim=-1)
    if strong_decay:
        w = torch.rand(*seq, generator=g) * 3.0 - 1.0
    else:
        w = -F.softplus(-randn(*seq, scale=2.5)) - 0.5
    case = {
        "r": randn(*seq, scale=0.5), "w": w, "k": randn(*seq, scale=0.5), "v": randn(*seq),
        "a": -kk, "b": kk * torch.sigmoid(randn(*seq)),
        "s0": randn(B, H, N, N, scale=0.5), "gy": randn(*seq), "gs_end": randn(B, H, N, N),
    }
    # Everything a model would hold in dtype is made in dtype; states stay fp32.
    return {name: x.to(device, dtype if name not in ("s0", "gs_end") else torch.float32)
            for name, x in case.items()}


def build_emulation(head_size, directory, defines=()):
    """The real kernel source and binding compiled by g++ against cuda/emu/cuda_emu.h (CPU tensors)."""
    return cuda_cases.build_emulation("wkv7", head_size, directory, defines)
