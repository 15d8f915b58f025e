"""The WKV7 operator behind one function; picks the CUDA kernel, the chunked CPU path, or for a
single token (generation) the step of step.py."""
from .checks import check_sequence_shapes, resolve_op
from .step import wkv7_step
from .wkv7_cpu import wkv7_cpu


def wkv7(r, w, k, v, a, b, state=None, op="auto"):
    """WKV7 over a sequence (see `wkv7_reference` for the recurrence).

    r, w, k, v, a, b: [B, T, H, N], bf16 or fp32; w is the raw decay (the op applies
    exp(-exp(w))); the model passes a = -kk and b = kk * (in-context rate). state: [B, H, N, N]
    fp32 (value index, key index, as the `rwkv` package holds it) or None for zeros. Returns
    (y [B, T, H, N] in r's dtype, final state fp32). Math runs in fp32; gradients flow to
    every input and the initial state.

    op: "cuda" (the kernel in cuda/, tensors on a GPU), "cpu" (any device; one token by
    wkv7_step), or "auto".
    """
    op = resolve_op("WKV7", op, r)
    check_sequence_shapes("wkv7", r, {"w": w, "k": k, "v": v, "a": a, "b": b}, state)
    if op == "cuda":
        from .wkv7_cuda import wkv7_cuda  # built on first use; raises a one-sentence error if it cannot be
        return wkv7_cuda(r, w, k, v, a, b, state)
    if r.shape[1] == 1:
        return wkv7_step(r, w, k, v, a, b, state)
    return wkv7_cpu(r, w, k, v, a, b, state)
