"""Bone adapters for RWKV-6: the config, the layers (bone, bat and a LoRA baseline), applying
them to a model, merging, and adapter files. The one home for the adapter math.

Usage::

    from src.bone import BoneConfig, apply_adapters, save_adapter, load_adapter, merge_and_unload

    model = RWKV6.from_checkpoint("base.pth", dtype=torch.float32)
    apply_adapters(model, BoneConfig(r=64, mode="bone", train_parts=["time", "ln"]))
    ...train...
    save_adapter(model, "adapter.pth")           # adapter + train-part tensors, official-style keys
    load_adapter(RWKV6.from_checkpoint("base.pth"), "adapter.pth")   # applies and loads
    merge_and_unload(model)                       # plain RWKV6 holding the merged weights

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
- ``lora``: ``lora_A`` [r, in] (Kaiming-uniform), ``lora_B`` [out, r] (zero),
  ``y = x W^T + scaling * (x A^T) B^T`` with scaling = lora_alpha / r (1 when lora_alpha is None).
  A baseline for A/B comparisons, sharing the config, the apply function and the files.

Dtypes: adapter parameters are stored in the base weight's dtype when that is fp32 or fp64, and
in fp32 otherwise (bf16/fp16 bases), so small updates are not rounded away. In the forward pass
they are cast to the activations' dtype (as autocast does; under torch.autocast, to its dtype).
Merging always computes in fp32 (fp64 for fp64 weights) and casts to the weight's dtype once.

Adapter files (``save_adapter``) are flat dicts of tensors loadable with
``torch.load(weights_only=True)``: ``blocks.3.att.key.bone`` (both bone and bat modes),
``blocks.3.att.key.lora_A`` / ``.lora_B``, the train-part tensors under their official names
(``blocks.3.att.time_decay``, ``emb.weight``...), and under the reserved key ``__bone_meta__`` a
dict of plain Python values: format, version, mode, r per module, target list, train parts,
lora_alpha, and the base model's shape fingerprint.
"""
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .checkpoint import atomic_save, load_state_dict

MODES = ("bone", "bat", "lora")
DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output",
                   "ffn.key", "ffn.receptance", "ffn.value")
TRAIN_PARTS = ("time", "ln", "emb", "head")
META_KEY = "__bone_meta__"
FILE_FORMAT = "rwkv6-adapter"
FILE_VERSION = 1
TENSOR_NAMES = {"bone": ("bone",), "bat": ("bone",), "lora": ("lora_A", "lora_B")}
LEGACY_KEYS = {"bone_mode": "mode", "bone_r": "r", "bone_load": "load"}


class AdapterError(ValueError):
    """A bad adapter config, file or model; the message is one sentence that says why."""


# ----------------------------------------------------------------------------------------------
# The math: block sums, the tiled add, the bat merged weight, the merge. Nothing else re-implements it.

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


def adapter_shapes(mode, r, out_features, in_features):
    """{tensor name: shape} of the adapter for an out x in weight: the one statement of them."""
    if mode == "bone":
        return {"bone": (r, out_features)}
    if mode == "bat":
        return {"bone": (in_features // r, r, r)}
    return {"lora_A": (r, in_features), "lora_B": (out_features, r)}


def merged_exact(weight, adapter, mode, scaling=1.0):
    """W + dW for `mode`, in fp32 (fp64 for fp64 weights), on the weight's device: the merge
    before its one cast. adapter: the bone tensor [r, out] (bone), the bat tensor [in/r, r, r]
    (bat), or the pair (lora_A, lora_B) (lora, with `scaling`). Returns a new tensor."""
    if mode not in MODES:
        raise AdapterError(f"Unknown adapter mode {mode!r}: choose one of {', '.join(MODES)}.")
    compute = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
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


# ----------------------------------------------------------------------------------------------
# Layers

def _adapter_dtype(weight):
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class AdapterLinear(nn.Module):
    """Wraps a frozen nn.Linear: keeps its `weight` (and `bias`) Parameter objects under the same
    names, so state-dict keys stay official (blocks.3.att.key.weight), and adds adapter tensors
    beside it (blocks.3.att.key.bone)."""
    mode = None

    def __init__(self, base: nn.Linear, r: int, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.name = r, name
        self.weight = base.weight
        self.register_parameter("bias", base.bias)

    def adapter_tensors(self):
        """{file suffix: Parameter}, e.g. {"bone": ...}."""
        return OrderedDict((n, getattr(self, n)) for n in TENSOR_NAMES[self.mode])

    def _new(self, tensor_name):
        shape = adapter_shapes(self.mode, self.r, self.out_features, self.in_features)[tensor_name]
        return nn.Parameter(torch.zeros(shape, dtype=_adapter_dtype(self.weight), device=self.weight.device))

    def _compute_dtype(self, x):
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return None

    def forward(self, x):
        dtype = self._compute_dtype(x)
        if dtype is None:
            return self._forward(x, self.weight, self.bias, x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            return self._forward(x.to(dtype), self.weight.to(dtype), bias, dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, r={self.r}"


class BoneLinear(AdapterLinear):
    mode = "bone"

    def __init__(self, base, r, name="", init_weights=True):
        super().__init__(base, r, name)
        self.bone = self._new("bone")
        if not init_weights:
            nn.init.kaiming_uniform_(self.bone, a=math.sqrt(5))

    def _forward(self, x, weight, bias, dtype):
        return bone_linear(x, weight, self.bone.to(dtype), bias)

    def merged_weight(self):
        return merge_weight(self.weight, self.bone, "bone")


class BatLinear(AdapterLinear):
    mode = "bat"

    def __init__(self, base, r, name="", init_weights=True):
        if base.in_features % r or base.out_features % r:
            g = math.gcd(base.in_features, base.out_features)
            hint = max(d for d in range(1, min(r, g) + 1) if g % d == 0)
            raise AdapterError(f"bat mode needs both sizes divisible by r, but {name or 'a module'} is "
                               f"{base.in_features} -> {base.out_features} and r = {r}: use r = {hint} there "
                               "(rank_pattern), exclude it, or use bone mode.")
        super().__init__(base, r, name)
        self.bone = self._new("bone")
        if not init_weights:
            nn.init.kaiming_uniform_(self.bone, a=math.sqrt(5))

    def _forward(self, x, weight, bias, dtype):
        return bat_linear(x, weight, self.bone.to(dtype), bias)

    def merged_weight(self):
        return merge_weight(self.weight, self.bone, "bat")


class LoraLinear(AdapterLinear):
    mode = "lora"

    def __init__(self, base, r, name="", init_weights=True, lora_alpha=None):
        super().__init__(base, r, name)
        self.lora_alpha = lora_alpha
        self.scaling = 1.0 if lora_alpha is None else lora_alpha / r
        self.lora_A = self._new("lora_A")
        self.lora_B = self._new("lora_B")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not init_weights:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def _forward(self, x, weight, bias, dtype):
        return lora_linear(x, weight, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling, bias)

    def merged_weight(self):
        return merge_weight(self.weight, (self.lora_A, self.lora_B), "lora", self.scaling)

    def extra_repr(self):
        return super().extra_repr() + f", scaling={self.scaling:g}"


LAYERS = {"bone": BoneLinear, "bat": BatLinear, "lora": LoraLinear}


# ----------------------------------------------------------------------------------------------
# Config

def _as_patterns(value, what):
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise AdapterError(f"{what} {value!r} is not a valid regular expression ({e}).") from None
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AdapterError(f"{what} must be a list of module names or suffixes, or one regular expression "
                       f"string, not {value!r}.")


def _name_matches(pattern, name):
    """A list entry matches a module path exactly or as a dotted suffix (PEFT's rule)."""
    return name == pattern or name.endswith("." + pattern)


def _spec_matches(spec, name):
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_name_matches(p, name) for p in spec)


def _layer_of(name):
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def train_part_of(param_name):
    """Which train part a parameter belongs to (time, ln, emb, head), or None."""
    if ".time_" in param_name:
        return "time"
    if re.search(r"(^|\.)(ln0|ln1|ln2|ln_x|ln_out)\.", param_name):
        return "ln"
    if param_name == "emb.weight":
        return "emb"
    if param_name == "head.weight":
        return "head"
    return None


@dataclass
class BoneConfig:
    """What to adapt and how (the options of PEFT's BoneConfig, for RWKV-6).

    r: block size / rank (default 64). mode: "bone", "bat" or "lora"; anything else is an error.
    target_modules: module names or dotted suffixes (a list: exact or suffix match, as PEFT), one
      regular expression (a string: full match), or "all-linear"; default the 8 RWKV-6 projections.
      A list entry or a regex that matches no module is an error.
    exclude_modules: the same forms; modules it matches are left alone.
    layers_to_transform: a layer index or a list of them; only blocks.{i} modules are adapted then.
    rank_pattern: {name, suffix or regex: r} per module; the first matching key wins.
    train_parts: any of "time" (every .time_* parameter), "ln" (ln0/ln1/ln2/ln_x/ln_out), "emb",
      "head": base parameters that train too; the rest of the base is frozen.
    lora_alpha: LoRA only; scaling = lora_alpha / r (None: scaling 1).
    init_weights: True (zero-initialised adapters: the model starts equal to the base); False gives
      random adapter values (for tests), as in PEFT.
    load: an adapter file that apply_adapters loads after applying (the older repository's bone_load).
    """
    r: int = 64
    mode: str = "bone"
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    layers_to_transform: Optional[Union[list, int]] = None
    rank_pattern: dict = field(default_factory=dict)
    train_parts: list = field(default_factory=list)
    lora_alpha: Optional[float] = None
    init_weights: bool = True
    load: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"r must be a positive integer, not {self.r!r}.")
        mode = self.mode.strip().lower() if isinstance(self.mode, str) else self.mode
        if mode not in MODES:
            raise AdapterError(f"Unknown adapter mode {self.mode!r}: choose one of {', '.join(MODES)}.")
        self.mode = mode
        if self.target_modules is None or self.target_modules == "all-linear":
            self.target_modules = list(DEFAULT_TARGETS)
        self.target_modules = _as_patterns(self.target_modules, "target_modules")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise AdapterError("target_modules is empty: name at least one module to adapt.")
        self.exclude_modules = _as_patterns(self.exclude_modules, "exclude_modules")
        layers = self.layers_to_transform
        if layers is not None:
            layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if (not isinstance(layers, (list, tuple)) or not layers
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
                raise AdapterError("layers_to_transform must be a layer index or a non-empty list of them, "
                                   f"not {self.layers_to_transform!r}.")
            self.layers_to_transform = sorted(set(layers))
        if not isinstance(self.rank_pattern, dict):
            raise AdapterError(f"rank_pattern must be a dict of module pattern -> r, not {self.rank_pattern!r}.")
        for key, r in self.rank_pattern.items():
            if not isinstance(key, str) or isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise AdapterError(f"rank_pattern entry {key!r}: {r!r} must map a module pattern to a "
                                   "positive integer r.")
        self.rank_pattern = dict(self.rank_pattern)
        parts = self.train_parts
        if parts is None:
            parts = []
        if isinstance(parts, str):
            parts = [p.strip() for p in parts.split(",") if p.strip()]
        if not isinstance(parts, (list, tuple)):
            raise AdapterError(f"train_parts must be a list of {', '.join(TRAIN_PARTS)}, not {self.train_parts!r}.")
        unknown = [p for p in parts if p not in TRAIN_PARTS]
        if unknown:
            raise AdapterError(f"Unknown train part {unknown[0]!r}: choose from {', '.join(TRAIN_PARTS)}.")
        self.train_parts = [p for p in TRAIN_PARTS if p in parts]
        alpha = self.lora_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
            raise AdapterError(f"lora_alpha must be a positive number or None, not {self.lora_alpha!r}.")
        if not isinstance(self.init_weights, bool):
            raise AdapterError(f"init_weights must be True or False, not {self.init_weights!r} "
                               "(pick the method with mode).")
        if self.load == "":
            self.load = None

    @classmethod
    def from_dict(cls, d):
        """From this config's own keys, or the older repository's {"bone_mode", "bone_r",
        "bone_load"} form (mixing both is fine as long as they agree)."""
        if isinstance(d, BoneConfig):
            return d
        if not isinstance(d, dict):
            raise AdapterError(f"An adapter config must be a dict (or JSON object), not {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        out = {}
        for key, value in d.items():
            name = LEGACY_KEYS.get(key, key)
            if name not in known:
                raise AdapterError(f"Unknown adapter config key {key!r}: use {', '.join(sorted(known))} "
                                   f"(or the older {', '.join(LEGACY_KEYS)}).")
            if name in out and out[name] != value:
                raise AdapterError(f"The adapter config gives {name} twice with different values "
                                   f"({out[name]!r} and {value!r}).")
            out[name] = value
        return cls(**out)

    @classmethod
    def from_json(cls, text_or_path):
        """From a JSON object given as text or as the path of a file holding it."""
        text = text_or_path
        if os.path.isfile(os.fspath(text_or_path)):
            with open(text_or_path) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdapterError(f"The adapter config is not valid JSON ({e}).") from None
        return cls.from_dict(d)

    def to_dict(self):
        return asdict(self)

    def select(self, model):
        """{module path: r} of the nn.Linear modules this config adapts, in model order, or an
        AdapterError naming the pattern that selects nothing or the index out of range."""
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        _check_patterns(self.target_modules, names, "target_modules")
        chosen = [n for n in names if _spec_matches(self.target_modules, n)]
        if self.exclude_modules is not None:
            _check_patterns(self.exclude_modules, names, "exclude_modules")
            chosen = [n for n in chosen if not _spec_matches(self.exclude_modules, n)]
        if self.layers_to_transform is not None:
            n_layer = len(getattr(model, "blocks", ()))
            bad = [i for i in self.layers_to_transform if i >= n_layer]
            if bad:
                raise AdapterError(f"layers_to_transform names layer {bad[0]}, but the model has layers 0..{n_layer - 1}.")
            chosen = [n for n in chosen if _layer_of(n) in self.layers_to_transform]
        if not chosen:
            raise AdapterError("target_modules, exclude_modules and layers_to_transform together select no module to adapt.")
        ranks = OrderedDict()
        used = set()
        for n in chosen:
            ranks[n] = self.r
            for key, r in self.rank_pattern.items():
                if _name_matches(key, n) or _safe_fullmatch(key, n):
                    ranks[n] = r
                    used.add(key)
                    break
        unused = [k for k in self.rank_pattern if k not in used]
        if unused:
            raise AdapterError(f"rank_pattern key {unused[0]!r} matches none of the adapted modules.")
        return ranks


def _safe_fullmatch(pattern, name):
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _check_patterns(spec, names, what):
    if isinstance(spec, str):
        if not any(re.fullmatch(spec, n) for n in names):
            raise AdapterError(f"{what} pattern {spec!r} matches no linear module of the model (e.g. blocks.0.att.key).")
        return
    for p in spec:
        if not any(_name_matches(p, n) for n in names):
            raise AdapterError(f"{what} entry {p!r} matches no linear module of the model (e.g. blocks.0.att.key).")


def _as_config(config):
    if config is None:
        return BoneConfig()
    if isinstance(config, BoneConfig):
        return config
    if isinstance(config, dict):
        return BoneConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return BoneConfig.from_json(config)
    raise AdapterError(f"Pass a BoneConfig, a dict or a JSON string as the adapter config, not {type(config).__name__}.")


# ----------------------------------------------------------------------------------------------
# Applying, counting, merging, unloading

class _AdapterState:
    """Kept on the model as model._bone_adapters: what was applied, and the requires_grad flags
    from before, which unload/merge_and_unload put back."""

    def __init__(self, mode, train_parts, lora_alpha, requires_grad):
        self.mode, self.train_parts, self.lora_alpha = mode, list(train_parts), lora_alpha
        self.requires_grad = requires_grad


def adapter_layers(model):
    """{module path: adapter layer} in model order."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear))


def _state(model):
    state = getattr(model, "_bone_adapters", None)
    if state is None:
        raise AdapterError("The model has no adapters: apply_adapters (or load_adapter) first.")
    return state


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _build_layers(model, mode, ranks, init_weights=True, lora_alpha=None):
    """New adapter layers for {module path: r}, not yet in the model (so a failure changes nothing)."""
    layers = OrderedDict()
    for name, r in ranks.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            base = None
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"The model has no linear module {name} to adapt.")
        kwargs = {"lora_alpha": lora_alpha} if mode == "lora" else {}
        layers[name] = LAYERS[mode](base, r, name=name, init_weights=init_weights, **kwargs)
    return layers


def _attach(model, layers, mode, train_parts, lora_alpha):
    flags = OrderedDict((n, p.requires_grad) for n, p in model.named_parameters())
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if train_part_of(n) in train_parts:
            p.requires_grad_(True)
    for layer in layers.values():
        for p in layer.adapter_tensors().values():
            p.requires_grad_(True)
    model._bone_adapters = _AdapterState(mode, train_parts, lora_alpha, flags)


def apply_adapters(model, config=None, verbose=True):
    """Swap every targeted nn.Linear of `model` for an adapter layer of config.mode, freeze the
    rest except config.train_parts, load config.load if given, and print the trainable-parameter
    summary. Returns the model (changed in place). Nothing changes if any check fails."""
    config = _as_config(config)
    if getattr(model, "_bone_adapters", None) is not None:
        raise AdapterError("The model already has adapters: call unload or merge_and_unload first.")
    ranks = config.select(model)
    if "head" in ranks and "head" in config.train_parts:
        raise AdapterError("head is both an adapter target and a train part: choose one.")
    layers = _build_layers(model, config.mode, ranks, config.init_weights, config.lora_alpha)
    _attach(model, layers, config.mode, config.train_parts, config.lora_alpha)
    if config.load:
        try:
            load_adapter(model, config.load)
        except BaseException:
            unload(model)      # a file that does not fit leaves the model as it was
            raise
    if verbose:
        print_trainable_parameters(model)
    return model


def trainable_parameters(model):
    """(trainable, total) parameter counts, adapters included."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def print_trainable_parameters(model):
    """Print (and return) the line PEFT prints: trainable, total and the trainable share."""
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    print(line)
    return line


def _plain_linear(layer, weight, requires_grad):
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=requires_grad)
    linear.weight.requires_grad_(requires_grad)
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def _restore(model, replacements, state):
    for name, linear in replacements.items():
        _set_submodule(model, name, linear)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, True))
    del model._bone_adapters
    return model


def merge_and_unload(model, safe_merge=True):
    """Fold every adapter into its weight (merge_weight: fp32 math, one cast) and put plain
    nn.Linear modules back: the model's state dict is the official one again. safe_merge checks
    every adapter tensor and every merged weight for NaN/Inf before any weight is touched."""
    state = _state(model)
    layers = adapter_layers(model)
    if safe_merge:
        for name, layer in layers.items():
            for t, p in layer.adapter_tensors().items():
                if not torch.isfinite(p).all():
                    raise AdapterError(f"{name}.{t} holds NaN or Inf: nothing was merged.")
        for name, layer in layers.items():
            if not torch.isfinite(layer.merged_weight()).all():
                raise AdapterError(f"Merging {name} overflows its {layer.weight.dtype} weight to Inf: nothing was merged.")
    replacements = OrderedDict()
    for name, layer in layers.items():
        merged = layer.merged_weight()
        replacements[name] = _plain_linear(layer, merged, state.requires_grad.get(f"{name}.weight", True))
        _set_submodule(model, name, replacements[name])   # frees the old weight layer by layer
    return _restore(model, replacements, state)


def unload(model):
    """Remove every adapter without merging: the plain base model again (requires_grad flags as
    they were before apply_adapters)."""
    state = _state(model)
    replacements = OrderedDict((name, _plain_linear(layer, layer.weight, state.requires_grad.get(f"{name}.weight", True)))
                               for name, layer in adapter_layers(model).items())
    return _restore(model, replacements, state)


# ----------------------------------------------------------------------------------------------
# Adapter files

def _fingerprint(model):
    config = getattr(model, "config", None)
    return config.fingerprint() if config is not None and hasattr(config, "fingerprint") else None


def _detached(t):
    t = t.detach().to("cpu")
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous() else t


def adapter_state_dict(model):
    """The tensors save_adapter writes, with the metadata under META_KEY."""
    state = _state(model)
    layers = adapter_layers(model)
    adapter_keys = {f"{name}.{t}" for name, layer in layers.items() for t in layer.adapter_tensors()}
    sd = OrderedDict()
    for n, p in model.named_parameters():      # model order: official order, adapters beside their weights
        if n in adapter_keys or train_part_of(n) in state.train_parts:
            sd[n] = _detached(p)
    sd[META_KEY] = {
        "format": FILE_FORMAT, "version": FILE_VERSION, "mode": state.mode,
        "r": {name: layer.r for name, layer in layers.items()},
        "targets": list(layers), "train_parts": list(state.train_parts),
        "lora_alpha": state.lora_alpha, "fingerprint": _fingerprint(model),
    }
    return sd


def save_adapter(model, path):
    """Write the adapter and train-part tensors (official-style keys) plus metadata, atomically."""
    atomic_save(adapter_state_dict(model), path)


def _read_meta(meta, source):
    ok = (isinstance(meta, dict) and meta.get("format") == FILE_FORMAT and isinstance(meta.get("version"), int)
          and meta.get("mode") in MODES and isinstance(meta.get("r"), dict) and isinstance(meta.get("train_parts"), list))
    if not ok:
        raise AdapterError(f"{source} has a {META_KEY} entry that is not this project's adapter metadata.")
    if meta["version"] > FILE_VERSION:
        raise AdapterError(f"{source} is adapter format version {meta['version']}; this code reads up to "
                           f"{FILE_VERSION}: update it.")
    return meta


def _legacy_meta(sd, source):
    """Metadata for an adapter file of the older repository (bone/bat only): keys X.bone (or
    X.disha), perhaps all under 'model.'; mode and r read off the tensor shapes."""
    if sd and all(k.startswith("model.") for k in sd):
        sd = OrderedDict((k[len("model."):], v) for k, v in sd.items())
    sd = OrderedDict((k[:-len(".disha")] + ".bone" if k.endswith(".disha") else k, v) for k, v in sd.items())
    ranks, modes = OrderedDict(), set()
    for k, v in sd.items():
        if k.endswith(".bone") and isinstance(v, torch.Tensor):
            modes.add("bone" if v.dim() == 2 else "bat" if v.dim() == 3 else "?")
            ranks[k[:-len(".bone")]] = v.shape[0] if v.dim() == 2 else v.shape[-1]
    if not ranks or "?" in modes or len(modes) > 1:
        raise AdapterError(f"{source} has no {META_KEY} entry and no consistent .bone tensors: it is not an adapter file.")
    parts = sorted({train_part_of(k) for k in sd if train_part_of(k)}, key=TRAIN_PARTS.index)
    meta = {"format": FILE_FORMAT, "version": 0, "mode": modes.pop(), "r": dict(ranks), "targets": list(ranks),
            "train_parts": parts, "lora_alpha": None, "fingerprint": None}
    return sd, meta


def _describe(fp):
    return ", ".join(f"{k}={v}" for k, v in fp.items())


def read_adapter(path_or_state_dict, mmap=False):
    """(tensors, metadata, source) of an adapter file or state dict. Files of the older
    repository (no metadata) get theirs read off the tensor shapes. A file that is not an
    adapter is refused with one sentence (AdapterError, or CheckpointError when unreadable)."""
    if isinstance(path_or_state_dict, dict):
        sd, source = OrderedDict(path_or_state_dict), "the adapter state dict"
    else:
        source = os.fspath(path_or_state_dict)
        sd = OrderedDict(load_state_dict(source, mmap=mmap))
    if META_KEY in sd:
        meta = _read_meta(sd.pop(META_KEY), source)
    else:
        sd, meta = _legacy_meta(sd, source)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterError(f"{source} holds a non-tensor value under {bad[0]!r}: it is not an adapter file.")
    return sd, meta, source


def _check_fingerprint(meta, mine, source):
    theirs = meta.get("fingerprint")
    if theirs is not None and mine is not None and dict(theirs) != mine:
        diff = {k: v for k, v in theirs.items() if mine.get(k) != v}
        raise AdapterError(f"{source} was made for a model with {_describe(diff)}, but this model has "
                           f"{_describe({k: mine.get(k) for k in diff})}: it cannot be loaded here.")


def load_adapter(model, path_or_state_dict, verbose=False):
    """Load an adapter file into `model`. On a plain model the adapters named in the file are
    applied first (mode, r per module, train parts from its metadata); on an adapted model the
    file must match its mode, modules and ranks. Every tensor in the file must find a home with
    the same shape, and every adapter tensor of the model must be in the file; a file made for
    another model shape or mode is refused with one sentence. Nothing changes if a check fails.
    Returns the model."""
    sd, meta, source = read_adapter(path_or_state_dict)
    _check_fingerprint(meta, _fingerprint(model), source)

    state = getattr(model, "_bone_adapters", None)
    if state is None:
        layers = _build_layers(model, meta["mode"], OrderedDict(meta["r"]), True, meta.get("lora_alpha"))
    else:
        layers = adapter_layers(model)
        if meta["mode"] != state.mode:
            raise AdapterError(f"{source} holds {meta['mode']} adapters, but this model has {state.mode} adapters: "
                               "apply the file's mode (or load it into a plain model).")
        ranks = {n: m.r for n, m in layers.items()}
        if dict(meta["r"]) != ranks:
            theirs_r, mine_r = dict(meta["r"]), ranks
            names = list(mine_r) + [n for n in theirs_r if n not in mine_r]
            name = next(n for n in names if theirs_r.get(n) != mine_r.get(n))   # the first, in model order
            raise AdapterError(f"{source} adapts {name} with r = {theirs_r.get(name, 'none')}, but this model has "
                               f"r = {mine_r.get(name, 'none')} there: its adapters were set up differently.")
        if meta["mode"] == "lora" and meta.get("lora_alpha") != state.lora_alpha:
            raise AdapterError(f"{source} was trained with lora_alpha = {meta.get('lora_alpha')}, but this model's "
                               f"LoRA layers use {state.lora_alpha}.")

    homes = OrderedDict()
    for name, layer in layers.items():
        for t, p in layer.adapter_tensors().items():
            homes[f"{name}.{t}"] = p
    adapter_keys = set(homes)
    params = dict(model.named_parameters())
    for n, p in params.items():
        if train_part_of(n) is not None and n not in homes:
            homes[n] = p
    for k, v in sd.items():
        if k not in homes:
            raise AdapterError(f"{source} has a tensor {k} that belongs to no adapter or train part of this model.")
        if tuple(v.shape) != tuple(homes[k].shape):
            raise AdapterError(f"{source} has {k} of shape {list(v.shape)}, but this model's is {list(homes[k].shape)}.")
    missing = [k for k in adapter_keys if k not in sd]
    missing += [n for n in params if train_part_of(n) in meta["train_parts"] and n not in sd]
    if missing:
        raise AdapterError(f"{source} lacks {missing[0]}, which its metadata says it holds: the file is incomplete.")

    if state is None:
        if "head" in layers and "head" in meta["train_parts"]:
            raise AdapterError(f"{source} both adapts and trains head: it is inconsistent.")
        _attach(model, layers, meta["mode"], meta["train_parts"], meta.get("lora_alpha"))
    with torch.no_grad():
        for k, v in sd.items():
            homes[k].copy_(v)
    if verbose:
        print(f"loaded {len(sd)} tensors from {source}")
    return model


def plan_merge(base_shapes, fingerprint, path_or_state_dict):
    """What merging an adapter into a base checkpoint changes, checked before any work, without
    building a model. base_shapes: {official key: shape} of the base; fingerprint: its
    RWKV6Config.fingerprint(). Returns (mode, plan), plan = {base key: change} in base order,
    where a change is ("merge", adapter tensor or (lora_A, lora_B), scaling) for an adapted
    weight and ("replace", tensor) for a train-part tensor. The file is read with mmap; the
    same refusals as load_adapter, each one sentence (AdapterError)."""
    sd, meta, source = read_adapter(path_or_state_dict, mmap=True)
    _check_fingerprint(meta, fingerprint, source)
    mode = meta["mode"]
    changes, used = {}, set()
    for name, r in meta["r"].items():
        key = f"{name}.weight"
        if key not in base_shapes or len(base_shapes[key]) != 2:
            raise AdapterError(f"{source} adapts {name}, but the base model has no such linear weight.")
        out_f, in_f = base_shapes[key]
        if mode == "bat" and (in_f % r or out_f % r):
            raise AdapterError(f"{source} holds a bat adapter of r = {r} for {name}, whose sizes "
                               f"{in_f} -> {out_f} are not multiples of r: the file is inconsistent.")
        tensors = []
        for t, shape in adapter_shapes(mode, r, out_f, in_f).items():
            k = f"{name}.{t}"
            if k not in sd:
                raise AdapterError(f"{source} lacks {k}, which its metadata says it holds: the file is incomplete.")
            if tuple(sd[k].shape) != tuple(shape):
                raise AdapterError(f"{source} has {k} of shape {list(sd[k].shape)}, but the base model needs {list(shape)}.")
            tensors.append(sd[k])
            used.add(k)
        lora_alpha = meta.get("lora_alpha")
        scaling = 1.0 if mode != "lora" or lora_alpha is None else lora_alpha / r
        changes[key] = ("merge", tuple(tensors) if mode == "lora" else tensors[0], scaling)
    for k, v in sd.items():
        if k in used:
            continue
        if k not in base_shapes or train_part_of(k) is None:
            raise AdapterError(f"{source} has a tensor {k} that belongs to no adapter or train part of the base model.")
        if tuple(v.shape) != tuple(base_shapes[k]):
            raise AdapterError(f"{source} has {k} of shape {list(v.shape)}, but the base model's is {list(base_shapes[k])}.")
        if k in changes:
            raise AdapterError(f"{source} both adapts and trains {k}: it is inconsistent.")
        changes[k] = ("replace", v)
    missing = [k for k in base_shapes if train_part_of(k) in meta["train_parts"] and k not in changes]
    if missing:
        raise AdapterError(f"{source} lacks {missing[0]}, which its metadata says it holds: the file is incomplete.")
    return mode, OrderedDict((k, changes[k]) for k in base_shapes if k in changes)
