"""Cutting [B, T, H, N] sequences into chunks of L steps and back, for the chunked CPU operators.
Chunks are laid out chunk-major, [n_chunks, B, H, L, N]: each chunk's [B * H] matrices are one
contiguous block, which the sequential state scans read and write in place."""
import torch

# Past this much decay within one chunk (the largest -c_L over channels), the factored pair terms
# e^{p_t} e^{-c_s} could overflow fp32 (e^88): the operators then sum each pair from its own
# exponent (<= 0), which never overflows.
FACTOR_LIMIT = 60.0


def to_chunks(x, L, dtype, out=None):
    """[B, T, H, N] -> [n_chunks, B, H, L, N] in `dtype`, zero-padded at the end of time; written
    into `out` (any strided tensor of that shape) when given. One copy, no intermediate tensor."""
    B, T, H, N = x.shape
    C, full = -(-T // L), T // L
    if out is None:
        out = x.new_empty(C, B, H, L, N, dtype=dtype)
    out[:full].copy_(x[:, :full * L].unflatten(1, (full, L)).permute(1, 0, 3, 2, 4))
    if full < C:
        out[full, :, :, :T - full * L].copy_(x[:, full * L:].transpose(1, 2))
        out[full, :, :, T - full * L:].zero_()
    return out


def unchunk(x, T, dtype):
    """[n_chunks, B, H, L, N] -> [B, T, H, N] in `dtype` (no autograd; from_chunks is its differentiable form)."""
    C, B, H, L, N = x.shape
    return x.permute(1, 0, 3, 2, 4).reshape(B, C * L, H, N)[:, :T].to(dtype)


def from_chunks(x, T, dtype):
    """[n_chunks, B, H, L, N] -> [B, T, H, N] in `dtype`. Its gradient comes back in to_chunks' contiguous
    layout: autograd's own (a permuted view) made every batched product of a backward pass that used
    it copy its matrices one at a time."""
    return _FromChunks.apply(x, T, dtype)


class _FromChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, T, dtype):
        ctx.L, ctx.dtype = x.shape[3], x.dtype
        return unchunk(x, T, dtype)

    @staticmethod
    def backward(ctx, g):
        return to_chunks(g, ctx.L, ctx.dtype), None, None
