"""Inputs and the float64 comparison shared by tests/test_wkv6_cuda_emu.py and _gpu.py, and the
CPU emulation build of the kernel."""
import torch
from torch.utils import cpp_extension

from src.ops.wkv6_cuda import CUDA_DIR
from src.ops.wkv6_reference import wkv6_reference

NAMES = ("y", "s_end", "gr", "gk", "gv", "gw", "gu", "gs0")
# Largest error allowed, relative to the largest reference magnitude of the same tensor.
# bf16 outputs are rounded to 8 bits (relative step 2^-8, so at most 2^-9 off).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-3}


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


def run(fn, case):
    """fn(r, k, v, w, u, s0) -> (y, s_end); returns its outputs and input gradients by name."""
    leaves = [case[n].detach().clone().requires_grad_() for n in ("r", "k", "v", "w", "u", "s0")]
    y, s_end = fn(*leaves)
    torch.autograd.backward([y, s_end], [case["gy"].to(y.dtype), case["gs_end"].to(s_end.dtype)])
    return dict(zip(NAMES, [y, s_end] + [x.grad for x in leaves]))


def reference(case):
    """The float64 step-by-step reference on the same (already rounded) inputs."""
    as64 = {n: x.double() for n, x in case.items()}
    return run(lambda *a: wkv6_reference(*a, dtype=torch.float64), as64)


def relative_errors(got, want):
    """Largest error of each output and gradient, relative to the largest reference magnitude."""
    return {name: ((got[name].double() - want[name]).abs().max() / want[name].abs().max()).item()
            for name in NAMES}


def assert_close(got, want, dtype, label=""):
    """Every output and gradient within TOLERANCE[dtype] of the reference."""
    for name, error in relative_errors(got, want).items():
        assert error <= TOLERANCE[dtype], f"{label} {name}: max error is {error:.3g} of max |reference|"


def build_emulation(head_size, directory):
    """The real kernel source and binding compiled by g++ against cuda/emu/cuda_emu.h (CPU tensors)."""
    name = f"wkv6_emu_n{head_size}"
    cpp_extension.load(
        name=name,
        sources=[str(CUDA_DIR / "wkv6_op.cpp"), str(CUDA_DIR / "emu" / "wkv6_emu.cpp")],
        # The emulation runs every CUDA thread as a host thread, so -O2 matters more than usual.
        extra_cflags=["-O2", f"-D_N_={head_size}", "-DWKV6_EMULATE", "-Wall", "-Wextra", "-Werror",
                      "-Wno-unknown-pragmas"],  # #pragma unroll is for nvcc
        build_directory=str(directory),
        is_python_module=False,
    )
    return getattr(torch.ops, name)
