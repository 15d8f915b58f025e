"""Applying adapters to an RWKV model (either family), counting, merging in memory and unloading."""
from collections import OrderedDict

import torch
import torch.nn as nn

from ..model import remove_time_state
from .config import AdapterError, as_config
from .files import load_adapter
from .state import _attach, _build_layers, _set_submodule, _state, adapter_layers  # noqa: F401 (adapter_layers: API)


def apply_adapters(model, config=None, verbose=True):
    """Swap every targeted nn.Linear of `model` for an adapter layer of config.mode, freeze the
    rest except config.train_parts, load config.load if given, and print the trainable-parameter
    summary. Returns the model (changed in place). Nothing changes if any check fails."""
    config = as_config(config)
    if getattr(model, "_bone_adapters", None) is not None:
        raise AdapterError("The model already has adapters: call unload or merge_and_unload first.")
    ranks = config.select(model)
    if "head" in ranks and "head" in config.train_parts:
        raise AdapterError("head is both an adapter target and a train part: choose one.")
    layers = _build_layers(model, config.mode, ranks, config.init_weights, config.lora_alpha, config.mini_r)
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


def _restore(model, replacements, state, keep_states):
    for name, linear in replacements.items():
        _set_submodule(model, name, linear)
    if not keep_states and "state" in state.train_parts:
        remove_time_state(model)
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
                raise AdapterError(f"Merging {name} overflows its {layer.base_weight().dtype} weight to Inf: nothing was merged.")
    replacements = OrderedDict()
    for name, layer in layers.items():
        merged = layer.merged_weight()
        replacements[name] = _plain_linear(layer, merged, state.requires_grad.get(f"{name}.weight", True))
        _set_submodule(model, name, replacements[name])   # frees the old weight layer by layer
    return _restore(model, replacements, state, keep_states=True)    # the trained initial states stay (frozen)


def unload(model):
    """Remove every adapter without merging: the plain base model again (requires_grad flags as
    they were before apply_adapters)."""
    state = _state(model)
    replacements = OrderedDict((name, _plain_linear(layer, layer.base_weight(), state.requires_grad.get(f"{name}.weight", True)))
                               for name, layer in adapter_layers(model).items())
    return _restore(model, replacements, state, keep_states=False)
