"""Building and loading the CUDA ops in cuda/ (WKV6, WKV7): one piece, parameterised by op.

The first call for a given head size and GPU architecture compiles the op's sources with
torch.utils.cpp_extension (ninja + nvcc) into a cache directory,
{cache root}/N{head size}_sm{arch}_torch{version}_{hash}, the hash being of the sources, the
headers they share and the flags (two checkouts sharing the cache never load each other's
build). The cache root is build_dir, else the op's environment variable (read at call time),
else its default under ~/.cache/rwkv6_bone/. Later runs load the built library directly (no
toolchain needed). A builder holds `builder.lock` (its pid) in that directory: a build
killed midway leaves it and torch's `lock`, which the next run removes, saying so; a live
build is waited for, naming the file. Failures are the op's BuildError, one sentence that
points to `--op cpu`; there is no silent fallback.
"""
import hashlib
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from ..checkpoint import release_pid_lock, take_pid_lock

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
SHARED_HEADERS = ("wkv_binding.h", "wkv_device.cuh")  # included by every op's binding or kernel: part of every build's hash


class CudaOp:
    """One CUDA op's build: `name` ("wkv6") names the libraries (wkv6_n64_sm90) and the
    messages, `title` ("WKV6") the error sentences; `sources` are file names in `cuda_dir`."""

    def __init__(self, name, title, sources, cache_env, default_cache, build_error, cuda_dir=CUDA_DIR):
        self.name, self.title, self.sources = name, title, tuple(sources)
        self.cache_env, self.default_cache = cache_env, Path(default_cache)
        self.build_error, self.cuda_dir = build_error, Path(cuda_dir)
        self._modules, self._lock = {}, threading.Lock()

    def cache_root(self, build_dir=None):
        """Where builds go: build_dir, else $cache_env, else default_cache."""
        return Path(build_dir or os.environ.get(self.cache_env) or self.default_cache).expanduser()

    def check_toolchain(self):
        """Raise build_error if nvcc or ninja, which the build needs, cannot be found."""
        nvcc = cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        missing = [name for name, ok in (
            ("nvcc (the CUDA toolkit; set CUDA_HOME)", nvcc and os.access(nvcc, os.X_OK)),
            ("ninja (pip install ninja)", shutil.which("ninja")),
        ) if not ok]
        if missing:
            raise self.build_error(
                f"Cannot build the CUDA {self.title} kernel because {' and '.join(missing)} "
                f"{'is missing; install it' if len(missing) == 1 else 'are missing; install them'} "
                "or run with --op cpu.")

    def load(self, head_size, device=None, build_dir=None):
        """Build (first time) or load the kernels for this head size and the GPU of `device`."""
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"{major}{minor}"
        key = (head_size, arch)
        with self._lock:
            if key not in self._modules:
                self._modules[key] = self.build(head_size, arch, self.cache_root(build_dir))
            return self._modules[key]

    def build_flags(self, head_size):
        return {"extra_cflags": ["-O2", f"-D_N_={head_size}"],
                "extra_cuda_cflags": ["-O3", "-Xptxas", "-O3", f"-D_N_={head_size}"]}

    def build_directory(self, root, head_size, arch):
        """root/N{N}_sm{arch}_torch{version}_{hash of the sources, shared headers and flags}."""
        digest = hashlib.sha256(repr(sorted(self.build_flags(head_size).items())).encode())
        for name in (*self.sources, *SHARED_HEADERS):
            digest.update((self.cuda_dir / name).read_bytes())
        torch_version = re.sub(r"[^0-9A-Za-z.]", "_", torch.__version__)
        return Path(root) / f"N{head_size}_sm{arch}_torch{torch_version}_{digest.hexdigest()[:12]}"

    def say(self, message):
        print(f"{self.name} cuda: {message}", file=sys.stderr, flush=True)

    def take_builder_lock(self, directory, wait_seconds=1.0):
        """Hold directory/builder.lock: wait (saying which file) while a live process builds there;
        a dead builder's lock and the `lock` file torch's build leaves behind are removed."""
        path, said = directory / "builder.lock", False
        while True:
            owner = take_pid_lock(str(path), say=self.say)
            if owner is None:
                break
            if not said:
                self.say(f"waiting for the build in progress by pid {owner.get('pid')} (lock file {path})")
                said = True
            time.sleep(wait_seconds)
        stale = directory / "lock"    # torch's FileBaton: nobody else is building now, so it is left over
        if stale.exists():
            stale.unlink()
            self.say(f"removed {stale}, left by a build that was interrupted")
        return path

    def build(self, head_size, arch, root):
        name = f"{self.name}_n{head_size}_sm{arch}"
        directory = self.build_directory(root, head_size, arch)
        directory.mkdir(parents=True, exist_ok=True)
        library = directory / f"{name}.so"
        lock = self.take_builder_lock(directory)
        try:
            if library.exists():           # built before from these very sources and flags
                torch.ops.load_library(str(library))
                return getattr(torch.ops, name)
            self.check_toolchain()
            self.compile(name, head_size, arch, directory)
            return getattr(torch.ops, name)
        finally:
            release_pid_lock(str(lock))

    def compile(self, name, head_size, arch, directory):
        # Build for exactly this GPU; torch reads the architecture list from the environment.
        saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[:-1]}.{arch[-1]}"
        try:
            cpp_extension.load(name=name, sources=[str(self.cuda_dir / s) for s in self.sources],
                               build_directory=str(directory), is_python_module=False, verbose=False,
                               **self.build_flags(head_size))
        except Exception as error:
            summary = (str(error).strip().splitlines() or [type(error).__name__])[0]
            summary = summary if len(summary) <= 120 else summary[:117] + "..."
            raise self.build_error(
                f"Building the CUDA {self.title} kernel in {directory} failed ({summary}; the compiler "
                "output is in the chained error); fix the toolchain or run with --op cpu.") from error
        finally:
            if saved is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def check_one_gpu(title, *tensors, error):
    """Raise `error` unless every tensor given (None skipped) is on one and the same GPU."""
    present = [x for x in tensors if x is not None]
    devices = sorted({str(x.device) for x in present})
    if not (present[0].is_cuda and len(devices) == 1):
        raise error(
            f"The CUDA {title} op needs all its tensors on one GPU but got them on {', '.join(devices)}; "
            "move the model to a GPU or run with --op cpu.")
