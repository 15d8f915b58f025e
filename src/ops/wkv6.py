"""The WKV6 operator behind one function; picks the CUDA kernel or the chunked CPU path."""
import torch

from .wkv6_cpu import wkv6_cpu

OPS = ("auto", "cpu", "cuda")


def wkv6(r, k, v, w, u, state=None, op="auto"):
    """WKV6 over a sequence (see REFERENCE.md section 3 and `wkv6_reference`).

    r, k, v, w: [B, T, H, N], bf16 or fp32; w is the raw decay (the op applies exp(-exp(w))).
    u: [H, N] (the checkpoint's time_faaaa). state: [B, H, N, N] fp32 (key index, value
    index) or None for zeros. Returns (y [B, T, H, N] in r's dtype, final state fp32).
    Math runs in fp32; gradients flow to r, k, v, w, u and the initial state.

    op: "cuda" (the kernel in cuda/, tensors on a GPU), "cpu" (chunked, any device), or
    "auto": cuda for GPU tensors, cpu otherwise.
    """
    if op not in OPS:
        raise ValueError(f"Unknown WKV6 op {op!r}: choose one of {', '.join(OPS)}.")
    _check_shapes(r, k, v, w, u, state)
    if op == "auto":
        op = "cuda" if r.is_cuda else "cpu"
    if op == "cuda":
        from .wkv6_cuda import wkv6_cuda  # built on first use; raises a one-sentence error if it cannot be
        return wkv6_cuda(r, k, v, w, u, state)
    return wkv6_cpu(r, k, v, w, u, state)


def _check_shapes(r, k, v, w, u, state):
    if r.dim() != 4:
        raise ValueError(f"wkv6 expects r, k, v, w of shape [B, T, H, N]; got r of shape {tuple(r.shape)}.")
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"wkv6: {name} has shape {tuple(x.shape)} but r has {tuple(r.shape)}; they must match.")
    B, T, H, N = r.shape
    if u.shape != (H, N):
        raise ValueError(f"wkv6: u must have shape [H, N] = {[H, N]}; got {list(u.shape)}.")
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"wkv6: state must have shape [B, H, N, N] = {[B, H, N, N]}; got {list(state.shape)}.")
