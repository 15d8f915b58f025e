"""The CUDA sources compile cleanly (nvcc, no GPU needed), and the loader fails with one
clear sentence when it cannot build."""
import os
import shutil
import subprocess

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


def _binding_command(stub_dir, out):
    # nvcc as the driver supplies the CUDA include path; torch headers are system headers so
    # that -Werror applies to our file only.
    includes = [arg for path in cpp_extension.include_paths() for arg in ("-isystem", path)]
    return [NVCC, "-std=c++20", "-c", str(CUDA_DIR / "wkv6_op.cpp"), "-o", str(out), "-DTORCH_EXTENSION_NAME=wkv6_check",
            *includes, "-isystem", str(stub_dir), "-Xcompiler", "-fsyntax-only,-Wall,-Wextra,-Werror"]


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    """Starts every compile at once (they take seconds each, and there are several cores),
    then hands out (returncode, output) by name."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("wkv6_nvcc")
    # A CPU build of torch lacks this generated header, which only sets build-time macros.
    stub = tmp / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    commands = {name: make(tmp / f"{i}.o") for i, (name, make) in enumerate(COMPILES.items())}
    commands["binding"] = _binding_command(stub, tmp / "binding.o")
    running = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name, cmd in commands.items()}
    return {name: (p.wait(), p.stdout.read()) for name, p in running.items()}


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
        wkv6_cuda.load_extension(64)
    assert isinstance(error.value, RuntimeError) and _one_sentence(str(error.value)), str(error.value)
    assert "ninja" not in str(error.value) or shutil.which("ninja") is None


def test_missing_ninja_is_one_sentence_naming_op_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_nvcc(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # nvcc but no ninja
    with pytest.raises(WKV6BuildError, match="because ninja .* is missing") as error:
        wkv6_cuda.load_extension(64)
    assert _one_sentence(str(error.value)), str(error.value)


def test_both_missing_are_named_together(monkeypatch, tmp_path):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WKV6BuildError, match="nvcc .* and ninja .* are missing"):
        wkv6_cuda.load_extension(64)


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
        wkv6_cuda._build(64, "90", tmp_path)
    assert _one_sentence(str(error.value)), str(error.value)
    assert isinstance(error.value.__cause__, RuntimeError)  # the compiler output stays reachable
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5"


def test_build_goes_to_a_directory_per_head_size_and_architecture(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs))
    wkv6_cuda._build(32, "80", tmp_path)
    directory = os.path.relpath(seen["build_directory"], tmp_path)
    assert directory.startswith("N32_sm80_torch"), directory
    assert "-D_N_=32" in seen["extra_cuda_cflags"] and "-D_N_=32" in seen["extra_cflags"]
    assert seen["name"] == "wkv6_n32_sm80"


def test_cache_location_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv(wkv6_cuda.CACHE_ENV, raising=False)
    assert wkv6_cuda.cache_root() == wkv6_cuda.DEFAULT_CACHE.expanduser()
    monkeypatch.setenv(wkv6_cuda.CACHE_ENV, str(tmp_path / "env"))
    assert wkv6_cuda.cache_root() == tmp_path / "env"
    assert wkv6_cuda.cache_root(tmp_path / "arg") == tmp_path / "arg"
