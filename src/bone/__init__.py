"""Bone adapters for RWKV-6 (modes bone and bat, and LoRA as a baseline), in the spirit of PEFT's
tuners, one idea per module:

- ``config``: BoneConfig, target selection, train parts
- ``functional``: the adapter math, its only home (the products, their backward passes, the merge)
- ``layers``: BoneLinear, BatLinear, LoraLinear (a frozen nn.Linear with adapter tensors beside it)
- ``base_hash``: the fingerprint of the base's weights an adapter file records
- ``state``: what apply_adapters leaves on a model; building and attaching adapter layers
- ``files``: adapter files (ours and the older repository's), load_adapter, plan_merge, check_base
- ``model``: apply_adapters, merge_and_unload, unload, counting

Imports go one way: config, functional, layers <- base_hash <- state <- files <- model (no module imports
one that imports it back; tests/test_no_surprises2.py reads them).

Usage::

    from src.bone import BoneConfig, apply_adapters, save_adapter, load_adapter, merge_and_unload

    model = RWKV6.from_checkpoint("base.pth", dtype=torch.float32)
    apply_adapters(model, BoneConfig(r=64, mode="bone", train_parts=["time", "ln"]))
    ...train...
    save_adapter(model, "adapter.pth")           # adapter + train-part tensors, official-style keys
    load_adapter(RWKV6.from_checkpoint("base.pth"), "adapter.pth")   # applies and loads
    merge_and_unload(model)                       # plain RWKV6 holding the merged weights
"""
from .config import (DEFAULT_TARGETS, LEGACY_KEYS, MODES, TRAIN_PARTS, AdapterError, BoneConfig, as_config,
                     train_part_of)
from .files import (FILE_FORMAT, FILE_FORMATS, FILE_VERSION, META_KEY, adapter_meta, adapter_state_dict, check_base,
                    load_adapter, plan_merge, read_adapter, save_adapter)
from .functional import (adapter_shapes, bat_linear, bat_merged_weight, bone_linear, lora_linear, merge_weight,
                         merged_exact)
from .layers import LAYERS, TENSOR_NAMES, AdapterLinear, BatLinear, BoneLinear, LoraLinear
from .model import (adapter_layers, apply_adapters, merge_and_unload, print_trainable_parameters,
                    trainable_parameters, unload)
