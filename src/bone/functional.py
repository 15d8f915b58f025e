"""The adapter math, and its only home: block sums, the bone/bat/LoRA products as functions
(bone and bat with hand-written backward passes), the bat merged weight and the merge.

Modes (REFERENCE.md section 5):

- ``bone``: parameter ``bone`` of shape [r, out], zero at the start.
  ``y = x W^T + blocksum(x) @ bone``, where blocksum sums the in/r blocks of size r of x
  (x right-padded with zeros when in % r != 0). Equivalent update dW[o, i] = bone[i mod r, o].
  The forward and backward passes never form dW (a custom autograd function).
- ``bat``: parameter ``bone`` of shape [in/r, r, r], one r x r matrix B_b per *input* block b,
  zero at the start; W cut into r x r blocks W[a, b] (a: output block, b: input block) and
  ``dW[a, b] = W[a, b] @ B_b + B_b``. in and out must both be multiples of r. The forward forms
  the merged weight (formed again in the backward pass, not kept) as its single weight-sized
  temporary; a zero bat gives exactly W, so the base logits bit for bit.
  PEFT's "bat" indexes B by the *output* block (shape [out/r, r, r]); ours follows the RWKV-PEFT
  repository's and REFERENCE.md's convention (by input block): files are not interchangeable.
- ``mini`` (PEFT's MiSS "mini"): parameter ``bone`` of shape [r, mini_r], zero at the start,
  tiled along the outputs into bone's [r, out] (out % mini_r == 0), then bone's math:
  dW[o, i] = B[i mod r, o mod mini_r]. The tiling is a [r, out] tensor, so the product and its
  backward pass are bone's (the gradient of the tiles sums back into B through repeat).
- ``lora``: ``lora_A`` [r, in] (Kaiming-uniform), ``lora_B`` [out, r] (zero),
  ``y = x W^T + scaling * (x A^T) B^T`` with scaling = lora_alpha / r (1 when lora_alpha is None).

Merging always computes in fp32 (fp64 for fp64 weights) and casts to the weight's dtype once.
"""
import torch
from torch.autograd.function import once_differentiable

from .config import MODES, AdapterError


def _block_sum(x2, r):
    """[N, in] -> [N, r]: the sum of the in/r blocks of x, the last one zero-padded. Reads x in
    place; only the tail (in % r columns) is added separately, never a padded copy of x."""
    n_rows, n = x2.shape
    nb, tail = divmod(n, r)
    if nb:
        s = x2[:, :nb * r].reshape(n_rows, nb, r).sum(1)
    else:
        s = x2.new_zeros(n_rows, r)
    if tail:
        s[:, :tail] += x2[:, nb * r:]
    return s


def _add_tiled_(target, src):
    """target[:, i] += src[:, i mod r] in place, for target [N, n] and src [N, r]: the transpose
    of _block_sum, and the bone weight update when target is W and src is bone^T."""
    n_rows, n = target.shape
    r = src.shape[1]
    nb, tail = divmod(n, r)
    if nb:
        target[:, :nb * r].view(n_rows, nb, r).add_(src.unsqueeze(1))
    if tail:
        target[:, nb * r:].add_(src[:, :tail])
    return target


class _BoneLinearFn(torch.autograd.Function):
    """y = x W^T + blocksum(x) @ bone without forming dW; saves only the [N, r] block sums
    (and x only when W itself requires grad)."""

    @staticmethod
    def forward(ctx, x, weight, bone):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        s = _block_sum(x2, bone.shape[0])
        y = torch.mm(x2, weight.t())
        y.addmm_(s, bone)         # into y: no second [N, out] buffer (fresh pages cost more than the product)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight, bone, s)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, weight, bone, s = ctx.saved_tensors
        gy2 = gy.reshape(-1, weight.shape[0])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _add_tiled_(torch.mm(gy2, weight), torch.mm(gy2, bone.t())).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = torch.mm(gy2.t(), x2)
        if ctx.needs_input_grad[2]:
            gb = torch.mm(s.t(), gy2)
        return gx, gw, gb


def bone_linear(x, weight, bone, bias=None):
    """The bone-mode layer as a function: x [..., in], weight [out, in], bone [r, out]."""
    y = _BoneLinearFn.apply(x, weight, bone)
    return y if bias is None else y + bias


def mini_tiled(mini, out_features):
    """The [r, mini_r] mini tensor tiled along the outputs into bone's [r, out]: PEFT's
    miss_block.repeat(1, out / mini_r), so column o is B[:, o mod mini_r]."""
    if mini.dim() != 2 or out_features % mini.shape[1]:
        raise AdapterError(f"A mini tensor of shape {list(mini.shape)} does not fit an output size of "
                           f"{out_features} (it must be [r, mini_r] with mini_r dividing it).")
    return mini.repeat(1, out_features // mini.shape[1])


def mini_linear(x, weight, mini, bias=None):
    """The mini-mode layer as a function: bone_linear with the tiled mini tensor."""
    return bone_linear(x, weight, mini_tiled(mini, weight.shape[0]), bias)


def bat_merged_weight(weight, bat, dtype=None):
    """W + dW as a new contiguous [out, in] tensor of `dtype` (default: the weight's): the only
    weight-sized temporary, with dW[a, b] = W[a, b] @ B_b + B_b on the r x r blocks of W (a: output
    block, b: input block; B indexed by the input block b, where PEFT's bat uses the output block).
    weight [out, in], bat [in/r, r, r]. A copy of W, then, in place, + W_b B_b for every column
    slab b (one batched product) and + B_b in every block. A zero bat gives exactly W."""
    out_f, in_f = weight.shape
    nb, r, _ = bat.shape
    dtype = dtype or weight.dtype
    w = weight.to(dtype).contiguous()          # no copy when the dtype already matches
    b = bat.to(dtype)
    m = torch.empty((out_f, in_f), dtype=dtype, device=weight.device)
    m.copy_(w)
    m.view(out_f, nb, r).transpose(0, 1).baddbmm_(w.view(out_f, nb, r).transpose(0, 1), b)   # + W_b B_b
    m.view(out_f // r, r, nb, r).add_(b.permute(1, 0, 2).unsqueeze(0))                        # + B_b
    return m


class _BatLinearFn(torch.autograd.Function):
    """y = x (W + dW)^T. The merged weight is the one weight-sized temporary, formed in the
    forward pass and again in the backward pass rather than kept in between (so a network of bat
    layers does not hold a second copy of its weights until the backward pass), and freed
    before the weight-sized gradient of the merged weight is formed."""

    @staticmethod
    def forward(ctx, x, weight, bat):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        with torch.no_grad():
            y = torch.mm(x2, bat_merged_weight(weight, bat).t())
        ctx.save_for_backward(x2, weight, bat)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, weight, bat = ctx.saved_tensors
        out_f, in_f = weight.shape
        nb, r, _ = bat.shape
        gy2 = gy.reshape(-1, out_f)
        gx = gw = gbat = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(gy2, bat_merged_weight(weight, bat)).view(ctx.x_shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = torch.mm(gy2.t(), x2)                              # dL/d(W + dW), [out, in]
            g_slabs = g.view(out_f, nb, r).transpose(0, 1)         # [nb, out, r]
            if ctx.needs_input_grad[2]:
                w_slabs = weight.contiguous().view(out_f, nb, r).transpose(0, 1)
                block_sums = g.view(out_f // r, r, nb, r).sum(0).transpose(0, 1)   # sum over a of G[a, b]
                gbat = torch.baddbmm(block_sums, w_slabs.transpose(1, 2), g_slabs)  # + W_b^T G_b
            if ctx.needs_input_grad[1]:
                gw = g.clone()
                gw.view(out_f, nb, r).transpose(0, 1).baddbmm_(g_slabs, bat.transpose(1, 2))   # G_b (I + B_b^T)
        return gx, gw, gbat


def bat_linear(x, weight, bat, bias=None):
    """The bat-mode layer as a function: x @ (W + dW)^T, forming W + dW as its one weight-sized
    temporary (see _BatLinearFn)."""
    y = _BatLinearFn.apply(x, weight, bat)
    return y if bias is None else y + bias


def lora_linear(x, weight, lora_A, lora_B, scaling=1.0, bias=None):
    """The LoRA baseline as a function: x W^T + scaling * (x A^T) B^T."""
    out_f, in_f = weight.shape
    x2 = x.reshape(-1, in_f)
    h = torch.mm(x2, lora_A.t())
    if scaling != 1.0:
        h = h * scaling
    y = torch.mm(x2, weight.t())
    y.addmm_(h, lora_B.t())
    y = y.view(*x.shape[:-1], out_f)
    return y if bias is None else y + bias


def adapter_shapes(mode, r, out_features, in_features, mini_r=None):
    """{tensor name: shape} of the adapter for an out x in weight: the one statement of them."""
    if mode == "bone":
        return {"bone": (r, out_features)}
    if mode == "mini":
        return {"bone": (r, mini_r)}
    if mode == "bat":
        return {"bone": (in_features // r, r, r)}
    return {"lora_A": (r, in_features), "lora_B": (out_features, r)}


def lora_factors(adapter, mode, out_features, in_features):
    """(A [r, in], B [out, r]) with dW = B A exactly: bone (and mini, once tiled) is a LoRA whose A
    is the tiled identity, A[j, i] = 1 where i mod r == j (the tail of a non-divisible input takes
    the first in % r rows, as in the merge), and B = bone^T; lora's own pair (its scaling apart).
    bat has none: its update depends on W."""
    if mode == "mini":
        adapter, mode = mini_tiled(adapter, out_features), "bone"
    if mode == "lora":
        return adapter
    if mode != "bone":
        raise AdapterError(f"A {mode} update is not a fixed low-rank product: it has no LoRA form.")
    r = adapter.shape[0]
    eye = torch.eye(r, dtype=adapter.dtype, device=adapter.device)
    return _add_tiled_(adapter.new_zeros(r, in_features), eye), adapter.t()


def merged_exact(weight, adapter, mode, scaling=1.0):
    """W + dW for `mode`, in fp32 (fp64 for fp64 weights), on the weight's device: the merge
    before its one cast. adapter: the bone tensor [r, out] (bone) or [r, mini_r] (mini), the bat tensor [in/r, r, r]
    (bat), or the pair (lora_A, lora_B) (lora, with `scaling`). Returns a new tensor."""
    if mode not in MODES:
        raise AdapterError(f"Unknown adapter mode {mode!r}: choose one of {', '.join(MODES)}.")
    compute = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        if mode == "mini":
            adapter, mode = mini_tiled(adapter, weight.shape[0]), "bone"
        if mode == "bone":
            if adapter.dim() != 2 or adapter.shape[1] != weight.shape[0]:
                raise AdapterError(f"A bone tensor of shape {list(adapter.shape)} does not fit a weight "
                                   f"of shape {list(weight.shape)} (it must be [r, {weight.shape[0]}]).")
            return _add_tiled_(weight.to(compute, copy=True), adapter.t().to(weight.device, compute))
        if mode == "bat":
            out_f, in_f = weight.shape
            if (adapter.dim() != 3 or adapter.shape[1] != adapter.shape[2] or adapter.shape[0] * adapter.shape[1] != in_f
                    or out_f % adapter.shape[1]):
                raise AdapterError(f"A bat tensor of shape {list(adapter.shape)} does not fit a weight "
                                   f"of shape {list(weight.shape)} (it must be [in/r, r, r] with r dividing both sizes).")
            return bat_merged_weight(weight, adapter.to(weight.device), compute)
        lora_A, lora_B = adapter
        merged = weight.to(compute, copy=True)
        return merged.addmm_(lora_B.to(weight.device, compute), lora_A.to(weight.device, compute), alpha=scaling)


def merge_weight(weight, adapter, mode, scaling=1.0, dtype=None):
    """merged_exact cast once to `dtype` (default: the weight's dtype); a new contiguous tensor."""
    merged = merged_exact(weight, adapter, mode, scaling)
    dtype = weight.dtype if dtype is None else dtype
    if merged.dtype == dtype and merged.is_contiguous():
        return merged
    return torch.empty(weight.shape, dtype=dtype, device=weight.device).copy_(merged)
