"""WKV6 on the GPU: the kernels in cuda/ built on first use, wrapped in autograd.

The first call for a given head size and GPU architecture compiles cuda/wkv6_op.cpp and
cuda/wkv6_cuda.cu with torch.utils.cpp_extension (ninja + nvcc) into a cache directory,
by default ~/.cache/rwkv6_bone/wkv6/N{head size}_sm{arch}_torch{version}_{hash}, the hash
being of the sources and flags (two checkouts sharing the cache never load each other's
build); set RWKV6_WKV6_CACHE (read at call time) or pass build_dir to put it elsewhere.
Later runs load the built library directly (no toolchain needed). A builder holds
`builder.lock` (its pid) in that directory: a build killed midway leaves it and torch's
`lock`, which the next run removes, saying so; a live build is waited for, naming the file.
There is no silent fallback: if the kernel cannot be built or the tensors are not on a GPU,
a WKV6CudaError says so and points to `--op cpu`.
"""
import hashlib
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable
from torch.utils import cpp_extension

from ..checkpoint import release_pid_lock, take_pid_lock

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
SOURCES = ("wkv6_op.cpp", "wkv6_cuda.cu")
CACHE_ENV = "RWKV6_WKV6_CACHE"
DEFAULT_CACHE = Path("~/.cache/rwkv6_bone/wkv6")

_modules = {}
_lock = threading.Lock()


class WKV6CudaError(RuntimeError):
    """The CUDA WKV6 op cannot run here (no GPU tensors, no toolchain, or a failed build)."""


class WKV6BuildError(WKV6CudaError):
    """The CUDA WKV6 kernel could not be built."""


def wkv6_cuda(r, k, v, w, u, state=None, build_dir=None):
    """Same contract as `src.ops.wkv6.wkv6`; the tensors must be on a CUDA device.

    r, k, v, w are cast to r's dtype (bfloat16 or float32); u and the state run in fp32.
    """
    devices = sorted({str(x.device) for x in (r, k, v, w, u, state) if x is not None})
    if not (r.is_cuda and len(devices) == 1):
        raise WKV6CudaError(
            f"The CUDA WKV6 op needs all its tensors on one GPU but got them on {', '.join(devices)}; "
            "move the model to a GPU or run with --op cpu.")
    ops = load_extension(r.shape[-1], r.device, build_dir)
    return wkv6_with(ops, r, k, v, w, u, state)


def wkv6_with(ops, r, k, v, w, u, state=None):
    """WKV6 through `ops` (a built extension: forward, backward); the tests pass the CPU emulation here."""
    B, _, H, N = r.shape
    r, k, v, w = (x.to(r.dtype).contiguous() for x in (r, k, v, w))
    u = u.float().contiguous()
    state = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.float().contiguous()
    return _WKV6.apply(ops, r, k, v, w, u, state)


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, r, k, v, w, u, s0):
        y, s_end = ops.forward(r, k, v, w, u, s0)
        ctx.ops = ops
        ctx.save_for_backward(r, k, v, w, u, s0)
        return y, s_end

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gs_end):
        # Gradients of unused outputs arrive as zeros (materialize_grads is on by default).
        r, k, v, w, u, s0 = ctx.saved_tensors
        gy = gy.to(r.dtype).contiguous()
        gs_end = gs_end.float().contiguous()
        gr, gk, gv, gw, gu, gs0 = ctx.ops.backward(r, k, v, w, u, s0, gy, gs_end)
        return None, gr, gk, gv, gw, gu, gs0


def cache_root(build_dir=None):
    """Where builds go: build_dir, else $RWKV6_WKV6_CACHE, else ~/.cache/rwkv6_bone/wkv6."""
    return Path(build_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def check_toolchain():
    """Raise WKV6BuildError if nvcc or ninja, which the build needs, cannot be found."""
    nvcc = cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    missing = [name for name, ok in (
        ("nvcc (the CUDA toolkit; set CUDA_HOME)", nvcc and os.access(nvcc, os.X_OK)),
        ("ninja (pip install ninja)", shutil.which("ninja")),
    ) if not ok]
    if missing:
        raise WKV6BuildError(
            f"Cannot build the CUDA WKV6 kernel because {' and '.join(missing)} "
            f"{'is missing; install it' if len(missing) == 1 else 'are missing; install them'} "
            "or run with --op cpu.")


def load_extension(head_size, device=None, build_dir=None):
    """Build (first time) or load the kernels for this head size and the GPU of `device`."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    key = (head_size, arch)
    with _lock:
        if key not in _modules:
            _modules[key] = _build(head_size, arch, cache_root(build_dir))
        return _modules[key]


def build_flags(head_size):
    return {"extra_cflags": ["-O2", f"-D_N_={head_size}"],
            "extra_cuda_cflags": ["-O3", "-Xptxas", "-O3", f"-D_N_={head_size}"]}


def build_directory(root, head_size, arch):
    """root/N{N}_sm{arch}_torch{version}_{hash of the sources and flags}."""
    digest = hashlib.sha256(repr(sorted(build_flags(head_size).items())).encode())
    for name in SOURCES:
        digest.update((CUDA_DIR / name).read_bytes())
    torch_version = re.sub(r"[^0-9A-Za-z.]", "_", torch.__version__)
    return Path(root) / f"N{head_size}_sm{arch}_torch{torch_version}_{digest.hexdigest()[:12]}"


def _say(message):
    print(f"wkv6 cuda: {message}", file=sys.stderr, flush=True)


def _take_builder_lock(directory, wait_seconds=1.0):
    """Hold directory/builder.lock: wait (saying which file) while a live process builds there;
    a dead builder's lock and the `lock` file torch's build leaves behind are removed."""
    path, said = directory / "builder.lock", False
    while True:
        owner = take_pid_lock(str(path), say=_say)
        if owner is None:
            break
        if not said:
            _say(f"waiting for the build in progress by pid {owner.get('pid')} (lock file {path})")
            said = True
        time.sleep(wait_seconds)
    stale = directory / "lock"    # torch's FileBaton: nobody else is building now, so it is left over
    if stale.exists():
        stale.unlink()
        _say(f"removed {stale}, left by a build that was interrupted")
    return path


def _build(head_size, arch, root):
    name = f"wkv6_n{head_size}_sm{arch}"
    directory = build_directory(root, head_size, arch)
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{name}.so"
    lock = _take_builder_lock(directory)
    try:
        if library.exists():           # built before from these very sources and flags
            torch.ops.load_library(str(library))
            return getattr(torch.ops, name)
        check_toolchain()
        _compile(name, head_size, arch, directory)
        return getattr(torch.ops, name)
    finally:
        release_pid_lock(str(lock))


def _compile(name, head_size, arch, directory):
    # Build for exactly this GPU; torch reads the architecture list from the environment.
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[:-1]}.{arch[-1]}"
    try:
        cpp_extension.load(name=name, sources=[str(CUDA_DIR / s) for s in SOURCES], build_directory=str(directory),
                           is_python_module=False, verbose=False, **build_flags(head_size))
    except Exception as error:
        summary = (str(error).strip().splitlines() or [type(error).__name__])[0]
        summary = summary if len(summary) <= 120 else summary[:117] + "..."
        raise WKV6BuildError(
            f"Building the CUDA WKV6 kernel in {directory} failed ({summary}; the compiler "
            "output is in the chained error); fix the toolchain or run with --op cpu.") from error
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
