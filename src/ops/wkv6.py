"""The WKV6 operator behind one function; picks the CUDA kernel, the chunked CPU path, or for a
single token (generation) the step of step.py."""
from .checks import OPS, check_sequence_shapes, resolve_op
from .step import wkv6_step
from .wkv6_cpu import wkv6_cpu

__all__ = ["OPS", "wkv6"]


def wkv6(r, k, v, w, u, state=None, op="auto"):
    """WKV6 over a sequence (see REFERENCE.md section 3 and `wkv6_reference`).

    r, k, v, w: [B, T, H, N], bf16 or fp32; w is the raw decay (the op applies exp(-exp(w))).
    u: [H, N] (the checkpoint's time_faaaa). state: [B, H, N, N] fp32 (key index, value
    index) or None for zeros. Returns (y [B, T, H, N] in r's dtype, final state fp32).
    Math runs in fp32; gradients flow to r, k, v, w, u and the initial state.

    op: "cuda" (the kernel in cuda/, tensors on a GPU), "cpu" (chunked, any device; one token
    by wkv6_step), or "auto": cuda for GPU tensors, cpu otherwise.
    """
    op = resolve_op("WKV6", op, r)
    check_sequence_shapes("wkv6", r, {"k": k, "v": v, "w": w}, state, {"u": (u, r.shape[2:])})
    if op == "cuda":
        from .wkv6_cuda import wkv6_cuda  # built on first use; raises a one-sentence error if it cannot be
        return wkv6_cuda(r, k, v, w, u, state)
    if r.shape[1] == 1:
        return wkv6_step(r, k, v, w, u, state)
    return wkv6_cpu(r, k, v, w, u, state)
