"""State files: each layer's trained initial WKV state (state tuning), as the ecosystem ships it.

- `state` (RWKV-Runner, the `rwkv` package, the older repository): a .pth holding exactly n_layer
  tensors `blocks.{i}.att.time_state` [H, value index, key index], fp32, nothing else. RWKV-Runner
  uses each as the layer's state as it is for RWKV-7 and transposed (1, 2) for RWKV-5/6; the `rwkv`
  package reads them from an RWKV-6 model file (a merged one) the same way.
- `web-rwkv-state` (web-rwkv / Ai00's `[[state]]`): safetensors, f16, the same keys with the last two
  dims transposed, as web-rwkv's convert_safetensors.py writes them.

read_states takes any file holding a state: this project's adapter file (its "state" train part),
such a state file, the older repository's `--peft state` file (the same plain dict), or an RWKV-6
model file with time_state inside; it checks it against the model it is for."""
import os

import torch

from .checkpoint import atomic_save, atomic_write, load_state_dict
from .config import CheckpointError

STATE_FORMATS = ("state", "web-rwkv-state")


class StateFileError(CheckpointError):
    """A state that does not fit, or a file that holds none; the message is one sentence."""


def state_key(i):
    return f"blocks.{i}.att.time_state"


def state_beside(output):
    """Where a state written beside a model file goes: NAME-state.pth beside NAME.EXT."""
    return f"{os.path.splitext(output)[0]}-state.pth"


def read_states(path_or_sd, config=None, source=None):
    """[n_layer x [H, N, N] fp32] (layout [H, value, key]) from a file or dict holding a state; with
    `config` (the model's), its layer count, head count and head size, and the family an adapter file
    records, must be the model's. One sentence (StateFileError) for anything else."""
    from .bone import META_KEY, read_adapter
    if isinstance(path_or_sd, dict):
        sd, source = path_or_sd, source or "the state"
    else:
        source = source or os.fspath(path_or_sd)
        sd = load_state_dict(source, mmap=True, what="a state file (blocks.{i}.att.time_state tensors)")
    if not isinstance(sd, dict):
        raise StateFileError(f"{source} is not a dict of tensors, so it holds no state.")
    family = None
    if META_KEY in sd:          # one of our adapter files: its state train part
        tensors, meta, _ = read_adapter(sd)
        if "state" not in meta["train_parts"]:
            raise StateFileError(f"{source} is an adapter file without a trained state (train parts: "
                                 f"{', '.join(meta['train_parts']) or 'none'}): it holds no state.")
        family = (meta.get("fingerprint") or {}).get("family", "x060") if meta.get("fingerprint") else None
        sd = tensors
    if sd and all(isinstance(k, str) and k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    keys = sorted((k for k in sd if isinstance(k, str) and k.endswith(".att.time_state")),
                  key=lambda k: int(k.split(".")[1]) if k.split(".")[1].isdigit() else -1)
    if not keys:
        raise StateFileError(f"{source} holds no blocks.{{i}}.att.time_state tensor: it is not a state file "
                             "(train with --peft state or --train_parts state).")
    n = len(keys)
    if keys != [state_key(i) for i in range(n)]:
        raise StateFileError(f"{source} holds time_state tensors {', '.join(keys[:4])}{'...' if n > 4 else ''}, not one "
                             "per layer from blocks.0 on: the file is damaged.")
    states = [sd[k] for k in keys]
    bad = next((k for k, s in zip(keys, states) if not isinstance(s, torch.Tensor) or s.dim() != 3
                or s.shape[1] != s.shape[2] or s.shape != states[0].shape or not s.is_floating_point()), None)
    if bad:
        raise StateFileError(f"{source} has {bad} of {_shape(sd[bad])}, not [H, N, N] like the other layers': "
                             "it is not a state file.")
    if config is not None:
        want = (config.n_head, config.head_size, config.head_size)
        if family is not None and family != config.family:
            raise StateFileError(f"{source} holds the state of an {family} model, but this is an {config.family} "
                                 "model: use a state trained on this model.")
        if n != config.n_layer or tuple(states[0].shape) != want:
            raise StateFileError(f"{source} holds {n} layers of states of shape {list(states[0].shape)}, but this "
                                 f"model needs {config.n_layer} of {list(want)}: it was trained on another model.")
    for k, s in zip(keys, states):
        if not torch.isfinite(s).all():
            raise StateFileError(f"{source} holds NaN or Inf in {k}: the file is damaged.")
    return [s.detach().to("cpu", torch.float32).contiguous() for s in states]


def _shape(t):
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def save_states(states, path, fmt="state"):
    """Write a state file atomically: `state` (RWKV-Runner / the rwkv package / the older repository:
    exactly the n_layer fp32 tensors) or `web-rwkv-state` (safetensors f16, last two dims transposed).
    Returns the bytes written."""
    if fmt == "state":
        atomic_save({state_key(i): s.float().contiguous().clone() for i, s in enumerate(states)}, path)
    elif fmt == "web-rwkv-state":
        from safetensors.torch import save
        # As web-rwkv's assets/scripts/convert_safetensors.py writes it (its read_state transposes back on load).
        blob = save({state_key(i): s.transpose(-1, -2).to(torch.float16).contiguous() for i, s in enumerate(states)},
                    metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(blob))
    else:
        raise StateFileError(f"Unknown state format {fmt!r}: choose one of {', '.join(STATE_FORMATS)}.")
    return os.path.getsize(path)


def read_web_rwkv_states(path):
    """The tensors of a web-rwkv-state file, back in [H, value, key] fp32 (for tests and checks)."""
    from safetensors.torch import load_file
    sd = load_file(path)
    return [sd[state_key(i)].float().transpose(-1, -2).contiguous() for i in range(len(sd))]
