"""A frozen base held quantized (train.py --quant, merge.py --quant): bitsandbytes' nf4, fp4 or
int8, with its default block sizes, dequantized per use.

What is held quantized (quantize_model): every frozen matrix of the base, that is the weights of
the adapted projections (the adapter layers keep training in full precision on top), every
other frozen linear (the head when it does not train) and the embedding when it does not train.
The time-mix and LayerNorm parameters stay as they are (about 2% of the weights).

- nf4, fp4: bitsandbytes.functional.quantize_4bit, blocks of 64 values, one fp32 absmax each
  (4.5 bits a weight).
- int8: bitsandbytes.functional.quantize_blockwise, the dynamic 8-bit code, blocks of 4096
  (8 bits a weight). The older repository called bitsandbytes' `quantize` (the same code, one
  absmax for the whole tensor, CUDA only); bitsandbytes 0.50 removed it, and blockwise is its
  successor, so an older int8 run saw a slightly coarser base than ours.

Memory: the packed data and absmax are uint8 buffers that are not in the state dict (resume
points and adapter files never hold the base) and that dtype casts leave alone (DeepSpeed's bf16
cast, model.half()), while .to(device) moves them. A dequantized weight lives for one layer's
forward pass: autograd keeps a note of where to dequantize it again in the backward pass
(saved-tensor hooks), not the weight-sized tensor itself.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bone.layers import AdapterLinear, compute_dtype

QUANT_TYPES = ("none", "nf4", "fp4", "int8")
QUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)     # what bitsandbytes quantizes
MIN_BITSANDBYTES = (0, 46)   # the first release whose quantize/dequantize ops run on the CPU too


class QuantError(ValueError):
    """A quantization that cannot be done as asked; the message is one sentence that says why."""


def check_quant(quant):
    """Refuse an unknown quantization type with one sentence."""
    if quant not in QUANT_TYPES:
        raise QuantError(f"Unknown --quant {quant!r}: choose none, nf4, fp4 or int8.")
    return quant


def bnb_functional():
    """bitsandbytes.functional, or QuantError (one sentence) when bitsandbytes is missing or too old."""
    need = ".".join(map(str, MIN_BITSANDBYTES))
    try:
        import bitsandbytes
    except Exception as e:    # ImportError, or a broken install failing in its own import
        raise QuantError(f"--quant needs bitsandbytes >= {need}, which could not be imported ({type(e).__name__}): "
                         f"pip install 'bitsandbytes>={need}'.") from None
    version = getattr(bitsandbytes, "__version__", "0")
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split("+")[0].split(".")[:2])
    if parts < MIN_BITSANDBYTES:
        raise QuantError(f"--quant needs bitsandbytes >= {need} (the first that quantizes on the CPU as well as on "
                         f"CUDA), but {version} is installed: pip install -U 'bitsandbytes>={need}'.")
    import bitsandbytes.functional as bnb_F
    return bnb_F


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _reason(e):
    """bitsandbytes' own words, as one clause (its first line, without a closing full stop)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].strip().rstrip(".")
    return text or type(e).__name__


def _quantize(bnb_F, w, quant, name=None):
    """(packed, state) of w from bitsandbytes, or QuantError (one sentence naming the tensor, its
    shape and dtype) where bitsandbytes refuses it."""
    what = f"{name or 'a weight'} ({list(w.shape)}, {_dtype_name(w.dtype)})"
    if w.dtype not in QUANT_DTYPES:
        raise QuantError(f"--quant {quant} cannot hold {what} quantized: bitsandbytes quantizes fp32, bf16 and fp16 "
                         "weights only (--precision fp32 loads the base in fp32).")
    try:
        if quant == "int8":
            # A probe on the meta device brings its own code: bitsandbytes would otherwise cache a
            # meta copy of its dynamic code for every later quantize_blockwise of the process.
            meta_code = {"code": torch.empty(256, dtype=torch.float32, device="meta")} if w.is_meta else {}
            return bnb_F.quantize_blockwise(w, **meta_code)
        return bnb_F.quantize_4bit(w, quant_type=quant)
    except (ValueError, RuntimeError, TypeError, AssertionError, NotImplementedError) as e:
        if w.is_meta and isinstance(e, (RuntimeError, NotImplementedError)):
            return None     # a kernel that needs the values ("no data"): asked again with the weight itself
        raise QuantError(f"bitsandbytes cannot hold {what} as {quant} ({_reason(e)}): choose another --quant, "
                         "or none.") from None


def check_quantizable(model, quant):
    """Refuse, before any work, a frozen matrix of `model` that bitsandbytes cannot hold `quant`
    (a dtype it does not take, a shape it refuses): its own checks run on a meta tensor of the same
    shape and dtype, which costs no memory and no arithmetic. One sentence (QuantError)."""
    if check_quant(quant) == "none":
        return
    bnb_F = bnb_functional()
    for key, m in frozen_matrices(model).items():
        w = m.weight
        _quantize(bnb_F, torch.empty(w.shape, dtype=w.dtype, device="meta"), quant, key)


def _bytes(t):
    return t.contiguous().view(torch.uint8).reshape(-1)


class _Packed:
    """What autograd keeps of a dequantized weight: where to dequantize it again, and the view."""
    __slots__ = ("source", "dtype", "size", "stride", "offset")

    def __init__(self, source, dtype, t):
        self.source, self.dtype = source, dtype
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def unpack(self):
        return self.source.dequantize(self.dtype).as_strided(self.size, self.stride, self.offset)


class QuantizedWeight(nn.Module):
    """One weight held quantized by bitsandbytes (nf4, fp4 or int8, default block sizes), made
    on the weight's device (or `device`). dequantize(dtype) gives W back; dequantized(dtype) is
    the same as a context for a forward pass (see the module docstring)."""

    def __init__(self, weight, quant, device=None, name=None):
        super().__init__()
        if check_quant(quant) == "none":
            raise QuantError("QuantizedWeight needs nf4, fp4 or int8, not none.")
        bnb_F = bnb_functional()
        w = weight.detach().to(device) if device is not None else weight.detach()
        self.quant, self.shape, self.dtype = quant, tuple(w.shape), w.dtype
        packed, state = _quantize(bnb_F, w, quant, name)
        self.blocksize = state.blocksize
        # uint8 buffers (absmax and code viewed as bytes): moved by .to(device), never cast.
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", _bytes(state.absmax.float()), persistent=False)
        self.register_buffer("code", _bytes(state.code.float()) if quant == "int8" else None, persistent=False)

    def _dequantize(self, packed, absmax, shape, dtype):
        bnb_F = bnb_functional()
        absmax = absmax.view(torch.float32)
        if self.quant == "int8":
            state = bnb_F.QuantState(absmax=absmax, code=self.code.view(torch.float32), blocksize=self.blocksize,
                                     dtype=dtype)
            return bnb_F.dequantize_blockwise(packed, state)
        # As one flat row: bitsandbytes 0.50's CPU kernel reads a 2-D shape's blocks row by row,
        # wrong when the width is not a multiple of the block size (the blocks run across rows).
        state = bnb_F.QuantState(absmax=absmax, shape=torch.Size((math.prod(shape),)), blocksize=self.blocksize,
                                 quant_type=self.quant, dtype=dtype)
        return bnb_F.dequantize_4bit(packed, state).view(shape)

    def dequantize(self, dtype=None):
        """W (a new tensor) in `dtype`, by default the dtype it had when quantized."""
        return self._dequantize(self.packed, self.absmax, self.shape, dtype or self.dtype)

    def dequantize_rows(self, rows, dtype=None):
        """W[rows] for a 1-D index tensor, dequantizing only the blocks that hold those rows
        (the embedding's lookup); the same values as dequantize()[rows]."""
        n_rows, width = self.shape
        per_group = math.lcm(width, self.blocksize) // width    # rows that fill whole blocks
        if n_rows % per_group:     # the last group would be a partial block: rare shapes only
            return self.dequantize(dtype)[rows]
        groups, where = torch.unique(rows // per_group, return_inverse=True)
        n_groups = n_rows // per_group
        packed = self.packed.reshape(n_groups, -1)[groups]
        absmax = self.absmax.view(n_groups, -1)[groups]
        w = self._dequantize(packed.reshape(-1, *self.packed.shape[1:]), absmax.reshape(-1),
                             (len(groups) * per_group, width), dtype or self.dtype)
        return w[where * per_group + rows % per_group]

    @contextmanager
    def dequantized(self, dtype=None):
        """W dequantized for one forward pass. Autograd saves it (or a view of it) as a _Packed
        note and dequantizes again in the backward pass; other tensors go to the hooks already
        in force (non-reentrant checkpointing), or are kept as usual."""
        w = self.dequantize(dtype)
        where, dtype = (w.device, w.untyped_storage().data_ptr()), w.dtype   # the hooks must not hold w
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

        def pack(t):
            if (t.device, t.untyped_storage().data_ptr()) == where:
                return _Packed(self, dtype, t)
            return outer[0](t) if outer else t

        def unpack(p):
            if isinstance(p, _Packed):
                return p.unpack()
            return outer[1](p) if outer else p

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield w

    def nbytes(self):
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self):
        return f"{self.quant}, shape={list(self.shape)}, blocksize={self.blocksize}"


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is held quantized (the head, or a projection that is not
    adapted): y = x W^T with W dequantized per use, in the activations' (or autocast's) dtype."""

    def __init__(self, base: nn.Linear, quant, device=None, name=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized = QuantizedWeight(base.weight, quant, device, name)
        self.register_parameter("bias", base.bias)

    def forward(self, x):
        dtype = compute_dtype(x) or x.dtype
        with self.quantized.dequantized(dtype) as w, torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype))


class QuantEmbedding(nn.Module):
    """A frozen nn.Embedding held quantized: only the blocks of the rows looked up are
    dequantized, in the dtype of `like` (a parameter of the model, here ln_out.weight), so the
    rows follow whatever cast the model goes through (DeepSpeed's bf16, model.half())."""

    def __init__(self, base: nn.Embedding, quant, like, device=None, name=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.quantized = QuantizedWeight(base.weight, quant, device, name)
        self._like = (like,)    # in a tuple: not registered, so not a second name for that parameter

    def forward(self, idx):
        rows = self.quantized.dequantize_rows(idx.reshape(-1), self._like[0].dtype)
        return rows.view(*idx.shape, self.embedding_dim)


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def frozen_matrices(model):
    """{weight key: module} of what quantize_model holds quantized: adapter layers, and every
    nn.Linear / nn.Embedding whose weight does not train, in model order."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AdapterLinear) and getattr(m, "quantized", None) is None:
            out[f"{name}.weight"] = m
        elif isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.requires_grad:
            out[f"{name}.weight"] = m
    return out


def quantize_model(model, quant, device=None, keys=None):
    """Hold the frozen matrices of `model` (frozen_matrices, or only `keys`) quantized with
    `quant`, each made on `device` (default: where the weight is) and kept there, the full
    precision weight released as it goes. Call it after the adapters are applied. Records
    {"type", "keys"} as model._base_quant (save_adapter writes it into the file's metadata).
    Returns the list of weight keys now held quantized."""
    if check_quant(quant) == "none":
        return []
    bnb_functional()
    found = frozen_matrices(model)
    if keys is not None:
        missing = [k for k in keys if k not in found]
        if missing:
            raise QuantError(f"{missing[0]} is not a frozen matrix of this model, so it cannot be held quantized.")
        found = {k: found[k] for k in keys}
    for key, m in found.items():
        name = key[:-len(".weight")]
        if isinstance(m, AdapterLinear):
            m.quantized = QuantizedWeight(m.weight, quant, device, key)
            del m.weight
        elif isinstance(m, nn.Linear):
            _set_submodule(model, name, QuantLinear(m, quant, device, key))
        else:
            _set_submodule(model, name, QuantEmbedding(m, quant, model.ln_out.weight, device, key))
    model._base_quant = {"type": quant, "keys": list(found)}
    return list(found)


def rounded(weight, quant, name=None):
    """dequantize(quantize(W)) in fp32: the base that a --quant run trains against. A weight of a
    dtype bitsandbytes does not take (float64) is rounded to fp32 first, as train.py --precision
    fp32 loads it."""
    if weight.dtype not in QUANT_DTYPES:
        weight = weight.float()
    return QuantizedWeight(weight, quant, name=name).dequantize(torch.float32)


def quantized_nbytes(model):
    """Bytes held by the quantized weights of `model` (packed data, absmax, code)."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedWeight))
