"""The kernel's emulated outputs and gradients, stored once from an earlier version of
cuda/wkv6_cuda.cu, so that changes meant to keep the arithmetic can be checked bit for bit
(tests/test_wkv6_cuda_emu.py::test_bit_identical_to_the_stored_kernel).

    python -m tests.wkv6_cuda_fixture   # rewrites tests/data/wkv6_cuda_fixture.pt: only on purpose

Inputs are stored too, so the pin does not depend on the random generator staying the same.
"""
import hashlib
import os
import subprocess
import tempfile

import torch

from src.checkpoint import atomic_save
from src.ops.wkv6_cuda import CUDA_DIR, wkv6_with
from tests.wkv6_cuda_cases import build_emulation, make_case, run

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "wkv6_cuda_fixture.pt")
INPUTS = ("r", "k", "v", "w", "u", "s0", "gy", "gs_end")
# (B, T, H, N, dtype): partial last chunks at every chunk length (16 for N <= 64, 8 for N = 128).
CASES = {
    "n16_fp32": (2, 37, 1, 16, torch.float32),
    "n16_bf16": (2, 37, 1, 16, torch.bfloat16),
    "n64_fp32": (1, 20, 1, 64, torch.float32),
    "n128_fp32": (1, 9, 1, 128, torch.float32),
}


def load():
    return torch.load(PATH, weights_only=True)


def main():
    source = (CUDA_DIR / "wkv6_cuda.cu").read_bytes()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=CUDA_DIR).stdout.strip()
    fixture = {"kernel_sha256": hashlib.sha256(source).hexdigest(), "commit": commit, "cases": {}}
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (B, T, H, N, dtype) in CASES.items():
            if N not in builds:
                os.makedirs(os.path.join(tmp, f"n{N}"))
                builds[N] = build_emulation(N, os.path.join(tmp, f"n{N}"))
            ops = builds[N]
            case = make_case(B, T, H, N, dtype, seed=T)
            got = run(lambda *a: wkv6_with(ops, *a), case)
            fixture["cases"][name] = {"inputs": {n: case[n] for n in INPUTS},
                                      "outputs": {n: x.detach().clone() for n, x in got.items()}}
    atomic_save(fixture, PATH)
    print(f"wrote {PATH} ({os.path.getsize(PATH) / 1024:.0f} KB) from cuda/wkv6_cuda.cu at {commit[:12]}")


if __name__ == "__main__":
    main()
