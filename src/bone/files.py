"""Adapter files: writing and reading them (this project's and the older repository's), loading
one into a model, and planning a merge into a base checkpoint without building a model.

A file is a flat dict of tensors loadable with ``torch.load(weights_only=True)``:
``blocks.3.att.key.bone`` (both bone and bat modes), ``blocks.3.att.key.lora_A`` / ``.lora_B``,
the train-part tensors under their official names (``blocks.3.att.time_decay``, ``emb.weight``...),
and under the reserved key ``__bone_meta__`` a dict of plain Python values: format, version,
mode, r per module, target list, train parts, lora_alpha, the base model's shape fingerprint, and
the quantization the base was held in while training (quant: none, nf4, fp4 or int8, and the
weight keys held so under quantized; files without it read as none).
"""
import os
from collections import OrderedDict

import torch

from ..checkpoint import atomic_save, check_finite
from ..validate import check_fields, is_int, is_number, is_str_list, non_finite, show
from .base_hash import SCHEME, looks_merged, official_tensors, weights_hash
from .config import MODES, TRAIN_PARTS, AdapterError, train_part_of
from .functional import adapter_shapes
from ..model import new_time_states
from ..state_file import check_family, load_state, recorded_family
from .state import _attach, _build_layers, _state, adapter_layers

META_KEY = "__bone_meta__"
FILE_FORMAT = "rwkv6-adapter"
# The format field names the family; RWKV-7 files written before it did say rwkv6-adapter and still load.
FILE_FORMATS = {"x060": FILE_FORMAT, "x070": "rwkv7-adapter"}
FILE_VERSION = 1


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
    sd[META_KEY] = adapter_meta(model)
    return sd


def adapter_meta(model):
    """What an adapter file records of the model it was trained on: the adapter settings, the
    base's shape (fingerprint) and the quantization of the base."""
    state, layers = _state(model), adapter_layers(model)
    quant = getattr(model, "_base_quant", None) or {"type": "none", "keys": []}   # set by src/quant.py
    base = getattr(state, "base_weights", None)
    return {
        "format": FILE_FORMATS.get((_fingerprint(model) or {}).get("family", "x060"), FILE_FORMAT),
        "version": FILE_VERSION, "mode": state.mode,
        "r": {name: layer.r for name, layer in layers.items()},
        "targets": list(layers), "train_parts": list(state.train_parts),
        "lora_alpha": state.lora_alpha, "fingerprint": _fingerprint(model),
        "quant": quant["type"], "quantized": list(quant["keys"]),
        **({"mini_r": next(iter(layers.values())).mini_r} if state.mode == "mini" else {}),
        **({"base_weights": base} if base is not None else {}),
    }


def save_adapter(model, path):
    """Write the adapter and train-part tensors (official-style keys) plus metadata, atomically."""
    atomic_save(adapter_state_dict(model), path)


QUANT_NAMES = ("none", "nf4", "fp4", "int8")     # src/quant.py's QUANT_TYPES (not imported: it imports this package)


def _is_ranks(v):
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def _is_fingerprint(v):
    return v is None or (isinstance(v, dict) and bool(v) and all(
        isinstance(k, str) and (is_int(x, 1) or isinstance(x, str)) for k, x in v.items()))


def _is_base_weights(v):
    """base_hash.base_record's form: scheme, sha256 and {module: [[row, column, [numbers]], ...]}."""
    def segment(s):
        return (isinstance(s, list) and len(s) == 3 and is_int(s[0], 0) and is_int(s[1], 0) and isinstance(s[2], list)
                and bool(s[2]) and all(is_number(x) for x in s[2]))
    return (isinstance(v, dict) and set(v) == {"scheme", "sha256", "probe"} and isinstance(v["scheme"], str)
            and isinstance(v["sha256"], str) and isinstance(v["probe"], dict)
            and all(isinstance(k, str) and isinstance(s, list) and all(map(segment, s)) for k, s in v["probe"].items()))


FORMAT_NAMES = tuple(FILE_FORMATS.values())

# Every field of __bone_meta__: (required, what it must be, test). quant, quantized and base_weights
# came later: files written before have none of them (quant none; the base cannot be checked).
META_SCHEMA = {
    "format": (True, f"one of {', '.join(FORMAT_NAMES)}", lambda v: v in FORMAT_NAMES),
    "version": (True, "a whole number", lambda v: is_int(v, 0)),
    "mode": (True, f"one of {', '.join(MODES)}", lambda v: isinstance(v, str) and v in MODES),
    "r": (True, "a dict of module name -> r", _is_ranks),
    "targets": (True, "a list of module names", is_str_list),
    "train_parts": (True, f"a list of {', '.join(TRAIN_PARTS)}", lambda v: is_str_list(v, TRAIN_PARTS, unique=True)),
    "lora_alpha": (True, "a positive number or None", lambda v: v is None or is_number(v, positive=True)),
    "fingerprint": (True, "a dict of the base's sizes or None", _is_fingerprint),
    "quant": (False, f"one of {', '.join(QUANT_NAMES)}", lambda v: isinstance(v, str) and v in QUANT_NAMES),
    "quantized": (False, "a list of weight names", is_str_list),
    "mini_r": (False, "a positive integer (mode mini)", lambda v: is_int(v, 1)),
    "base_weights": (False, "a fingerprint of the base's weights", _is_base_weights),
}


def _read_meta(meta, source):
    """The metadata of one of this project's adapter files, every field checked by type and shape
    (one sentence naming the file and the field otherwise), the later fields filled in."""
    where = f"{source} has adapter metadata"
    if not isinstance(meta, dict) or meta.get("format") not in FORMAT_NAMES:
        raise AdapterError(f"{source} has a {META_KEY} entry that is not this project's adapter metadata.")
    if is_int(meta.get("version")) and meta["version"] > FILE_VERSION:
        raise AdapterError(f"{source} is adapter format version {meta['version']}; this code reads up to "
                           f"{FILE_VERSION}: update it.")
    check_fields(meta, META_SCHEMA, AdapterError, where)
    bad_r = [k for k, r in meta["r"].items() if not is_int(r, 1)]
    if bad_r:
        raise AdapterError(f"{source} records r = {show(meta['r'][bad_r[0]])} for {bad_r[0]}, which is not a positive "
                           "integer: the file is damaged.")
    if meta["targets"] != list(meta["r"]):
        raise AdapterError(f"{where} whose targets field does not list the modules its r field names: "
                           "the file is damaged.")
    if not meta["r"] and not meta["train_parts"]:
        raise AdapterError(f"{where} that names no adapter and no train part: the file holds nothing to load.")
    if meta.get("quant", "none") == "none" and meta.get("quantized"):
        raise AdapterError(f"{where} listing quantized weights under quant none: the file is damaged.")
    family = None if meta["fingerprint"] is None else meta["fingerprint"].get("family", "x060")
    if meta["format"] == FILE_FORMATS["x070"] and family not in (None, "x070"):
        raise AdapterError(f"{where} whose format {meta['format']!r} names RWKV-7 but whose fingerprint is of an "
                           f"{family} model: the file is damaged.")
    if (meta["mode"] == "mini") != ("mini_r" in meta):
        raise AdapterError(f"{where} {'without' if meta['mode'] == 'mini' else 'with'} mini_r for mode "
                           f"{meta['mode']}: the file is damaged.")
    return {"quant": "none", "quantized": [], **meta}     # written before quantization existed: none


def _legacy_meta(sd, source, family=None):
    """Metadata for an adapter file of the older repository (bone/bat only): keys X.bone (or
    X.disha), perhaps all under 'model.'; mode and r read off the tensor shapes. A state file (ours
    or the older repository's, time_state tensors alone) gets state_family: the family it records
    (`family`, src/state_file.py), or None."""
    if sd and all(k.startswith("model.") for k in sd):
        sd = OrderedDict((k[len("model."):], v) for k, v in sd.items())
    if sd and all(train_part_of(k) == "state" for k in sd):
        # The older repository's --peft state file (RWKV-Runner's state file): time_state tensors alone.
        return sd, {"format": FILE_FORMAT, "version": 0, "mode": "bone", "r": {}, "targets": [], "train_parts": ["state"],
                    "lora_alpha": None, "fingerprint": None, "quant": None, "quantized": [], "state_family": family}
    sd = OrderedDict((k[:-len(".disha")] + ".bone" if k.endswith(".disha") else k, v) for k, v in sd.items())
    ranks, modes = OrderedDict(), set()
    for k, v in sd.items():
        if k.endswith(".bone") and isinstance(v, torch.Tensor):
            modes.add("bone" if v.dim() == 2 else "bat" if v.dim() == 3 else "?")
            ranks[k[:-len(".bone")]] = v.shape[0] if v.dim() == 2 else v.shape[-1] if v.dim() else 0
    if not ranks or "?" in modes or len(modes) > 1:
        raise AdapterError(f"{source} has no {META_KEY} entry and no consistent .bone tensors: it is not an adapter file.")
    empty = [k for k, r in ranks.items() if r < 1]
    if empty:
        raise AdapterError(f"{source} has an empty tensor {empty[0]}.bone, which gives r = 0: the file is damaged.")
    parts = sorted({train_part_of(k) for k in sd if train_part_of(k)}, key=TRAIN_PARTS.index)
    meta = {"format": FILE_FORMAT, "version": 0, "mode": modes.pop(), "r": dict(ranks), "targets": list(ranks),
            "train_parts": parts, "lora_alpha": None, "fingerprint": None,
            "quant": None, "quantized": []}      # the older repository does not record its --quant
    return sd, meta


def _describe(fp):
    return ", ".join(f"{k}={v}" for k, v in fp.items())


def read_adapter(path_or_state_dict, mmap=False):
    """(tensors, metadata, source) of an adapter file or state dict. Files of the older
    repository (no metadata) get theirs read off the tensor shapes. A file that is not an
    adapter is refused with one sentence (AdapterError, or CheckpointError when unreadable)."""
    if isinstance(path_or_state_dict, dict):
        loaded, source = path_or_state_dict, "the adapter state dict"
    else:
        source = os.fspath(path_or_state_dict)
        # load_state: a web-rwkv-state file (safetensors) is read too, as the state file it is.
        loaded = load_state(source, mmap=mmap, what="an adapter file written by train.py (adapter-STEP.pth)")
    if not isinstance(loaded, dict):
        raise AdapterError(f"{source} holds {show(loaded)}, not a dict of tensors: it is not an adapter file.")
    sd = OrderedDict(loaded)
    odd = [k for k in sd if not isinstance(k, str)]
    if odd:
        raise AdapterError(f"{source} holds a tensor under the key {show(odd[0])}, not a name: it is not an adapter file.")
    if META_KEY in sd:
        meta = _read_meta(sd.pop(META_KEY), source)
    else:
        sd, meta = _legacy_meta(sd, source, recorded_family(loaded, source))
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterError(f"{source} holds a non-tensor value under {bad[0]!r}: it is not an adapter file.")
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise AdapterError(f"{source} holds {bad[0]} as {str(sd[bad[0]].dtype).replace('torch.', '')}, not as "
                           "floating-point numbers: the file is damaged.")
    return sd, meta, source


def _check_fingerprint(meta, mine, source):
    if "state_family" in meta and mine is not None:     # a state file: the family it records, or a note
        check_family(meta["state_family"], mine.get("family", "x060"), source)
    theirs = meta.get("fingerprint")
    if theirs is not None and mine is not None:
        # An RWKV-6 fingerprint names no family (files from before RWKV-7 support stay valid).
        theirs, mine = {"family": "x060", **dict(theirs)}, {"family": "x060", **mine}
    if theirs is not None and mine is not None and theirs != mine:
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
    states = {}
    if state is None:
        layers = _build_layers(model, meta["mode"], OrderedDict(meta["r"]), True, meta.get("lora_alpha"),
                               meta.get("mini_r"))
        if "state" in meta["train_parts"]:
            states = new_time_states(model)     # attached only once every check has passed
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
    params = {**dict(model.named_parameters()), **states}
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
    for k, v in sd.items():
        if non_finite(v):
            raise AdapterError(f"{source} holds {non_finite(v)} NaN or Inf values in {k}: the file is damaged.")

    if state is None:
        if "head" in layers and "head" in meta["train_parts"]:
            raise AdapterError(f"{source} both adapts and trains head: it is inconsistent.")
        _attach(model, layers, meta["mode"], meta["train_parts"], meta.get("lora_alpha"), states)
    with torch.no_grad():
        for k, v in sd.items():
            homes[k].copy_(v)
    if verbose:
        print(f"loaded {len(sd)} tensors from {source}")
    return model


def plan_merge(base_shapes, fingerprint, path_or_state_dict):
    """What merging an adapter into a base checkpoint changes, checked before any work, without
    building a model. base_shapes: {official key: shape} of the base; fingerprint: its
    config.fingerprint(). Returns (mode, plan), plan = {base key: change} in base order,
    where a change is ("merge", adapter tensor or (lora_A, lora_B), scaling) for an adapted
    weight, ("replace", tensor) for a train-part tensor and ("state", tensor) for a trained initial
    state the base has no key for (blocks.{i}.att.time_state, after the base's keys). The file is read with mmap; the
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
        if mode == "mini" and out_f % meta["mini_r"]:
            raise AdapterError(f"{source} holds a mini adapter of mini_r = {meta['mini_r']} for {name}, whose "
                               f"{out_f} outputs are not a multiple of it: the file is inconsistent.")
        for t, shape in adapter_shapes(mode, r, out_f, in_f, meta.get("mini_r")).items():
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
    heads = base_shapes.get("blocks.0.att.time_faaaa") or base_shapes.get("blocks.0.att.r_k")
    n_layer = len([k for k in base_shapes if k.endswith(".ln1.weight")])
    states = [f"blocks.{i}.att.time_state" for i in range(n_layer)] if "state" in meta["train_parts"] else []
    for k, v in sd.items():
        if k in used:
            continue
        if k in states and k not in base_shapes:
            # A trained initial state: no base tensor to replace; merge.py puts it beside (or, RWKV-6, into) the model.
            if heads is None or tuple(v.shape) != (heads[0], heads[1], heads[1]):
                raise AdapterError(f"{source} has {k} of shape {list(v.shape)}, but the base model's heads need "
                                   f"{[heads[0], heads[1], heads[1]] if heads else '[H, N, N]'}.")
            changes[k] = ("state", v)
            continue
        if k not in base_shapes or train_part_of(k) is None:
            raise AdapterError(f"{source} has a tensor {k} that belongs to no adapter or train part of the base model.")
        if tuple(v.shape) != tuple(base_shapes[k]):
            raise AdapterError(f"{source} has {k} of shape {list(v.shape)}, but the base model's is {list(base_shapes[k])}.")
        if k in changes:
            raise AdapterError(f"{source} both adapts and trains {k}: it is inconsistent.")
        changes[k] = ("replace", v)
    missing = [k for k in list(base_shapes) + states if train_part_of(k) in meta["train_parts"] and k not in changes]
    if missing:
        raise AdapterError(f"{source} lacks {missing[0]}, which its metadata says it holds: the file is incomplete.")
    order = list(base_shapes) + [k for k in states if k not in base_shapes]     # states after the model's own keys
    return mode, OrderedDict((k, changes[k]) for k in order if k in changes)


def check_base(adapter, base_sd, config, base_name, allow_other_base=False):
    """Whether base_sd ({official key: tensor} as its file stores them, such as load_checkpoint's;
    config: its config) is the base `adapter` (a path or state dict) was trained on, by the fingerprint of its weights
    the file records (base_hash). Another base is refused with one sentence (AdapterError), which
    says so when it looks like this adapter already merged; with allow_other_base it is a note.
    Returns a note to print (also for a file that records no fingerprint) or None. The adapter
    is checked against the base's shapes first, as plan_merge does."""
    mode, plan = plan_merge(OrderedDict((k, tuple(v.shape)) for k, v in base_sd.items()), config.fingerprint(), adapter)
    meta, source = read_adapter(adapter, mmap=True)[1:]
    record = meta.get("base_weights")
    if record is None or record["scheme"] != SCHEME:
        return f"note: {source} records no base fingerprint: cannot check that {base_name} is the base it was trained on."
    if weights_hash(official_tensors(base_sd, config), meta["train_parts"]) == record["sha256"]:
        return None
    for key, t in base_sd.items():      # a damaged base differs too: naming the tensor says more
        check_finite(key, t, base_name)
    if looks_merged(record["probe"], base_sd, plan, mode):
        what, fix = (f"{base_name} looks like {source} already merged into its base (its weights are the recorded base's "
                     "plus this adapter's update)", "give the original base model")
    else:
        what, fix = (f"{base_name} is not the base model {source} was trained on (its weights differ from the "
                     "fingerprint the adapter records)", "give that base")
    if allow_other_base:
        return f"note: {what}; applying the adapter to it anyway, as --allow_other_base asks."
    raise AdapterError(f"{what}: {fix}, or pass --allow_other_base to apply the adapter to it anyway.")
