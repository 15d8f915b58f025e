"""The CUDA sources compile cleanly (nvcc, no GPU needed), and the loader fails with one
clear sentence when it cannot build."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.utils import cpp_extension

from src.ops import wkv6_cuda
from src.ops.wkv6 import wkv6
from src.ops.wkv6_cuda import CUDA_DIR, WKV6BuildError, WKV6CudaError

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH, so the CUDA sources cannot be compile-checked")

KERNEL_FLAGS = ["-std=c++20", "-O3", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
                "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# Register spills would mean the per-thread state no longer fits in registers: an error for
# the head sizes of real models. N = 128 keeps a known small spill in the backward rows kernel.
NO_SPILLS = ["-Xptxas", "-warn-spills,-warn-lmem-usage"]
COMPILES = {
    "kernel N=64": lambda out: [NVCC, "-c", str(CUDA_DIR / "wkv6_cuda.cu"), "-D_N_=64", "-o", str(out),
                                *KERNEL_FLAGS, *NO_SPILLS],
    "kernel N=32": lambda out: [NVCC, "-c", str(CUDA_DIR / "wkv6_cuda.cu"), "-D_N_=32", "-o", str(out),
                                *KERNEL_FLAGS, *NO_SPILLS],
    "kernel N=128": lambda out: [NVCC, "-c", str(CUDA_DIR / "wkv6_cuda.cu"), "-D_N_=128", "-o", str(out),
                                 *KERNEL_FLAGS],
}


def _binding_command(stub_dir, out, op="wkv6"):
    # nvcc as the driver supplies the CUDA include path; torch headers are system headers so
    # that -Werror applies to our file only.
    includes = [arg for path in cpp_extension.include_paths() for arg in ("-isystem", path)]
    return [NVCC, "-std=c++20", "-c", str(CUDA_DIR / f"{op}_op.cpp"), "-o", str(out),
            f"-DTORCH_EXTENSION_NAME={op}_check",
            *includes, "-isystem", str(stub_dir), "-Xcompiler", "-fsyntax-only,-Wall,-Wextra,-Werror"]


def _stub_headers(tmp):
    """A CPU build of torch lacks this generated header, which only sets build-time macros."""
    stub = tmp / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return stub


def run_compiles(commands):
    """Starts every compile at once (they take seconds each, and there are several cores),
    then hands out (returncode, output) by name."""
    running = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name, cmd in commands.items()}
    return {name: (p.wait(), p.stdout.read()) for name, p in running.items()}


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    """Starts every compile at once (they take seconds each, and there are several cores),
    then hands out (returncode, output) by name."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("wkv6_nvcc")
    commands = {name: make(tmp / f"{i}.o") for i, (name, make) in enumerate(COMPILES.items())}
    commands["binding"] = _binding_command(_stub_headers(tmp), tmp / "binding.o")
    return run_compiles(commands)


@needs_nvcc
@pytest.mark.parametrize("name", [*COMPILES, "binding"])
def test_compiles_without_warnings(compile_results, name):
    returncode, output = compile_results[name]
    assert returncode == 0, f"{name}:\n{output}"


def _fake_nvcc(tmp_path):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    return str(tmp_path)


def _one_sentence(message):
    return "\n" not in message and message.endswith(".") and "--op cpu" in message


def test_missing_nvcc_is_one_sentence_naming_op_cpu(monkeypatch):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(WKV6BuildError, match="nvcc") as error:
        wkv6_cuda.check_toolchain()
    assert isinstance(error.value, RuntimeError) and _one_sentence(str(error.value)), str(error.value)
    assert "ninja" not in str(error.value) or shutil.which("ninja") is None


def test_missing_ninja_is_one_sentence_naming_op_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_nvcc(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # nvcc but no ninja
    with pytest.raises(WKV6BuildError, match="because ninja .* is missing") as error:
        wkv6_cuda.check_toolchain()
    assert _one_sentence(str(error.value)), str(error.value)


def test_both_missing_are_named_together(monkeypatch, tmp_path):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WKV6BuildError, match="nvcc .* and ninja .* are missing"):
        wkv6_cuda.check_toolchain()


def test_cpu_tensors_are_refused_with_op_cpu_hint():
    r = torch.zeros(1, 2, 1, 64)
    for call in (lambda: wkv6_cuda.wkv6_cuda(r, r, r, r, torch.zeros(1, 64)),
                 lambda: wkv6(r, r, r, r, torch.zeros(1, 64), op="cuda")):
        with pytest.raises(WKV6CudaError, match="got them on cpu") as error:
            call()
        assert _one_sentence(str(error.value)), str(error.value)


def test_failed_build_is_one_sentence_and_restores_arch_list(monkeypatch, tmp_path):
    def failing_load(**kwargs):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # exactly the GPU's architecture
        raise RuntimeError("Error building extension 'wkv6_n64_sm90'\nnvcc fatal : something")

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(WKV6BuildError, match=r"failed \(Error building extension 'wkv6_n64_sm90';") as error:
        wkv6_cuda._compile("wkv6_n64_sm90", 64, "90", tmp_path)
    assert _one_sentence(str(error.value)), str(error.value)
    assert isinstance(error.value.__cause__, RuntimeError)  # the compiler output stays reachable
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5"


def test_build_goes_to_a_directory_per_head_size_and_architecture(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(wkv6_cuda.BUILD, "check_toolchain", lambda: None)
    wkv6_cuda._build(32, "80", tmp_path)
    directory = os.path.relpath(seen["build_directory"], tmp_path)
    assert re.fullmatch(r"N32_sm80_torch[0-9A-Za-z._]+_[0-9a-f]{12}", directory), directory
    assert "-D_N_=32" in seen["extra_cuda_cflags"] and "-D_N_=32" in seen["extra_cflags"]
    assert seen["name"] == "wkv6_n32_sm80"


def test_cache_location_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv(wkv6_cuda.CACHE_ENV, raising=False)
    assert wkv6_cuda.cache_root() == wkv6_cuda.DEFAULT_CACHE.expanduser()
    monkeypatch.setenv(wkv6_cuda.CACHE_ENV, str(tmp_path / "env"))
    assert wkv6_cuda.cache_root() == tmp_path / "env"
    assert wkv6_cuda.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_the_build_directory_is_keyed_by_sources_and_flags(monkeypatch, tmp_path):
    """Two checkouts with different kernels (or flags) sharing one cache never share a build."""
    here = wkv6_cuda.build_directory(tmp_path, 64, "90")
    assert here == wkv6_cuda.build_directory(tmp_path, 64, "90")
    assert here != wkv6_cuda.build_directory(tmp_path, 32, "90")
    other = tmp_path / "checkout"
    shutil.copytree(wkv6_cuda.CUDA_DIR, other)
    with open(other / "wkv6_cuda.cu", "a") as f:
        f.write("// another version\n")
    monkeypatch.setattr(wkv6_cuda.BUILD, "cuda_dir", other)
    assert wkv6_cuda.build_directory(tmp_path, 64, "90") != here
    monkeypatch.setattr(wkv6_cuda.BUILD, "build_flags", lambda n: {"extra_cflags": ["-O0"], "extra_cuda_cflags": []})
    monkeypatch.setattr(wkv6_cuda.BUILD, "cuda_dir", wkv6_cuda.CUDA_DIR)
    assert wkv6_cuda.build_directory(tmp_path, 64, "90") != here


def test_a_cached_build_loads_without_the_toolchain(monkeypatch, tmp_path):
    """The toolchain is checked only before a build: a built library loads directly."""
    directory = wkv6_cuda.build_directory(tmp_path, 64, "90")
    directory.mkdir(parents=True)
    (directory / "wkv6_n64_sm90.so").write_bytes(b"")
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(wkv6_cuda.BUILD, "check_toolchain", lambda: pytest.fail("checked the toolchain for a cached build"))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("rebuilt a cached build"))
    wkv6_cuda._build(64, "90", tmp_path)
    assert loaded == [str(directory / "wkv6_n64_sm90.so")]
    assert os.listdir(directory) == ["wkv6_n64_sm90.so"]     # the builder's lock is released


def test_a_killed_builds_locks_are_removed_and_said(monkeypatch, tmp_path, capsys):
    directory = wkv6_cuda.build_directory(tmp_path, 64, "90")
    directory.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (directory / "builder.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (directory / "lock").write_text("")        # torch's FileBaton, left by the killed build
    monkeypatch.setattr(wkv6_cuda.BUILD, "check_toolchain", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: None)
    wkv6_cuda._build(64, "90", tmp_path)
    err = capsys.readouterr().err
    assert f"removed the stale lock {directory / 'builder.lock'} (pid {dead.pid} is no longer running)" in err
    assert f"removed {directory / 'lock'}, left by a build that was interrupted" in err
    assert os.listdir(directory) == []


def test_a_live_build_is_waited_for_naming_the_file(monkeypatch, tmp_path, capsys):
    directory = wkv6_cuda.build_directory(tmp_path, 64, "90")
    directory.mkdir(parents=True)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    (directory / "builder.lock").write_text(json.dumps({"pid": builder.pid, "host": socket.gethostname()}))
    threading.Thread(target=lambda: (builder.wait(), (directory / "builder.lock").unlink())).start()
    monkeypatch.setattr(wkv6_cuda.BUILD, "check_toolchain", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: None)
    start = time.time()
    wkv6_cuda._build(64, "90", tmp_path)
    assert time.time() - start > 0.5
    assert (f"waiting for the build in progress by pid {builder.pid} (lock file {directory / 'builder.lock'})"
            in capsys.readouterr().err)


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("readelf") is None, reason="needs nvcc and readelf")
def test_registers_spills_and_code_size_on_sm90():
    """ptxas's report and the cubin's sections for sm_90, N = 64 (tests/ptxas.py): no kernel
    spills, none has more than 64 KB of code, and the backward kernel that runs two blocks per
    (b, h) fits 128 registers (8 blocks an SM)."""
    from tests import ptxas
    figures = ptxas.report(arch=90, head_size=64)
    assert len(figures) == 6, figures      # 3 kernels x (bf16, fp32)
    for kernel, f in figures.items():
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0, (kernel, f)
        assert f["code_bytes"] <= 64 * 1024, (kernel, f)
        if kernel.startswith("wkv6_backward_columns_kernel"):
            assert f["registers"] <= 128, (kernel, f)
