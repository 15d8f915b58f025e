"""WKV7 on the GPU: the kernels in cuda/wkv7_cuda.cu built on first use, wrapped in autograd.

Built and cached like WKV6 (src/ops/cuda_build.py): by default into
~/.cache/rwkv6_bone/wkv7/N{head size}_sm{arch}_torch{version}_{hash}; set RWKV6_WKV7_CACHE
(read at call time) or pass build_dir to put it elsewhere. No silent fallback: a
WKV7CudaError (one sentence, pointing to `--op cpu`) when it cannot be built or the tensors
are not on one GPU.
"""
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .cuda_build import CUDA_DIR, CudaOp, check_one_gpu

SOURCES = ("wkv7_op.cpp", "wkv7_cuda.cu")
CACHE_ENV = "RWKV6_WKV7_CACHE"
DEFAULT_CACHE = Path("~/.cache/rwkv6_bone/wkv7")


class WKV7CudaError(RuntimeError):
    """The CUDA WKV7 op cannot run here (no GPU tensors, no toolchain, or a failed build)."""


class WKV7BuildError(WKV7CudaError):
    """The CUDA WKV7 kernel could not be built."""


BUILD = CudaOp("wkv7", "WKV7", SOURCES, CACHE_ENV, DEFAULT_CACHE, WKV7BuildError, CUDA_DIR)
load_extension = BUILD.load  # (head_size, device=None, build_dir=None) -> the ops


def wkv7_cuda(r, w, k, v, a, b, state=None, build_dir=None):
    """The contract of `wkv7`: r, w, k, v, a, b [B, T, H, N] (w raw: decay exp(-exp(w))),
    state [B, H, N, N] fp32 (value, key) or None for zeros, all on one GPU. Returns
    (y [B, T, H, N] in r's dtype, final state fp32); gradients reach every input and the state.

    w, k, v, a, b are cast to r's dtype (bfloat16 or float32); math runs in fp32.
    """
    check_one_gpu("WKV7", r, w, k, v, a, b, state, error=WKV7CudaError)
    ops = load_extension(r.shape[-1], r.device, build_dir)
    return wkv7_with(ops, r, w, k, v, a, b, state)


def wkv7_with(ops, r, w, k, v, a, b, state=None):
    """WKV7 through `ops` (a built extension: forward, backward); the tests pass the CPU emulation here."""
    B, _, H, N = r.shape
    r, w, k, v, a, b = (x.to(r.dtype).contiguous() for x in (r, w, k, v, a, b))
    state = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.float().contiguous()
    return _WKV7.apply(ops, r, w, k, v, a, b, state)


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, r, w, k, v, a, b, s0):
        y, s_end = ops.forward(r, w, k, v, a, b, s0)
        ctx.ops = ops
        ctx.save_for_backward(r, w, k, v, a, b, s0)
        return y, s_end

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gs_end):
        # Gradients of unused outputs arrive as zeros (materialize_grads is on by default).
        r, w, k, v, a, b, s0 = ctx.saved_tensors
        gy = gy.to(r.dtype).contiguous()
        gs_end = gs_end.float().contiguous()
        gr, gw, gk, gv, ga, gb, gs0 = ctx.ops.backward(r, w, k, v, a, b, s0, gy, gs_end)
        return None, gr, gw, gk, gv, ga, gb, gs0
