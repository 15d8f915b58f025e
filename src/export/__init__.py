"""Export a merged (or any official-layout) RWKV-6 or RWKV-7 .pth to another runtime's format: GGUF for
llama.cpp, safetensors with the official keys, web-rwkv / Ai00's .st. What export.py and
merge.py --format run.

Every check runs before any work (one sentence each, ExportError or CheckpointError); then the
output is written tensor by tensor to a temporary beside it and renamed into place, so a failed or
killed export leaves the directory as it was (and the next export to that output removes a killed
one's temporary)."""
import os
import shutil
import sys

import torch

from ..checkpoint import clean_stale_temporaries, load_checkpoint, output_directory
from ..config import CheckpointError

FORMATS = ("gguf", "safetensors", "st")
EXPORT_DTYPES = ("same", "fp32", "fp16", "bf16", "q8_0")
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What each format can hold.
ALLOWED = {"gguf": EXPORT_DTYPES, "safetensors": ("same", "fp32", "fp16", "bf16"), "st": ("same", "fp16")}
WHY_NOT = {"safetensors": "q8_0 is a GGUF quantization; safetensors files hold same, fp32, fp16 or bf16",
           "st": "web-rwkv reads fp16 only, so .st files are always fp16 (--dtype same or fp16)"}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message is one sentence that says why."""


def row_chunks(t, elements=1 << 22):
    """t as [rows, last dim] slices of about `elements` values: conversions run a slice at a time,
    so their temporaries (a float32 copy, a quantizer's work arrays) are a slice's, not a tensor's."""
    if t.numel() == 0:
        return
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, elements // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        yield rows[i:i + step]


def check_choice(fmt, dtype):
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}.")
    if dtype not in ALLOWED[fmt]:
        raise ExportError(f"--dtype {dtype} cannot be written as {fmt}: {WHY_NOT[fmt]}.")


def _same_file(a, b):
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(output, model, overwrite):
    """Refuse an output path that would lose something or cannot be written (before the size is known)."""
    if _same_file(output, model):
        raise ExportError(f"--output {output} is the input model itself: choose another path.")
    if os.path.isdir(output):
        raise ExportError(f"--output {output} is a directory: give a file name.")
    if os.path.lexists(output) and not overwrite:
        raise ExportError(f"{output} already exists: pass --overwrite to replace it, or choose another --output.")
    existing = output_directory(output, ExportError)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"Cannot write to {existing}: choose an --output in a directory you can write to.")
    return existing


def check_room(existing, nbytes):
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise ExportError(f"The exported model needs {nbytes / 1e6:.1f} MB but {existing} has {free / 1e6:.1f} MB "
                          "free: free some space or choose another --output.")


def export_model(model, fmt, output, dtype="same", overwrite=False, progress=True, name=None):
    """Write the official-layout checkpoint `model` as `fmt` to `output` (`name`: the model name a
    GGUF file records, by default the input's file name). Returns (bytes written, one line saying
    what was written)."""
    check_choice(fmt, dtype)
    say = lambda m: print(f"export: {m}", file=sys.stderr)  # noqa: E731
    sd, config = load_checkpoint(model, mmap=True)
    existing = check_output(output, model, overwrite)
    states, state_output, state_fmt = split_states(sd, fmt, output, overwrite)
    if fmt == "gguf":
        from .gguf import prepare
    else:
        from .safetensors import prepare
    plan = prepare(sd, config, config.family, dtype, name=name or os.path.splitext(os.path.basename(model))[0], fmt=fmt)
    check_room(existing, plan.nbytes)
    clean_stale_temporaries(output, say=say)
    plan.write(output, progress=progress and sys.stderr.isatty())
    line = plan.line
    if states:
        from ..state_file import save_states
        save_states(states, state_output, state_fmt, family=config.family)
        line += "; " + state_note(fmt, state_output)
    return os.path.getsize(output), line


def split_states(sd, fmt, output, overwrite):
    """A model file with trained initial states inside (a merged RWKV-6 state tune): the states come out of
    sd (in place) and go to a state file beside the output, in the form the format's runtimes load
    (llama.cpp has no initial state at all). Returns (states or None, that file, its state format)."""
    keys = [k for k in sd if k.endswith(".att.time_state")]
    if not keys:
        return None, None, None
    states = [sd.pop(f"blocks.{i}.att.time_state").float() for i in range(len(keys))]
    state_fmt = "web-rwkv-state" if fmt == "st" else "state"
    state_output = os.path.splitext(output)[0] + ("-state.st" if fmt == "st" else "-state.pth")
    if os.path.lexists(state_output) and not overwrite:
        raise ExportError(f"{state_output} (where the model's trained state goes) already exists: pass --overwrite to "
                          "replace it, or choose another --output.")
    return states, state_output, state_fmt


def state_note(fmt, state_output):
    """What export.py says of the state file it wrote beside a model or adapter export."""
    if fmt == "gguf":
        return (f"llama.cpp has no initial state, so the trained state is in {state_output} (RWKV-Runner's state file; "
                "the rwkv package and generate.py --state take it)")
    if fmt == "st":
        return f"the trained state is in {state_output} (web-rwkv / Ai00's state file, its [[state]] in Config.toml)"
    return f"the trained state is in {state_output} (RWKV-Runner's state file)"


__all__ = ["ExportError", "CheckpointError", "FORMATS", "EXPORT_DTYPES", "export_model", "check_choice"]
