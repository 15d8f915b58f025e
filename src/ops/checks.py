"""Argument checks and op choice shared by the WKV operators (one sentence per mistake)."""
OPS = ("auto", "cpu", "cuda")


def resolve_op(name, op, r):
    """The implementation to run: op itself, or for "auto" cuda on GPU tensors and cpu otherwise."""
    if op not in OPS:
        raise ValueError(f"Unknown {name} op {op!r}: choose one of {', '.join(OPS)}.")
    return ("cuda" if r.is_cuda else "cpu") if op == "auto" else op


def check_sequence_shapes(name, r, same, state, extra=None):
    """r: [B, T, H, N]; every tensor in `same` ({name: tensor}) of r's shape; state [B, H, N, N]
    or None; extra: {name: (tensor, expected shape)}."""
    if r.dim() != 4:
        raise ValueError(f"{name} expects r of shape [B, T, H, N]; got r of shape {tuple(r.shape)}.")
    for arg, x in same.items():
        if x.shape != r.shape:
            raise ValueError(f"{name}: {arg} has shape {tuple(x.shape)} but r has {tuple(r.shape)}; they must match.")
    B, T, H, N = r.shape
    for arg, (x, shape) in (extra or {}).items():
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name}: {arg} must have shape {list(shape)}; got {list(x.shape)}.")
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"{name}: state must have shape [B, H, N, N] = {[B, H, N, N]}; got {list(state.shape)}.")
