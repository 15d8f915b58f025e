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
a WKV6CudaError says so and points to `--op cpu`. The build machinery is shared with WKV7
(src/ops/cuda_build.py); `BUILD` is this op's instance of it.
"""
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .cuda_build import CUDA_DIR, CudaOp, check_one_gpu

SOURCES = ("wkv6_op.cpp", "wkv6_cuda.cu")
CACHE_ENV = "RWKV6_WKV6_CACHE"
DEFAULT_CACHE = Path("~/.cache/rwkv6_bone/wkv6")


class WKV6CudaError(RuntimeError):
    """The CUDA WKV6 op cannot run here (no GPU tensors, no toolchain, or a failed build)."""


class WKV6BuildError(WKV6CudaError):
    """The CUDA WKV6 kernel could not be built."""


BUILD = CudaOp("wkv6", "WKV6", SOURCES, CACHE_ENV, DEFAULT_CACHE, WKV6BuildError, CUDA_DIR)
cache_root = BUILD.cache_root              # build_dir, else $RWKV6_WKV6_CACHE, else DEFAULT_CACHE
check_toolchain = BUILD.check_toolchain    # raises WKV6BuildError without nvcc or ninja
load_extension = BUILD.load                # (head_size, device=None, build_dir=None) -> the ops
build_flags = BUILD.build_flags
build_directory = BUILD.build_directory    # (root, head_size, arch)
_build, _compile, _take_builder_lock, _say = BUILD.build, BUILD.compile, BUILD.take_builder_lock, BUILD.say


def wkv6_cuda(r, k, v, w, u, state=None, build_dir=None):
    """Same contract as `src.ops.wkv6.wkv6`; the tensors must be on a CUDA device.

    r, k, v, w are cast to r's dtype (bfloat16 or float32); u and the state run in fp32.
    """
    check_one_gpu("WKV6", r, k, v, w, u, state, error=WKV6CudaError)
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
