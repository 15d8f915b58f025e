"""Cutting [B, T, H, N] sequences into chunks of L steps ([B, H, n_chunks, L, N]) and back, for the
chunked CPU operators."""
import torch


def to_chunks(x, L, dtype):
    """[B, T, H, N] -> [B, H, n_chunks, L, N] in `dtype`, zero-padded at the end of time."""
    B, T, H, N = x.shape
    pad = -T % L
    x = torch.nn.functional.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
    return x.view(B, (T + pad) // L, L, H, N).permute(0, 3, 1, 2, 4).contiguous()


def from_chunks(x, T, dtype):
    B, H, C, L, N = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, C * L, H, N)[:, :T].to(dtype)
