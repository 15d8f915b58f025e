"""Merging an adapter file into its base checkpoint: what merge.py runs.

Everything is checked before any work (the base, the adapter against the base, the output
path, NaN/Inf in the adapter); then the output is streamed tensor by tensor in the base's key
order (checkpoint.stream_checkpoint), each tensor computed in fp32 by the Bone module's
merged_exact and cast once, so memory stays near one tensor plus the interpreter. The report
says, per kind of module, how much of the fine-tuning survived that cast.

With quant (merge.py --quant nf4|fp4|int8) the base tensors that a --quant run held quantized
(the adapter's metadata lists them; for a file that does not, the adapted weights, as the older
repository's merge does) are first rounded through that quantization, in fp32, so the update is
added to exactly the base it was trained against.
"""
import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .bone import AdapterError, check_base, merged_exact, plan_merge, read_adapter, train_part_of
from .checkpoint import (DTYPES, check_finite, clean_stale_temporaries, load_checkpoint, output_directory,
                         release_pages, stream_checkpoint, trim_heap)
from .quant import bnb_functional, check_quant, rounded
from .state_file import save_states, state_beside

OUTPUT_DTYPES = ("auto", "same") + tuple(DTYPES)
LOST_WARNING = 0.1      # an output dtype may lose at most this fraction of any kind's update
FP16_MAX = 65504.0
CHUNK = 1 << 22         # elements per slice when measuring (bounds the temporaries)
TRIM_EVERY = 1 << 26    # bytes written between handing freed heap memory back


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message is one sentence that says why."""


@dataclass
class Survival:
    """Sums of squares for one kind of module: |W|^2, |update|^2 (exact merged - base) and
    |lost|^2 (written - exact merged), over all its tensors."""
    tensors: int = 0
    weight_sq: float = 0.0
    update_sq: float = 0.0
    lost_sq: float = 0.0

    @property
    def relative_update(self):
        """|update| / |W| (None where the base weights are all zero, as x060 init leaves some)."""
        return math.sqrt(self.update_sq / self.weight_sq) if self.weight_sq else None

    @property
    def lost(self):
        """The relative error of the applied update: |written - exact| / |exact - base| (None if no update)."""
        return math.sqrt(self.lost_sq / self.update_sq) if self.update_sq else None


def kind_of(key):
    """The report row of a base key: the module kind for adapted weights (att.key), the train
    part for replaced tensors (time, ln, emb, head)."""
    part = train_part_of(key)
    if part is not None:
        return part
    parts = key.split(".")
    return ".".join(parts[2:-1]) if key.startswith("blocks.") else ".".join(parts[:-1])


def _slices(t):
    """Flat slices of at most CHUNK elements: bounded temporaries when measuring big tensors."""
    flat = t.reshape(-1)
    return (flat[i:i + CHUNK] for i in range(0, flat.numel(), CHUNK))


def _sq(x):
    # fp32 or wider (a float64 base is summed in float64: vector_norm refuses to narrow it)
    return float(torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32))) ** 2


def _measure(row, w, exact, out):
    """Add one tensor's |W|^2, |exact - W|^2 and |out - exact|^2 to its report row, in one pass."""
    row.tensors += 1
    for w_s, e_s, o_s in zip(_slices(w), _slices(exact), _slices(out)):
        w_s = w_s.to(e_s.dtype)
        row.weight_sq += _sq(w_s)
        row.update_sq += _sq(e_s - w_s)
        if o_s.dtype != e_s.dtype:          # same dtype: nothing was lost
            row.lost_sq += _sq(o_s.to(e_s.dtype) - e_s)


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _finite(t):
    # A sum is finite only if every term is (Inf and NaN propagate), and summing is several
    # times faster than isfinite(); only a non-finite sum (or an overflowing one) needs the check.
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return True
    return all(bool(torch.isfinite(s).all()) for s in _slices(t))


def _size(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _same_file(a, b):
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(output, base, adapter, overwrite, nbytes):
    """Refuse an output path that would lose something or cannot be written (one sentence each)."""
    if _same_file(output, base):
        raise MergeError(f"--output {output} is the base model itself: choose another path (the base is never overwritten).")
    if isinstance(adapter, (str, os.PathLike)) and _same_file(output, adapter):
        raise MergeError(f"--output {output} is the adapter file itself: choose another path.")
    if os.path.isdir(output):
        raise MergeError(f"--output {output} is a directory: give a file name, such as {os.path.join(output, 'merged.pth')}.")
    if os.path.lexists(output) and not overwrite:
        raise MergeError(f"{output} already exists: pass --overwrite to replace it, or choose another --output.")
    existing = output_directory(output, MergeError)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MergeError(f"Cannot write to {existing}: choose an --output in a directory you can write to.")
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise MergeError(f"The merged model needs {_size(nbytes)} but {existing} has {_size(free)} free: "
                         "free some space or choose another --output.")


def _device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for, but PyTorch sees no CUDA GPU here: use --device cpu.")
    if name not in ("cpu", "cuda"):
        raise MergeError(f"--device must be cpu or cuda, not {name!r}.")
    return torch.device(name)


def quant_plan(adapter, quant):
    """(keys to round through `quant` before merging, one line for the user) for an adapter file
    or state dict: the line says which merge this is and, when the adapter's metadata names
    another quantization, that it differs."""
    meta = read_adapter(adapter, mmap=True)[1]
    trained = meta.get("quant")          # None: an older-repository file, which does not say
    keys = (meta.get("quantized") or [f"{name}.weight" for name in meta["r"]]) if check_quant(quant) != "none" else []
    if keys:
        line = (f"merge: rounded {len(keys)} base tensors through {quant} first (dequantize(quantize(W)) with "
                f"bitsandbytes' defaults, in fp32), then added the update")
    else:
        line = "merge: added the update to the base as stored (full precision)"
    if trained is not None and trained != quant:
        line += (f"; note: the adapter was trained on a base held {trained}" if trained != "none" else
                 "; note: the adapter was trained on the base in full precision")
        line += f" (merge with --quant {trained} to reproduce that base)"
    return keys, line


def _exact(base_sd, plan, mode, key, round_keys, quant, dev):
    """(the base tensor as merged into, fp32 or wider, and the exact merged tensor) of one key."""
    w = base_sd[key]
    if key in round_keys:
        w = rounded(w.to(dev), quant, key)      # the base a --quant run trained against, fp32
    change = plan.get(key)
    if change is None:
        return w, None
    w = w.to(dev)
    exact = merged_exact(w, change[1], mode, change[2]) if change[0] == "merge" \
        else change[1].to(dev, torch.promote_types(w.dtype, torch.float32))
    return w, exact


def choose_dtype(base_sd, plan, mode, round_keys, quant, dev):
    """(dtype name, one line saying why): the narrowest of bf16, fp16, fp32 that keeps at least
    90% of every module kind's update and holds every value of the output (fp16 tops out at 65504)."""
    lost = {name: OrderedDict() for name in ("bf16", "fp16")}
    fits_fp16 = True
    for key in base_sd:
        w, exact = _exact(base_sd, plan, mode, key, round_keys, quant, dev)
        out = w if exact is None else exact
        if out.numel() and float(out.abs().max()) > FP16_MAX:
            fits_fp16 = False
        if exact is not None:
            for name in lost:
                _measure(lost[name].setdefault(kind_of(key), Survival()), w, exact, exact.to(DTYPES[name]))
        release_pages(base_sd[key])
    worst = {name: max((r.lost or 0.0 for r in rows.values()), default=0.0) for name, rows in lost.items()}
    if worst["bf16"] <= LOST_WARNING:
        return "bf16", f"bf16 keeps {1 - worst['bf16']:.1%} or more of every kind's update"
    why = f"bf16 would lose {worst['bf16']:.0%} of the update"
    if worst["fp16"] <= LOST_WARNING and fits_fp16:
        return "fp16", f"{why}; fp16 keeps {1 - worst['fp16']:.1%} or more and holds every value"
    why += (f", fp16 {worst['fp16']:.0%}" if worst["fp16"] > LOST_WARNING else ", fp16 cannot hold every value")
    return "fp32", f"{why}; fp32 keeps all of it"


def merge_checkpoint(base, adapter, output, dtype="auto", safe_merge=True, device="cpu", overwrite=False,
                     progress=True, quant="none", allow_other_base=False, state_output=None, note=None):
    """Merge `adapter` (a path or a state dict) into the checkpoint at `base` and write the
    official-layout result to `output`, atomically. dtype: "auto" (choose_dtype), "same" (each
    tensor keeps the base's dtype), "bf16", "fp16" or "fp32". quant: "none" (the base as stored) or the quantization the
    base is rounded through first (see quant_plan). A base that is not the one the adapter records
    (bone.check_base) is refused unless allow_other_base. Returns ({kind: Survival} in base order, the
    dtype written, why that one: a line or None when asked for). Raises
    CheckpointError, AdapterError or MergeError (one sentence) before anything is written when an
    input is bad; a failure while writing leaves no output behind (nor changes an old one).

    A trained initial state (state tuning) goes, for RWKV-6, into the merged file as
    blocks.{i}.att.time_state (fp32), where the `rwkv` package and ChatRWKV start every sequence from
    it; RWKV-7 files keep the official layout (the package ignores such keys there), so the state is
    written to `state_output` (default OUTPUT-state.pth), a state file RWKV-Runner loads. `note(line)`
    says a note about the inputs (another base let through, no fingerprint); default: on stderr."""
    if dtype not in OUTPUT_DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}.")
    dev = _device(device)
    clean_stale_temporaries(output, say=lambda m: print(f"merge: {m}", file=sys.stderr))
    base_sd, config = load_checkpoint(base, mmap=True)
    mode, plan = plan_merge(OrderedDict((k, tuple(v.shape)) for k, v in base_sd.items()), config.fingerprint(), adapter)
    said = check_base(adapter, base_sd, config, base, allow_other_base)
    if said:
        (note or (lambda line: print(line, file=sys.stderr)))(f"merge: {said}")
    states = OrderedDict((k, c[1]) for k, c in plan.items() if c[0] == "state")
    state_output = None if not states or config.family == "x060" else state_output or state_beside(output)
    if state_output is not None and os.path.lexists(state_output) and not overwrite:
        raise MergeError(f"{state_output} (where the trained state goes, beside the RWKV-7 model) already exists: "
                         "pass --overwrite to replace it, or choose another --output.")
    round_keys = set(quant_plan(adapter, quant)[0])
    if round_keys:
        bnb_functional()       # refuses a missing or old bitsandbytes before anything is written
        bad = sorted(k for k in round_keys if k not in base_sd or base_sd[k].dim() != 2 or k in plan and plan[k][0] != "merge")
        if bad:
            raise AdapterError(f"The adapter's metadata lists {bad[0]} as held quantized, but that is not a frozen "
                               "matrix of the base: the file is inconsistent.")
    # Checked before any work at the least the output can take (auto: bf16), and again once the dtype is known.
    least = {k: v.dtype if dtype == "same" else DTYPES.get(dtype, torch.bfloat16) for k, v in base_sd.items()}
    check_output(output, base, adapter, overwrite, sum(v.numel() * _itemsize(least[k]) for k, v in base_sd.items()))
    if safe_merge:
        for key, change in plan.items():
            tensors = change[1] if isinstance(change[1], tuple) else (change[1],)
            if not all(_finite(t) for t in tensors):
                what = "adapter" if change[0] == "merge" else "trained"
                raise MergeError(f"The {what} tensor for {key} holds NaN or Inf: nothing was written "
                                 "(use an earlier adapter, or --no-safe_merge to merge it anyway).")
    for key, w in base_sd.items():
        check_finite(key, w, base)
    plan = OrderedDict((k, c) for k, c in plan.items() if c[0] != "state")
    why = None
    if dtype == "auto":
        dtype, why = choose_dtype(base_sd, plan, mode, round_keys, quant, dev)
    out_dtype = {k: v.dtype if dtype == "same" else DTYPES[dtype] for k, v in base_sd.items()}
    specs = OrderedDict((k, (tuple(v.shape), out_dtype[k])) for k, v in base_sd.items())
    if config.family == "x060":     # the initial states after the official keys, in fp32, as the rwkv package reads them
        specs.update((k, (tuple(v.shape), torch.float32)) for k, v in states.items())
    nbytes = sum(math.prod(shape) * _itemsize(d) for shape, d in specs.values())
    check_output(output, base, adapter, overwrite, nbytes)
    report = OrderedDict()
    bar = _Progress(nbytes, progress)

    def produce(key):
        if key in states:
            return states[key].to("cpu", torch.float32).contiguous()
        w, exact = _exact(base_sd, plan, mode, key, round_keys, quant, dev)
        if exact is None:
            out = w.to("cpu", out_dtype[key])   # copied (or cast) on the CPU, whatever --device says
        else:
            out = exact.to(out_dtype[key])
            _measure(report.setdefault(kind_of(key), Survival()), w, exact, out)
            del exact
        # What merging or casting made is checked; a tensor copied bit for bit is the base's own.
        if safe_merge and (key in plan or out.dtype != w.dtype) and not _finite(out):
            raise MergeError(f"Merging {key} gives NaN or Inf in {str(out.dtype).replace('torch.', '')}: "
                             "nothing was written (a wider --dtype such as fp32 may hold it).")
        return out

    untrimmed = [0]

    def written(key):
        size = math.prod(specs[key][0]) * _itemsize(specs[key][1])
        bar.update(size, key)
        if key in base_sd:
            release_pages(base_sd[key])
        untrimmed[0] += size
        if untrimmed[0] >= TRIM_EVERY:
            trim_heap()
            untrimmed[0] = 0

    stream_checkpoint(output, specs, produce, written)
    bar.close()
    if states:
        print(_state_line(config.family, output, state_output, list(states.values())))
    return report, dtype, why


def _state_line(family, output, state_output, states):
    what = f"the trained initial state ({len(states)} layers of {list(states[0].shape)})"
    if state_output is None:
        return (f"merge: {what} is inside {output} as blocks.{{i}}.att.time_state: the rwkv package (ChatRWKV) and "
                "RWKV-Runner start every sequence from it.")
    save_states([s.float() for s in states], state_output, family=family)
    return (f"merge: RWKV-7 model files keep the official layout, so {what} is written beside it to {state_output}: "
            "load it as the state file in RWKV-Runner, pass its tensors to the rwkv package as the initial state "
            f"(state[3 * i + 1] of generate_zero_state()), or run python generate.py --model {output} --state {state_output}.")


class _Progress:
    """Bytes written so far, on stderr: a live line on a terminal, a line every 10% otherwise."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start, self.next_mark = time.time(), 0.1
        self.tty = enabled and sys.stderr.isatty()

    def update(self, nbytes, key):
        if not self.enabled:
            return
        self.done += nbytes
        frac = self.done / self.total if self.total else 1.0
        line = f"merging: {frac:4.0%}  {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB  {time.time() - self.start:.0f}s  {key}"
        if self.tty:
            print(f"\r{line[:100]:<100}", end="", file=sys.stderr, flush=True)
        elif frac >= self.next_mark or self.done == self.total:
            print(line, file=sys.stderr, flush=True)
            while self.next_mark <= frac:
                self.next_mark += 0.1

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def format_report(report, dtype):
    """The survival table merge.py prints, and one warning line when a kind loses > 10%."""
    lines = [f"how much of the fine-tuning survives the cast to the output dtype ({dtype}):",
             f"  {'kind':<16}{'tensors':>8}{'|update|/|W|':>15}{'lost':>10}"]
    warnings, zero = [], []
    for kind, row in report.items():
        lost = "no update" if row.lost is None else f"{row.lost:.3e}"
        rel = "n/a" if row.relative_update is None else f"{row.relative_update:.3e}"
        zero += [kind] if row.relative_update is None else []
        lines.append(f"  {kind:<16}{row.tensors:>8}{rel:>15}{lost:>10}")
        if row.lost is not None and row.lost > LOST_WARNING:
            warnings.append(f"{kind} {row.lost:.0%}")
    lines.append("  (lost = |written - exact merge| / |exact merge - base|, over all tensors of the kind)")
    if zero:
        lines.append(f"  (n/a: the base's {' and '.join(zero)} weights are all zero, as in a freshly initialised model, "
                     "so the update has no size relative to them; it is merged all the same)")
    if warnings:
        lines.append(f"WARNING: {dtype} loses more than {LOST_WARNING:.0%} of the update of {len(warnings)} kinds "
                     f"({', '.join(warnings)}): merge with --dtype auto (the default) or fp32 to keep it.")
    return "\n".join(lines)


__all__ = ["MergeError", "Survival", "merge_checkpoint", "quant_plan", "format_report", "kind_of", "check_output",
           "AdapterError"]
