"""The adapter layers: a frozen nn.Linear (same `weight` Parameter, so state-dict keys stay
official) with adapter tensors beside it, computing through .functional.

Dtypes: adapter parameters are stored in the base weight's dtype when that is fp32 or fp64, and
in fp32 otherwise (bf16/fp16 bases), so small updates are not rounded away. In the forward pass
they are cast to the activations' dtype (as autocast does; under torch.autocast, to its dtype).

A base held quantized (src/quant.py) replaces `weight` by `quantized`, which the layer
dequantizes per forward pass; the adapter math is the same.
"""
import math
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.nn as nn

from .config import AdapterError
from .functional import adapter_shapes, bat_linear, bone_linear, lora_linear, merge_weight, mini_linear

TENSOR_NAMES = {"bone": ("bone",), "bat": ("bone",), "lora": ("lora_A", "lora_B"), "mini": ("bone",)}


def _adapter_dtype(weight):
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def compute_dtype(x):
    """The dtype a layer computes in under torch.autocast, or None outside it."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


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
        shape = adapter_shapes(self.mode, self.r, self.out_features, self.in_features,
                               getattr(self, "mini_r", None))[tensor_name]
        return nn.Parameter(torch.zeros(shape, dtype=_adapter_dtype(self.weight), device=self.weight.device))

    def base_weight(self):
        """W: the frozen weight, or, when the base is held quantized, W dequantized in the dtype
        it was held in (a new tensor)."""
        quantized = getattr(self, "quantized", None)
        return self.weight if quantized is None else quantized.dequantize()

    def _weight_for(self, dtype):
        # A quantized base is dequantized straight into the compute dtype, for this pass only.
        quantized = getattr(self, "quantized", None)
        return nullcontext(self.weight) if quantized is None else quantized.dequantized(dtype)

    def forward(self, x):
        dtype = compute_dtype(x)
        with self._weight_for(dtype or x.dtype) as weight:
            if dtype is None:
                return self._forward(x, weight, self.bias, x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                bias = None if self.bias is None else self.bias.to(dtype)
                return self._forward(x.to(dtype), weight.to(dtype), bias, dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, r={self.r}"


class BoneLinear(AdapterLinear):
    mode = "bone"
    _linear = staticmethod(bone_linear)

    def __init__(self, base, r, name="", init_weights=True):
        super().__init__(base, r, name)
        self.bone = self._new("bone")
        if not init_weights:
            nn.init.kaiming_uniform_(self.bone, a=math.sqrt(5))

    def _forward(self, x, weight, bias, dtype):
        return self._linear(x, weight, self.bone.to(dtype), bias)

    def merged_weight(self):
        return merge_weight(self.base_weight(), self.bone, self.mode)


class BatLinear(BoneLinear):
    """The same tensor name and life as bone's; only the product (and its shape rule) differ."""
    mode = "bat"
    _linear = staticmethod(bat_linear)

    def __init__(self, base, r, name="", init_weights=True):
        if base.in_features % r or base.out_features % r:
            g = math.gcd(base.in_features, base.out_features)
            hint = max(d for d in range(1, min(r, g) + 1) if g % d == 0)
            raise AdapterError(f"bat mode needs both sizes divisible by r, but {name or 'a module'} is "
                               f"{base.in_features} -> {base.out_features} and r = {r}: use r = {hint} there "
                               "(rank_pattern), exclude it, or use bone mode.")
        super().__init__(base, r, name, init_weights)


class MiniLinear(BoneLinear):
    """PEFT's MiSS "mini": a [r, mini_r] bone tensor tiled along the outputs (zero at the start,
    as PEFT's reset_mini_parameters)."""
    mode = "mini"
    _linear = staticmethod(mini_linear)

    def __init__(self, base, r, name="", init_weights=True, mini_r=None):
        if not mini_r or base.out_features % mini_r:
            raise AdapterError(f"mini mode needs mini_r dividing the output size, but {name or 'a module'} has "
                               f"{base.out_features} outputs and mini_r = {mini_r}: choose a divisor of "
                               f"{base.out_features}, or exclude the module.")
        self.mini_r = mini_r
        super().__init__(base, r, name, init_weights)

    def extra_repr(self):
        return super().extra_repr() + f", mini_r={self.mini_r}"


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
        return merge_weight(self.base_weight(), (self.lora_A, self.lora_B), "lora", self.scaling)

    def extra_repr(self):
        return super().extra_repr() + f", scaling={self.scaling:g}"


LAYERS = {"bone": BoneLinear, "bat": BatLinear, "lora": LoraLinear, "mini": MiniLinear}
