"""The one seam between the model families: a checkpoint's keys say x060 or x070
(config.read_config); this module gives the model class for it. Everything else (targets,
layout, fresh weights) hangs off the config: config.default_targets, config.shapes(),
checkpoint.fresh_state_dict."""
from .checkpoint import load_checkpoint
from .config import read_config
from .model import RWKV6
from .model_x070 import RWKV7

MODELS = {"x060": RWKV6, "x070": RWKV7}


def model_class(config):
    return MODELS[config.family]


def from_state_dict(sd, **kwargs):
    """The model of whichever family `sd` is, holding exactly these weights."""
    return model_class(read_config(sd)).from_state_dict(sd, **kwargs)


def from_checkpoint(path, dtype=None, **kwargs):
    """Load an official .pth of either family (weights_only); dtype as RWKV.from_checkpoint."""
    return model_class(load_checkpoint(path)[1]).from_checkpoint(path, dtype=dtype, **kwargs)
