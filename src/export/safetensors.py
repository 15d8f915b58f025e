"""safetensors, streamed: an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, then the bytes, one tensor at a time (what
safetensors.torch.save_file writes, without holding the whole model in memory).

Two layouts:
- "safetensors": the official keys and tensors as they are in the .pth (`same`: each tensor's own
  dtype), for tools that read safetensors rather than pickles;
- "st": web-rwkv / Ai00's layout, as its assets/scripts/convert_safetensors.py makes it
  (names.ST_RULES: two renames, four matrices transposed, every tensor fp16)."""
import json
import math
import struct
import sys
from collections import OrderedDict

import torch

from ..checkpoint import atomic_write, release_pages, trim_heap
from . import TORCH, ExportError, row_chunks
from .names import st_tensor

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class SafetensorsPlan:
    def __init__(self, sd, config, family, dtype, name, fmt="safetensors"):
        self.sd, self.fmt, self.family = sd, fmt, family
        self.specs = OrderedDict()      # output key -> (official key, shape, dtype)
        for key, t in sd.items():
            out_dtype = torch.float16 if fmt == "st" else t.dtype if dtype == "same" else TORCH[dtype]
            if out_dtype not in ST_DTYPES:
                raise ExportError(f"{key} is {t.dtype}, which safetensors cannot hold: export with --dtype fp32.")
            out_key, meta = st_tensor(family, key, torch.zeros(()).expand(t.shape)) if fmt == "st" else (key, t)
            self.specs[out_key] = (key, tuple(meta.shape), out_dtype)
        header, offset = OrderedDict({"__metadata__": {"format": "pt"}}), 0
        for out_key, (_, shape, out_dtype) in self.specs.items():
            size = math.prod(shape) * torch.empty((), dtype=out_dtype).element_size()
            header[out_key] = {"dtype": ST_DTYPES[out_dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)         # the data starts 8-byte aligned, as safetensors writes it
        self.header = struct.pack("<Q", len(text)) + text
        self.nbytes = len(self.header) + offset
        what = "web-rwkv / Ai00 .st (fp16)" if fmt == "st" else \
            f"safetensors, the official keys, {'each tensor in its own dtype' if dtype == 'same' else dtype}"
        self.line = f"{what} ({len(self.specs)} tensors)"

    def tensor(self, out_key):
        key, shape, out_dtype = self.specs[out_key]
        t = self.sd[key]
        if self.fmt == "st":
            t = st_tensor(self.family, key, t)[1]
        if tuple(t.shape) != shape:
            raise ExportError(f"{key} came out as {list(t.shape)}, not {list(shape)}: the export tables are wrong.")
        # NaN or Inf in the .pth itself is refused in every output type, as gguf.py does.
        if not all(torch.isfinite(rows).all() for rows in row_chunks(t)):
            raise ExportError(f"{key} holds NaN or Inf: nothing was written (the .pth itself holds them).")
        if t.dtype == out_dtype:
            return t.contiguous()
        out = torch.empty(shape, dtype=out_dtype)
        for rows, cast in zip(row_chunks(t), row_chunks(out)):    # a slice at a time: no whole-tensor temporaries
            cast.copy_(rows)
            if not torch.isfinite(cast).all():
                raise ExportError(f"{key} holds NaN or Inf once cast to {str(out_dtype).replace('torch.', '')}: "
                                  "nothing was written (try --dtype fp32).")
        return out

    def write(self, output, progress=False):
        def write(f):
            f.write(self.header)
            untrimmed = 0
            for i, out_key in enumerate(self.specs):
                t = self.tensor(out_key)
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                untrimmed += t.nbytes
                del t
                release_pages(self.sd[self.specs[out_key][0]])
                if untrimmed >= 1 << 26:
                    trim_heap()
                    untrimmed = 0
                if progress:
                    print(f"\rexport: {i + 1}/{len(self.specs)} tensors", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)

        atomic_write(output, write)


def prepare(sd, config, family, dtype, name, fmt="safetensors"):
    return SafetensorsPlan(sd, config, family, dtype, name, fmt)
