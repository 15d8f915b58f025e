"""Which base an adapter was trained on: the fingerprint of the base's weights that adapter files
record (metadata field base_weights) and that merge.py, generate.py and train.py --bone_load
compare before any work (files.check_base).

- sha256: a hash over every base tensor the file does not replace (its train parts replace
  theirs), by official key in sorted order: the key, the shape, and up to ROWS evenly spaced rows
  (of the tensor seen as [shape[0], -1]) as fp32 bytes. fp32, so that it is the same whether
  the base is read as stored (bf16) or held cast to fp32 by training; rows, so that it costs
  about the same for 14B as for 0.1B (a full hash of 14B would read all 28 GB).
- probe: per adapted module, PROBES segments W[o, c:c+L] of the base (L = min(r, in), c a
  multiple of L: a whole bat block row), in fp32. A base whose hash differs is compared with
  probe + dW there, by the same merged_exact merge.py uses: equal within its dtype's rounding
  means it is this adapter already merged.
"""
import contextlib
import hashlib

import torch

from .config import train_part_of
from .functional import merged_exact

SCHEME = "rows64-fp32-sha256"
ROWS = 64
PROBES = 4
CHECKED = 4     # modules compared when telling an already merged base from another one


def _rows(t):
    m = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    m = m[::max(1, m.shape[0] // ROWS)][:ROWS]      # one strided view: rows 0, s, 2s... (s = n // ROWS)
    return m.to("cpu", torch.float32).contiguous()


@contextlib.contextmanager
def _one_thread():
    # Hundreds of small copies: on a busy CPU torch's thread pool makes them 5-40x slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def official_tensors(tensors, config):
    """{key: tensor} of the official layout's keys only (config.shapes()): what a file and a model
    share, whatever else the model holds (a state tune's time_state)."""
    if config is None or not hasattr(config, "shapes"):
        return dict(tensors)
    return {k: tensors[k] for k in config.shapes() if k in tensors}


def weights_hash(tensors, train_parts=()):
    """sha256 (hex) of {official key: tensor}, leaving out the train parts `train_parts`."""
    h = hashlib.sha256()
    with torch.no_grad(), _one_thread():
        for key in sorted(tensors):
            t = tensors[key]
            if train_part_of(key) in train_parts:
                continue
            h.update(f"{key} {list(t.shape)};".encode())
            if t.numel():
                h.update(_rows(t).numpy().tobytes())
    return h.hexdigest()


def probe_positions(out_f, in_f, r):
    """[(row, first column)] and the length L of the probe segments of an [out_f, in_f] weight."""
    length = min(r, in_f)
    blocks = in_f // length
    return [((2 * k + 1) * out_f // (2 * PROBES), (2 * k + 1) * blocks // (2 * PROBES) * length)
            for k in range(PROBES)], length


def base_record(tensors, ranks, train_parts):
    """The base_weights metadata of a base {official key: tensor} under adapters {module: r};
    None where a weight is not there to read (on the meta device, partitioned or missing)."""
    if any(t.is_meta for t in tensors.values()):
        return None
    probe = {}
    with torch.no_grad():
        for name, r in ranks.items():
            w = tensors.get(f"{name}.weight")
            if w is None or w.dim() != 2 or not w.numel():
                return None
            at, length = probe_positions(*w.shape, r)
            probe[name] = [[o, c, w[o, c:c + length].float().tolist()] for o, c in at]
    return {"scheme": SCHEME, "sha256": weights_hash(tensors, train_parts), "probe": probe}


def looks_merged(probe, tensors, plan, mode):
    """Whether the base {key: tensor} holds, at the probe segments of up to CHECKED modules, the
    recorded base plus this adapter's update (plan: files.plan_merge's) within the rounding of its
    dtype, and the update shows there. A probe that does not fit the base says no."""
    checked, shows = 0, False
    with torch.no_grad():
        for name, segments in probe.items():
            change, w = plan.get(f"{name}.weight"), tensors.get(f"{name}.weight")
            if change is None or change[0] != "merge" or w is None or w.dim() != 2:
                return False
            if not all(0 <= o < w.shape[0] and c + len(v) <= w.shape[1] for o, c, v in segments):
                return False
            # The recorded base at the probe, zero elsewhere: each bat block row merges on its own.
            base = torch.zeros(w.shape, dtype=torch.float32)
            for o, c, v in segments:
                base[o, c:c + len(v)] = torch.tensor(v, dtype=torch.float32)
            exact = merged_exact(base, change[1], mode, change[2])
            eps, tiny = torch.finfo(w.dtype).eps, torch.finfo(w.dtype).tiny
            for o, c, v in segments:
                got, want, was = w[o, c:c + len(v)].float(), exact[o, c:c + len(v)], base[o, c:c + len(v)]
                if ((got - want).abs() > 2 * eps * want.abs() + tiny).any():
                    return False
                shows = shows or bool(((want - was).abs() > 4 * eps * was.abs() + 2 * tiny).any())
            checked += 1
            if checked == CHECKED:
                break
    return checked > 0 and shows
