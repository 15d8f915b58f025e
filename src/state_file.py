"""State files: each layer's trained initial WKV state (state tuning), as the ecosystem ships it.

- `state` (RWKV-Runner, the `rwkv` package, the older repository): a .pth holding the n_layer tensors
  `blocks.{i}.att.time_state` [H, value index, key index], fp32, and no other key. RWKV-Runner uses
  each as the layer's state as it is for RWKV-7 and transposed (1, 2) for RWKV-5/6; the `rwkv`
  package reads them from an RWKV-6 model file (a merged one) the same way. The model family the
  state was trained on (x060 or x070) is recorded as an attribute of the saved dict, not as a key:
  the dict is an OrderedDict with `rwkv_family = "x060"` set on it, which torch.save pickles with it
  and torch.load restores, also under weights_only=True (its unpickler rebuilds an OrderedDict's
  attributes: the mechanism that keeps nn.Module.state_dict()'s `_metadata`). Every loader we know
  reads the file as a dict and never sees it; checked in their source:
  - RWKV-Runner (backend-python/utils/rwkv.py, load_rwkv_state, v1.9.11): `state_raw = torch.load(path)`,
    refuses the file unless `len(state_raw) == n_layer` and `next(iter(state_raw.values()))` has
    n_embd = shape[0] * shape[1], then reads `state_raw[f"blocks.{i}.att.time_state"]` per layer.
    A record kept as an extra key would fail its count (and could be its first value): that is why
    it is an attribute. len() and the first value are unchanged by it.
  - ChatRWKV (API_DEMO_CHAT.py, at 965e40b): `state_raw = torch.load(STATE_NAME + '.pth')`, then
    `state_raw[f'blocks.{i}.att.time_state']` per layer.
  - the `rwkv` package (rwkv/model.py, 0.8.32) loads no state file: it reads time_state from a model
    file's keys (`'.time_state' in key` for every key of the model file); a state file's tensors added
    to one by key (dict.update, or a loop over .keys()) leave the attribute behind.
  - the older repository (Joluck/RWKV-PEFT at 5704c39: rwkvt/lightning_train/trainer.py saves `--peft state` as a
    plain dict of the keys with 'state' in them; merge/merge_state.py loops `for k in w_state.keys():
    w[k] = w_state[k]` into the model's dict): keys only.
  A file without the attribute (theirs, another tool's, ours from before) still loads: its family
  cannot be checked, which is said once as a note.
- `web-rwkv-state` (web-rwkv / Ai00's `[[state]]`): safetensors, f16, the same keys with the last two
  dims transposed, as web-rwkv's convert_safetensors.py writes them, and the metadata header
  {"format": "pt", "rwkv_family": "x060"}. web-rwkv (at 3c7d546) reads a state with src/runtime/v*.rs read_state through
  its Reader trait (src/runtime/loader.rs), which has tensor names, shapes and data only: the metadata
  header is parsed by the safetensors crate and never read.

read_states takes any file holding a state: this project's adapter file (its "state" train part; the
family is its fingerprint's), such a state file in either format, the older repository's `--peft
state` file (the same plain dict, no family), or an RWKV-6 model file with time_state inside (the
family its keys say); it checks it against the model it is for: the layer count, head count, head
size and, where the file says it, the family. A state of another family is refused even when the
sizes agree (an x060 1.6B state and an x070 1.5B state are both 24 x [32, 64, 64])."""
import os
import sys
from collections import OrderedDict

import torch

from .checkpoint import atomic_save, atomic_write, load_state_dict
from .config import CheckpointError, family_of

STATE_FORMATS = ("state", "web-rwkv-state")
FAMILIES = ("x060", "x070")
FAMILY_FIELD = "rwkv_family"    # the .pth dict's attribute and the safetensors metadata field
_NOTED = set()                  # the files the no-family note was printed for (once each)


class StateFileError(CheckpointError):
    """A state that does not fit, or a file that holds none; the message is one sentence."""


def state_key(i):
    return f"blocks.{i}.att.time_state"


def state_beside(output):
    """Where a state written beside a model file goes: NAME-state.pth beside NAME.EXT."""
    return f"{os.path.splitext(output)[0]}-state.pth"


def _is_safetensors(path):
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)


def load_state(path, mmap=True, what="a state file (blocks.{i}.att.time_state tensors)"):
    """The dict of tensors of a .pth (load_state_dict), or of a web-rwkv-state safetensors file with its
    time_state tensors back in [H, value, key] fp32; a recorded family stays as the dict's rwkv_family."""
    path = os.fspath(path)
    if not os.path.isfile(path) or not _is_safetensors(path):
        return load_state_dict(path, mmap=mmap, what=what)
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            sd = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except Exception as e:  # the crate raises several kinds; the user needs one sentence
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateFileError(f"{path} could not be read as a safetensors file ({reason}).") from e
    for k, t in sd.items():     # web-rwkv's layout: the last two dims transposed (its read_state turns them back)
        if k.endswith(".att.time_state") and t.dim() == 3:
            sd[k] = t.transpose(-1, -2).float().contiguous()
    if FAMILY_FIELD in meta:
        setattr(sd, FAMILY_FIELD, meta[FAMILY_FIELD])
    return sd


def recorded_family(sd, source):
    """The family a state file records (None: it records none)."""
    family = getattr(sd, FAMILY_FIELD, None)
    if family is not None and not isinstance(family, str):
        raise StateFileError(f"{source} records the model family as {family!r}, not as a name like x060: "
                             "the file is damaged.")
    return family


def refuse_other_family(family, model_family, source):
    """One sentence when the state is recorded as another family's than the model's."""
    if family is not None and family != model_family:
        raise StateFileError(f"{source} holds the state of an {family} model, but this is an {model_family} "
                             "model: use a state trained on this model.")


def note_no_family(source, model_family):
    """The note, once per file and process (the first process of a run only), that a state file
    records no family, so only its sizes were checked."""
    if source in _NOTED or os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return
    _NOTED.add(source)
    print(f"note: {source} records no model family (a state file of the older repository, another tool or an "
          f"earlier version of this one): that it is an {model_family} state cannot be checked, only its sizes.",
          file=sys.stderr)


def check_family(family, model_family, source):
    """Another family's state: one sentence; no family recorded: the note."""
    refuse_other_family(family, model_family, source)
    if family is None:
        note_no_family(source, model_family)


def read_states(path_or_sd, config=None, source=None):
    """[n_layer x [H, N, N] fp32] (layout [H, value, key]) from a file or dict holding a state; with
    `config` (the model's), its layer count, head count and head size, and the family the file
    records, must be the model's. One sentence (StateFileError) for anything else."""
    return states_and_family(path_or_sd, config, source)[0]


def states_and_family(path_or_sd, config=None, source=None):
    """(read_states' list, the family the file records or None)."""
    from .bone import META_KEY, read_adapter
    if isinstance(path_or_sd, dict):
        sd, source = path_or_sd, source or "the state"
    else:
        source = source or os.fspath(path_or_sd)
        sd = load_state(source)
    if not isinstance(sd, dict):
        raise StateFileError(f"{source} is not a dict of tensors, so it holds no state.")
    family, adapter = recorded_family(sd, source), META_KEY in sd
    if adapter:                 # one of our adapter files: its state train part, the family its fingerprint's
        tensors, meta, _ = read_adapter(sd)
        if "state" not in meta["train_parts"]:
            raise StateFileError(f"{source} is an adapter file without a trained state (train parts: "
                                 f"{', '.join(meta['train_parts']) or 'none'}): it holds no state.")
        family = meta["fingerprint"].get("family", "x060") if meta.get("fingerprint") else None
        sd = tensors
    if sd and all(isinstance(k, str) and k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    if family is None and not adapter and any(isinstance(k, str) and not k.endswith(".att.time_state") for k in sd):
        try:                    # a model file with time_state inside (a merged RWKV-6 state tune): its keys say
            family = family_of(sd, source).family
        except CheckpointError:
            pass                # other keys beside the states, but not a model's: the family stays unknown
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
        refuse_other_family(family, config.family, source)
        if n != config.n_layer or tuple(states[0].shape) != want:
            raise StateFileError(f"{source} holds {n} layers of states of shape {list(states[0].shape)}, but this "
                                 f"model needs {config.n_layer} of {list(want)}: it was trained on another model.")
    for k, s in zip(keys, states):
        if not torch.isfinite(s).all():
            raise StateFileError(f"{source} holds NaN or Inf in {k}: the file is damaged.")
    if config is not None and family is None:
        note_no_family(source, config.family)
    return [s.detach().to("cpu", torch.float32).contiguous() for s in states], family


def _shape(t):
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def save_states(states, path, fmt="state", *, family):
    """Write a state file atomically: `state` (RWKV-Runner / the rwkv package / the older repository:
    the n_layer fp32 tensors, the family as the dict's rwkv_family attribute) or `web-rwkv-state`
    (safetensors f16, last two dims transposed, the family in the metadata header). `family`: the
    model family the state was trained on (x060 or x070), or None where it is not known (the file then
    records none, as a state file of the older repository). Returns the bytes written."""
    if family is not None and family not in FAMILIES:
        raise StateFileError(f"Unknown model family {family!r}: a state file records one of {', '.join(FAMILIES)}.")
    if fmt == "state":
        sd = OrderedDict((state_key(i), s.float().contiguous().clone()) for i, s in enumerate(states))
        if family is not None:
            setattr(sd, FAMILY_FIELD, family)       # an attribute, not a key: see the module's docstring
        atomic_save(sd, path)
    elif fmt == "web-rwkv-state":
        from safetensors.torch import save
        # As web-rwkv's assets/scripts/convert_safetensors.py writes it (its read_state transposes back on load).
        blob = save({state_key(i): s.transpose(-1, -2).to(torch.float16).contiguous() for i, s in enumerate(states)},
                    metadata={"format": "pt", **({FAMILY_FIELD: family} if family is not None else {})})
        atomic_write(path, lambda f: f.write(blob))
    else:
        raise StateFileError(f"Unknown state format {fmt!r}: choose one of {', '.join(STATE_FORMATS)}.")
    return os.path.getsize(path)


def read_web_rwkv_states(path):
    """The tensors of a web-rwkv-state file, back in [H, value, key] fp32 (for tests and checks)."""
    from safetensors.torch import load_file
    sd = load_file(path)
    return [sd[state_key(i)].float().transpose(-1, -2).contiguous() for i in range(len(sd))]
