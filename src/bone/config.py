"""What to adapt and how: BoneConfig (PEFT's options, for RWKV-6 and RWKV-7), target selection, and the
train parts (base parameters that train beside the adapters)."""
import json
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

import torch.nn as nn

MODES = ("bone", "bat", "lora", "mini")
# The 8 RWKV-6 projections; a model's own defaults are its config's default_targets (RWKV-7 has
# no att.gate or ffn.receptance), which an unset target_modules means.
DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output",
                   "ffn.key", "ffn.receptance", "ffn.value")
TRAIN_PARTS = ("time", "ln", "emb", "head", "state")
LEGACY_KEYS = {"bone_mode": "mode", "bone_r": "r", "bone_load": "load"}


class AdapterError(ValueError):
    """A bad adapter config, file or model; the message is one sentence that says why."""


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


# RWKV-7's counterparts of RWKV-6's time_* parameters: the token-shift mixes, the decay,
# in-context rate, value-residual and gate low-rank parts, and the k_k / k_a / r_k vectors.
_X070_TIME = re.compile(r"\.att\.(x_[rwkvag]|[wav][012]|g[12]|k_k|k_a|r_k)$|\.ffn\.x_k$")


def train_part_of(param_name):
    """Which train part a parameter belongs to (time, ln, emb, head, state), or None."""
    if re.fullmatch(r"blocks\.\d+\.att\.time_state", param_name):
        return "state"      # the trained initial WKV state (state tuning), not a time-mix weight
    if ".time_" in param_name:
        return "time"
    if _X070_TIME.search(param_name):
        # Layer 0 of RWKV-7 keeps its own v: its v0, v1, v2 are stored but never used, so never trained.
        return None if re.match(r"blocks\.0\.att\.v[012]$", param_name) else "time"
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
      regular expression (a string: full match), or "all-linear"; default (None) the model's
      projections: the 8 of RWKV-6, the 6 of RWKV-7 (its config's default_targets).
      A list entry or a regex that matches no module is an error.
    exclude_modules: the same forms; modules it matches are left alone.
    layers_to_transform: a layer index or a list of them; only blocks.{i} modules are adapted then.
    rank_pattern: {name, suffix or regex: r} per module; the first matching key wins.
    train_parts: any of "time" (every .time_* parameter; in RWKV-7 x_*, w/a/v/g low-rank parts,
      k_k, k_a, r_k), "ln" (ln0/ln1/ln2/ln_x/ln_out), "emb",
      "head": base parameters that train too; the rest of the base is frozen; "state": every layer's
      initial WKV state, att.time_state [H, N, N] (state tuning), made for the purpose, zero at the start.
      target_modules=[] with train parts: no adapter layer, only the train parts (--peft state).
    lora_alpha: LoRA only; scaling = lora_alpha / r (None: scaling 1).
    mini_r: mode "mini" only (PEFT's MiSS "mini"): the bone tensor is [r, mini_r], tiled along the
      outputs; every adapted module's out must be a multiple of it.
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
    mini_r: Optional[int] = None
    init_weights: bool = True
    load: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"r must be a positive integer, not {self.r!r}.")
        mode = self.mode.strip().lower() if isinstance(self.mode, str) else self.mode
        if mode not in MODES:
            raise AdapterError(f"Unknown adapter mode {self.mode!r}: choose one of {', '.join(MODES)}.")
        self.mode = mode
        if self.target_modules == "all-linear":
            self.target_modules = None       # the model's own projections, resolved by select()
        self.target_modules = _as_patterns(self.target_modules, "target_modules")
        if isinstance(self.target_modules, list) and not self.target_modules and not self.train_parts:
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
        if self.mode == "mini" and (isinstance(self.mini_r, bool) or not isinstance(self.mini_r, int) or self.mini_r <= 0):
            raise AdapterError(f"mode mini needs mini_r, a positive integer that divides every adapted module's "
                               f"output size, not {self.mini_r!r}.")
        if self.mode != "mini" and self.mini_r is not None:
            raise AdapterError(f"mini_r is for mode mini only, but mode is {self.mode}.")
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
        targets = self.target_modules
        if targets == []:
            return OrderedDict()     # train parts alone (state tuning): no adapter layer
        if targets is None:
            targets = list(getattr(getattr(model, "config", None), "default_targets", DEFAULT_TARGETS))
        _check_patterns(targets, names, "target_modules")
        chosen = [n for n in names if _spec_matches(targets, n)]
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


def as_config(config):
    """A BoneConfig from a BoneConfig, a dict, JSON text or a JSON file (None: the defaults)."""
    if config is None:
        return BoneConfig()
    if isinstance(config, BoneConfig):
        return config
    if isinstance(config, dict):
        return BoneConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return BoneConfig.from_json(config)
    raise AdapterError(f"Pass a BoneConfig, a dict or a JSON string as the adapter config, not {type(config).__name__}.")
