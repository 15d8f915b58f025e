"""The WKV7 CUDA sources compile cleanly with no register spills (nvcc, no GPU needed), and the
shared builder (src/ops/cuda_build.py) serves WKV7 as it does WKV6: its own cache directory,
variable and names, and one-sentence errors. The builder's lock and toolchain behaviour is
tested once, through WKV6, in tests/test_wkv6_cuda_build.py."""
import os
import re
import shutil

import pytest
from torch.utils import cpp_extension

from src.ops import wkv6_cuda, wkv7_cuda
from src.ops.wkv7_cuda import CUDA_DIR, WKV7BuildError, WKV7CudaError
from tests.test_wkv6_cuda_build import KERNEL_FLAGS, NO_SPILLS, NVCC, _binding_command, _stub_headers, run_compiles

HEAD_SIZES = (16, 32, 64, 128)


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("wkv7_nvcc")
    # N = 128 is compiled without the spill check: it needs more than 255 registers.
    commands = {f"kernel N={n}": [NVCC, "-c", str(CUDA_DIR / "wkv7_cuda.cu"), f"-D_N_={n}", "-o", str(tmp / f"{n}.o"),
                                  *KERNEL_FLAGS, *(NO_SPILLS if n <= 64 else [])] for n in HEAD_SIZES}
    commands["binding"] = _binding_command(_stub_headers(tmp), tmp / "binding.o", op="wkv7")
    return run_compiles(commands)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH, so the CUDA sources cannot be compile-checked")
@pytest.mark.parametrize("name", [*(f"kernel N={n}" for n in HEAD_SIZES), "binding"])
def test_compiles_without_warnings_or_spills(compile_results, name):
    returncode, output = compile_results[name]
    assert returncode == 0, f"{name}:\n{output}"


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("readelf") is None, reason="needs nvcc and readelf")
def test_registers_spills_and_code_size_on_sm90():
    """ptxas's report and the cubin's sections for sm_90, N = 64 (tests/ptxas.py): no kernel
    spills and none has more than 64 KB of code."""
    from tests import ptxas
    figures = ptxas.report(arch=90, head_size=64, source=ptxas.WKV7_SOURCE)
    assert sorted(figures) == sorted(f"{k}<{t}>" for k in ("wkv7_forward_kernel", "wkv7_backward_kernel")
                                     for t in ("bf16", "fp32")), figures
    for kernel, f in figures.items():
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0, (kernel, f)
        assert f["code_bytes"] <= 64 * 1024, (kernel, f)


def test_cpu_tensors_are_refused_with_op_cpu_hint():
    import torch
    r = torch.zeros(1, 2, 1, 64)
    with pytest.raises(WKV7CudaError, match="The CUDA WKV7 op needs all its tensors on one GPU but got them on cpu") as e:
        wkv7_cuda.wkv7_cuda(r, r, r, r, r, r)
    assert "\n" not in str(e.value) and str(e.value).endswith(".") and "--op cpu" in str(e.value)


def test_wkv7_builds_in_its_own_cache_with_its_own_names(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(wkv7_cuda.BUILD, "check_toolchain", lambda: None)
    monkeypatch.setenv(wkv7_cuda.CACHE_ENV, str(tmp_path / "env"))
    wkv7_cuda.BUILD.build(64, "90", wkv7_cuda.BUILD.cache_root())
    directory = os.path.relpath(seen["build_directory"], tmp_path / "env")
    assert re.fullmatch(r"N64_sm90_torch[0-9A-Za-z._]+_[0-9a-f]{12}", directory), directory
    assert seen["name"] == "wkv7_n64_sm90"
    assert [os.path.basename(s) for s in seen["sources"]] == ["wkv7_op.cpp", "wkv7_cuda.cu"]
    assert wkv7_cuda.CACHE_ENV != wkv6_cuda.CACHE_ENV and wkv7_cuda.DEFAULT_CACHE != wkv6_cuda.DEFAULT_CACHE


def test_build_directory_is_keyed_by_the_shared_header(monkeypatch, tmp_path):
    """Both ops' bindings include cuda/wkv_binding.h: a change there is a new build of each."""
    here = {op: op.BUILD.build_directory(tmp_path, 64, "90") for op in (wkv6_cuda, wkv7_cuda)}
    other = tmp_path / "checkout"
    shutil.copytree(CUDA_DIR, other)
    with open(other / "wkv_binding.h", "a") as f:
        f.write("// another version\n")
    for op in (wkv6_cuda, wkv7_cuda):
        monkeypatch.setattr(op.BUILD, "cuda_dir", other)
        assert op.BUILD.build_directory(tmp_path, 64, "90") != here[op]


def test_failed_build_is_one_sentence_naming_wkv7(monkeypatch, tmp_path):
    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'wkv7_n64_sm90'\nnvcc fatal : something")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(WKV7BuildError, match=r"^Building the CUDA WKV7 kernel in .* failed") as error:
        wkv7_cuda.BUILD.compile("wkv7_n64_sm90", 64, "90", tmp_path)
    assert "\n" not in str(error.value) and "--op cpu" in str(error.value)
