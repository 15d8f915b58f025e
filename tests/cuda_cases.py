"""What the tests of the CUDA ops (WKV6, WKV7) share: the CPU emulation build of an op's real
kernel source, running an op forward and backward on a case, and the comparison with a float64
reference. tests/wkv6_cuda_cases.py and tests/wkv7_cuda_cases.py hold each op's inputs."""
import torch
from torch.utils import cpp_extension

from src.ops.cuda_build import CUDA_DIR


def build_directory(pytestconfig, tmp_path_factory, name):
    """Where an emulated kernel is built: pytest's cache directory when the cache is on, so that
    .ci/run's reruns of the numerical tests reuse the main run's builds (ninja rebuilds what a
    changed source needs, and a build takes 7-8 s), else a fresh temporary directory."""
    cache = getattr(pytestconfig, "cache", None)
    return cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)


def build_emulation(op, head_size, directory, defines=()):
    """cuda/{op}_op.cpp and cuda/{op}_cuda.cu (through cuda/emu/{op}_emu.cpp) compiled by g++
    against cuda/emu/cuda_emu.h: the real kernel on CPU tensors. `defines`: extra -D names."""
    name = "_".join([f"{op}_emu_n{head_size}", *(d.lower() for d in defines)])
    cpp_extension.load(
        name=name,
        sources=[str(CUDA_DIR / f"{op}_op.cpp"), str(CUDA_DIR / "emu" / f"{op}_emu.cpp")],
        # The emulation runs every CUDA thread as a host thread, so -O2 matters more than usual.
        extra_cflags=["-O2", f"-D_N_={head_size}", "-DWKV_EMULATE", *(f"-D{d}" for d in defines),
                      "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"],  # #pragma unroll is for nvcc
        build_directory=str(directory),
        is_python_module=False,
    )
    return getattr(torch.ops, name)


class OpCases:
    """An op's calling convention for the tests: `inputs` are the case's names of fn's
    arguments (the last one the initial state), fn returns (y, s_end), and `names` are the
    outputs then the inputs' gradients, in order. `reference(*inputs, dtype=)` is the truth."""

    def __init__(self, inputs, names, reference, tolerance):
        self.inputs, self.names, self.reference_fn, self.tolerance = tuple(inputs), tuple(names), reference, tolerance

    def run(self, fn, case):
        """fn(*inputs) -> (y, s_end); its outputs and input gradients by name (from gy, gs_end)."""
        leaves = [case[n].detach().clone().requires_grad_() for n in self.inputs]
        y, s_end = fn(*leaves)
        torch.autograd.backward([y, s_end], [case["gy"].to(y.dtype), case["gs_end"].to(s_end.dtype)])
        return dict(zip(self.names, [y, s_end] + [x.grad for x in leaves]))

    def reference(self, case, dtype=torch.float64):
        """The step-by-step reference on the same (already rounded) inputs, in `dtype`."""
        cast = {n: x.to(dtype) for n, x in case.items()}
        return self.run(lambda *a: self.reference_fn(*a, dtype=dtype), cast)

    def relative_errors(self, got, want):
        """Largest error of each output and gradient, relative to the largest reference magnitude."""
        return {name: ((got[name].double() - want[name].double()).abs().max() / want[name].abs().max()).item()
                for name in self.names}

    def assert_close(self, got, want, dtype, label=""):
        """Every output and gradient within tolerance[dtype] of the reference."""
        for name, error in self.relative_errors(got, want).items():
            assert error <= self.tolerance[dtype], f"{label} {name}: max error is {error:.3g} of max |reference|"
