"""What apply_adapters leaves on a model, and the steps shared by applying adapters and loading
an adapter file: finding the adapter layers, building new ones, attaching them. The bottom of the
package's imports: model.py (applying, merging) and files.py (adapter files) both build on it,
and model.py on files.py, never the other way round."""
from collections import OrderedDict

import torch.nn as nn

from .base_hash import base_record, official_tensors
from .config import AdapterError, train_part_of
from .layers import LAYERS, AdapterLinear
from ..model import add_time_state


class _AdapterState:
    """Kept on the model as model._bone_adapters: what was applied, and the requires_grad flags
    from before, which unload/merge_and_unload put back."""

    def __init__(self, mode, train_parts, lora_alpha, requires_grad, base_weights=None):
        self.mode, self.train_parts, self.lora_alpha = mode, list(train_parts), lora_alpha
        self.requires_grad = requires_grad
        self.base_weights = base_weights    # base_hash.base_record of the base as it was when applied


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


def _build_layers(model, mode, ranks, init_weights=True, lora_alpha=None, mini_r=None):
    """New adapter layers for {module path: r}, not yet in the model (so a failure changes nothing)."""
    layers = OrderedDict()
    for name, r in ranks.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            base = None
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"The model has no linear module {name} to adapt.")
        kwargs = {"lora_alpha": lora_alpha} if mode == "lora" else {"mini_r": mini_r} if mode == "mini" else {}
        layers[name] = LAYERS[mode](base, r, name=name, init_weights=init_weights, **kwargs)
    return layers


def _attach(model, layers, mode, train_parts, lora_alpha, states=None):
    flags = OrderedDict((n, p.requires_grad) for n, p in model.named_parameters())
    # The base's fingerprint now, before src/quant.py may hold it quantized; none for a base that already is.
    base = None if getattr(model, "_base_quant", None) else base_record(
        official_tensors(dict(model.named_parameters()), getattr(model, "config", None)),
        {name: layer.r for name, layer in layers.items()}, train_parts)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    if "state" in train_parts:      # state tuning: each layer's initial WKV state, made here (zero: the base's start)
        add_time_state(model, states)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if train_part_of(n) in train_parts:
            p.requires_grad_(True)
    for layer in layers.values():
        for p in layer.adapter_tensors().values():
            p.requires_grad_(True)
    model._bone_adapters = _AdapterState(mode, train_parts, lora_alpha, flags, base)
