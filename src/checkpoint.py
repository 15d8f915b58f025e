"""Reading and writing official-layout .pth files, and fresh x060 and x070 weights."""
import ctypes
import functools
import io
import json
import math
import mmap
import os
import pickle
import socket
import sys
import tempfile
from collections import OrderedDict

import torch

from .config import CheckpointError, RWKV6Config, RWKV7Config, read_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_state_dict(path, mmap=True, what="an RWKV model file"):
    """A .pth file as a dict of tensors. weights_only=True: a stranger's file cannot run code.
    `what` is what the user should have given, for a file that is no PyTorch file at all."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist or is not a file.")
    with open(path, "rb") as f:
        magic = f.read(2)
    if not magic.startswith((b"PK", b"\x80")):  # neither torch.save's zip nor its older pickle format
        # (torch's own message would advise re-saving it with torch.save)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (.pth) file: give {what}.")
    if magic.startswith(b"\x80"):
        mmap = False                            # the older format cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many kinds; the user needs one sentence
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} could not be read as a PyTorch weights file ({reason}).") from e


def load_checkpoint(path, mmap=True):
    """(state dict, config) of an RWKV-6 or RWKV-7 checkpoint (the config says which family),
    refusing anything else with one sentence."""
    sd = load_state_dict(path, mmap=mmap)
    return sd, read_config(sd, source=os.fspath(path))


def output_directory(output, error=ValueError):
    """The directory --output goes in, which must exist: a mistyped path is refused, never made
    without a word (merge.py, export.py)."""
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise error(f"--output {output}: the directory {os.path.dirname(os.fspath(output))} does not exist: create it "
                    "first or give another --output.")
    return directory


def temporary_file(path):
    """(fd, name) of a new temporary file beside `path`: .tmp-PID-RANDOM-NAME. The pid says
    whether its writer still lives (clean_stale_temporaries), the name whose it is."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    return tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=f"-{name}", dir=directory)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's live process
        return True
    return True


def take_pid_lock(path, say=print):
    """Create the lock file `path` holding this process's pid and host. Returns None when taken,
    else the owner ({"pid", "host"}, or {} when unreadable) of a lock held by a live process; a
    lock whose process is gone (same host) is stale: removed, said, and taken."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except FileNotFoundError:
                continue        # released in between: try again
            except (OSError, ValueError):
                return {}
            if owner.get("host") == me["host"] and not pid_alive(owner.get("pid", -1)):
                os.remove(path)
                say(f"removed the stale lock {path} (pid {owner.get('pid')} is no longer running)")
                continue
            return owner
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None


def release_pid_lock(path):
    """Remove `path` if this process holds it."""
    try:
        with open(path) as f:
            if json.load(f).get("pid") == os.getpid():
                os.remove(path)
    except (OSError, ValueError):
        pass


def clean_stale_temporaries(path, say=print):
    """Remove the temporaries that a killed writer of `path` (a file, or every file of a
    directory when `path` is one) left behind; a live writer's are left alone. Returns how many."""
    path = os.path.abspath(os.fspath(path))
    directory, name = (path, None) if os.path.isdir(path) else os.path.split(path)
    if not os.path.isdir(directory):
        return 0
    stale = []
    for entry in os.listdir(directory):
        parts = entry.split("-", 3)     # .tmp, pid, random, name
        if len(parts) < 4 or parts[0] != ".tmp" or not parts[1].isdigit():
            continue
        target = parts[3]
        while name and target != name and target.startswith(".tmp-") and target.count("-") >= 3:
            target = target.split("-", 3)[3]    # a temporary of a temporary (merge.py --format's merged .pth)
        if name and target != name:
            continue
        if int(parts[1]) != os.getpid() and not pid_alive(int(parts[1])):
            stale.append(os.path.join(directory, entry))
    if stale:
        size = sum(os.path.getsize(p) for p in stale)
        for p in stale:
            os.remove(p)
        say(f"removed {len(stale)} temporaries ({size / 1e6:.1f} MB) left by an interrupted run in {directory}")
    return len(stale)


def check_finite(key, tensor, source):
    """One sentence naming the tensor when it holds NaN or Inf (a damaged or diverged checkpoint)."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{source}: {key} holds {bad:,} NaN or Inf values: the checkpoint is damaged or "
                              "diverged; use a healthy base model.")


def atomic_write(path, write):
    """Call write(binary file) on a temporary file beside `path`, then rename it to `path`:
    a crash leaves either the old file or the new one, never half a file (and the next
    clean_stale_temporaries removes the crashed run's temporary)."""
    path = os.fspath(path)
    fd, tmp = temporary_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(sd, path, dtype="bf16"):
    """Write tensors as the official files are: a flat, plain dict, every tensor contiguous and in `dtype`."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    atomic_save(OrderedDict((k, v.detach().to("cpu", dtype).contiguous()) for k, v in sd.items()), path)


class _Record:
    """One storage record of a .pth file, pickled as torch.save pickles a storage."""
    STORAGE_TYPES = {torch.float32: "FloatStorage", torch.float64: "DoubleStorage",
                     torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage"}

    def __init__(self, key, dtype, numel):
        if dtype not in self.STORAGE_TYPES:
            raise CheckpointError(f"Cannot write {dtype} tensors: use bf16, fp16 or fp32.")
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles exactly as a contiguous tensor at the start of its own storage does (the
    torch._utils._rebuild_tensor_v2 call), without the data."""

    def __init__(self, record, shape):
        self.record, self.shape = record, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.record, 0, self.shape, stride, False, OrderedDict())


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Record):
            return ("storage", getattr(torch, _Record.STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def stream_checkpoint(path, specs, produce, written=None):
    """Write a flat dict of tensors as torch.save(dict, f) would, holding one tensor at a time.

    specs: {key: (shape, dtype)} in file order. produce(key) is called once per key, in that
    order, and returns the tensor (any device/layout; it is checked against the spec and made a
    contiguous CPU tensor). The pickle, which only names each storage, is written first, then
    the storages one by one, so a model larger than memory can be written. written(key), if
    given, is called once a tensor's bytes are in the file. Atomic: a failure
    anywhere (produce included) leaves no file behind."""
    records = OrderedDict((key, _Record(str(i), dtype, math.prod(shape))) for i, (key, (shape, dtype)) in enumerate(specs.items()))
    stubs = {key: _TensorStub(records[key], shape) for key, (shape, _) in specs.items()}
    buffer = io.BytesIO()
    _StubPickler(buffer, protocol=2).dump(stubs)
    header = buffer.getvalue()

    def write(f):
        with torch.serialization._open_zipfile_writer(f) as archive:
            archive.write_record("data.pkl", header, len(header))
            archive.write_record(".format_version", "1", 1)
            if hasattr(torch.serialization, "_get_storage_alignment"):   # torch >= 2.5 writes it too
                alignment = str(torch.serialization._get_storage_alignment())
                archive.write_record(".storage_alignment", alignment, len(alignment))
            archive.write_record("byteorder", sys.byteorder, len(sys.byteorder))
            for key, record in records.items():
                shape, dtype = specs[key]
                t = produce(key)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ValueError(f"stream_checkpoint: {key} came as {t.dtype} {list(t.shape)}, "
                                     f"but the spec says {dtype} {list(shape)}.")
                t = t.detach().to("cpu").contiguous()
                storage = t.untyped_storage()
                if t.storage_offset() or storage.nbytes() != t.nbytes:   # a view: write just its bytes
                    storage = t.clone().untyped_storage()
                archive.write_record(f"data/{record.key}", storage, t.nbytes)
                del t, storage
                if written is not None:
                    written(key)

    atomic_write(path, write)


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def trim_heap():
    """Hand freed heap memory back to the system (glibc malloc_trim). Temporaries freed by
    torch's worker threads sit in per-thread malloc arenas that glibc rarely shrinks on its own,
    so a long tensor-by-tensor job can otherwise look as if it held everything it ever made."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=None)
def _madvise():
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def release_pages(t):
    """Let the kernel take back the resident pages under `t` now (madvise MADV_PAGEOUT): for a
    tensor of a file loaded with mmap=True, which is read once and never written, they simply
    leave this process's memory and would be read from the file again if touched, so walking a
    whole checkpoint costs one tensor's worth of memory rather than the file's. Safe on any
    memory (anonymous pages would go to swap); a no-op where the call is unavailable."""
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu" or t.nbytes == 0:
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page                  # whole pages inside the tensor only
    end = (t.data_ptr() + t.nbytes) // page * page
    if end > start:
        madvise(start, end - start, 21)                       # MADV_PAGEOUT (Linux 5.4+; else EINVAL, ignored)


def _uniform(shape, a, g):
    return torch.empty(shape).uniform_(-a, a, generator=g)


def _orthogonal(shape, gain, g):
    # torch.nn.init.orthogonal_ has no generator argument: QR of a seeded Gaussian, as it does.
    rows, cols = shape
    q, r = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g))
    q = q * torch.sign(torch.diagonal(r))
    return (gain * (q if rows >= cols else q.T)).contiguous()    # QR's Q is column-major; files are not


def _linear(shape, scale, g):
    gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
    return torch.zeros(shape) if scale == 0 else _orthogonal(shape, gain * scale, g)


def _head(shape, g):
    return _orthogonal(shape, 0.5 * math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 0.5, g)


def _shared_init(key, shape, layer, L, g):
    """What both families initialise alike (emb, head, the LayerNorms and ln_x), else None."""
    if key == "emb.weight":
        return _uniform(shape, 1e-4, g)
    if key == "head.weight":
        return _head(shape, g)
    if ".ln_x." in key:
        return torch.full(shape, ((1 + layer) / L) ** 0.7) if key.endswith("weight") else torch.zeros(shape)
    if ".ln" in key or key.startswith("ln_out"):
        return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    return None


def _layer_ratios(key, L):
    layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
    return layer, (layer / (L - 1) if L > 1 else 0.0), 1.0 - layer / L   # r01: 0 -> 1, r10: 1 -> ~0


def x060_state_dict(config: RWKV6Config, seed=0):
    """Fresh weights with the public x060 initialisation scheme (RWKV-LM's RWKV-6 code), fp32,
    in the official key order. Note att.output, ffn.value and ffn.receptance start at zero."""
    g = torch.Generator().manual_seed(seed)
    C, A, L, N = config.n_embd, config.dim_att, config.n_layer, config.head_size
    ddd = (torch.arange(C) / C).view(1, 1, C)
    n = torch.arange(A, dtype=torch.float64)

    sd = OrderedDict()
    for key, shape in config.shapes().items():
        name = key.split(".")[-2] if key.endswith(".weight") else key.split(".")[-1]
        layer, r01, r10 = _layer_ratios(key, L)
        if (shared := _shared_init(key, shape, layer, L, g)) is not None:
            sd[key] = shared
        elif name in ("time_maa_x", "time_maa_w", "time_maa_k"):
            sd[key] = 1.0 - ddd.pow(r10)
        elif name == "time_maa_v":
            sd[key] = 1.0 - (ddd.pow(r10) + 0.3 * r01)
        elif name in ("time_maa_r", "time_maa_g"):
            sd[key] = 1.0 - ddd.pow(0.5 * r10) if ".att." in key else 1.0 - ddd.pow(r10)
        elif name in ("time_maa_w1", "time_decay_w1"):
            sd[key] = torch.zeros(shape)
        elif name in ("time_maa_w2", "time_decay_w2"):
            sd[key] = _uniform(shape, 0.01, g)
        elif name == "time_decay":
            sd[key] = (-6 + 5 * (n / (A - 1)) ** (0.7 + 1.3 * r01)).float().view(shape)
        elif name == "time_faaaa":
            sd[key] = (r01 * (1 - n / (A - 1)) + ((n + 1) % 3 - 1) * 0.1).float().view(A // N, N)
        else:  # projection weights
            zero = ".att.output." in key or ".ffn.value." in key or ".ffn.receptance." in key
            small = ".att.key." in key or ".att.gate." in key
            sd[key] = _linear(shape, 0.0 if zero else 0.1 if small else 1.0, g)
        assert tuple(sd[key].shape) == shape, key
    return sd


def x070_state_dict(config: RWKV7Config, seed=0):
    """Fresh weights with the public x070 initialisation scheme (RWKV-LM's RWKV-7 code), fp32,
    in the official key order. att.output and ffn.value start at zero, w1/a1/v1/g1 too."""
    g = torch.Generator().manual_seed(seed)
    C, L, N = config.n_embd, config.n_layer, config.head_size
    ddd = (torch.arange(C) / C).view(1, 1, C)
    n = torch.arange(C, dtype=torch.float32)
    linear = n / (C - 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    mix = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}

    sd = OrderedDict()
    for key, shape in config.shapes().items():
        name = key.split(".")[-2] if key.endswith(".weight") else key.split(".")[-1]
        layer, r01, r10 = _layer_ratios(key, L)
        vector = lambda t: t.view(1, 1, C).clone()  # noqa: E731
        if (shared := _shared_init(key, shape, layer, L, g)) is not None:
            sd[key] = shared
        elif ".ffn.x_k" in key:
            sd[key] = 1.0 - ddd.pow(r10 ** 4)
        elif name in mix:
            sd[key] = 1.0 - ddd.pow(mix[name] * r10)
        elif name == "w0":
            sd[key] = vector(-6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3) + 0.5 + zigzag * 2.5)
        elif name == "a0":
            sd[key] = vector(-0.19 + zigzag * 0.3 + linear * 0.4)
        elif name == "v0":
            sd[key] = vector(0.73 - linear * 0.4)
        elif name == "k_k":
            sd[key] = vector(0.71 - linear * 0.1)
        elif name == "k_a":
            sd[key] = torch.full(shape, 1.02)
        elif name == "r_k":
            sd[key] = torch.full(shape, -0.04)
        elif name in ("w1", "a1", "v1", "g1"):
            sd[key] = torch.zeros(shape)
        elif name in ("w2", "a2", "v2", "g2"):
            sd[key] = _linear(shape, 0.1, g)
        else:  # projection weights
            zero = ".att.output." in key or ".ffn.value." in key
            sd[key] = _linear(shape, 0.0 if zero else 0.1 if ".att.key." in key else 1.0, g)
        assert tuple(sd[key].shape) == shape, key
    return sd


def default_dim_ffn(n_embd, family="x060"):
    return 4 * n_embd if family == "x070" else int(n_embd * 3.5) // 32 * 32


def x070_lora_widths(n_embd):
    """RWKV-LM's suggested low-rank widths for x070 (w, a, v, g), multiples of 32."""
    width = lambda factor, least=32: max(least, int(round(factor * n_embd ** 0.5 / 32) * 32))  # noqa: E731
    return {"w_lora": width(2.5), "a_lora": width(2.5), "v_lora": width(1.7), "g_lora": width(5)}


def new_config(family="x060", vocab_size=65536, n_embd=768, n_layer=12, dim_ffn=None, head_size=64):
    """The config of a fresh model of either family, with the official default widths."""
    dim_ffn = dim_ffn or default_dim_ffn(n_embd, family)
    if family == "x070":
        return RWKV7Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, dim_ffn=dim_ffn,
                           head_size=head_size, **x070_lora_widths(n_embd))
    return RWKV6Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, dim_att=n_embd,
                       dim_ffn=dim_ffn, head_size=head_size)


def fresh_state_dict(config, seed=0):
    """Fresh weights of config's family (x060_state_dict or x070_state_dict)."""
    return (x070_state_dict if config.family == "x070" else x060_state_dict)(config, seed)


def make_checkpoint(path, vocab_size=65536, n_embd=768, n_layer=12, dim_ffn=None, head_size=64,
                    seed=0, dtype="bf16", family="x060"):
    """Create a fresh model of `family` (x060 or x070) and save it as an official-layout .pth.
    Returns its config."""
    config = new_config(family, vocab_size, n_embd, n_layer, dim_ffn, head_size)
    save_checkpoint(fresh_state_dict(config, seed), path, dtype)
    return config
