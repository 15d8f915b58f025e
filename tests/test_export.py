"""export.py: the fp32 GGUF of a merged World-vocabulary model in llama.cpp gives the `rwkv`
package's logits and tokens; safetensors holds the .pth's exact tensors; refusals change nothing."""
import os
import re

import numpy as np
import pytest
import torch

import export
from src.checkpoint import load_state_dict
from tests.test_merge import make_pair, run_merge, runtime_logits, snapshot

PROMPT = "Alice has 3 apples. Bob gives Alice 2 more.\n\n你好 🙂"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    base, adapter = make_pair(d, "world", "bone", 32, base_dtype="fp32")
    out = d / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", out, "--dtype", "fp32", "--quiet") is None
    return out


def run_export(*argv):
    try:
        export.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


def world_ids(text):
    from src.tokenizer import WorldTokenizer
    return WorldTokenizer().encode(text)


def test_fp32_gguf_in_llama_cpp_matches_the_rwkv_runtime(merged, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (requirements-gguf.txt)")
    out = tmp_path / "m.gguf"
    assert run_export("--model", merged, "--format", "gguf", "--output", out, "--dtype", "fp32", "--quiet") is None
    llm = llama_cpp.Llama(str(out), logits_all=True, n_ctx=128, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    assert ids == list(world_ids(PROMPT))
    llm.eval(ids)
    ours = np.array(llm.scores[:len(ids)])
    ref = runtime_logits(merged, ids).numpy()
    assert np.abs(ours[-1] - ref[-1]).max() <= 1e-3 * (ref[-1].max() - ref[-1].min())
    # 16 greedy tokens, each fed back
    from tests.tiny import rwkv_runtime
    model = rwkv_runtime(str(merged))
    logits, state = model.forward(ids, None)
    a, b = [], []
    for _ in range(16):
        a.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([a[-1]])
        b.append(int(torch.argmax(logits)))
        logits, state = model.forward([b[-1]], state)
    assert a == b


@pytest.mark.parametrize("dtype", ["same", "bf16"])
def test_safetensors_holds_the_exact_tensors(merged, tmp_path, dtype):
    from safetensors.torch import load_file
    out = tmp_path / "m.safetensors"
    assert run_export("--model", merged, "--format", "safetensors", "--output", out, "--dtype", dtype, "--quiet") is None
    got, sd = load_file(str(out)), load_state_dict(merged)
    assert set(got) == set(sd)
    for k, v in sd.items():
        want = v if dtype == "same" else v.to(torch.bfloat16)
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


@pytest.mark.parametrize("argv,pattern", [
    (["--format", "onnx"], "--format must be one of"),
    (["--format", "gguf", "--dtype", "int4"], "--dtype must be one of"),
    (["--format", "safetensors", "--dtype", "q8_0"], "q8_0 is a GGUF quantization"),
    (["--format", "st", "--dtype", "fp32"], "web-rwkv reads fp16 only"),
])
def test_refusals_leave_the_directory_as_it_was(merged, tmp_path, argv, pattern):
    before = snapshot(tmp_path)
    message = run_export("--model", merged, "--output", tmp_path / "o.gguf", *argv)
    assert isinstance(message, str) and re.search(pattern, message) and "\n" not in message, message
    assert snapshot(tmp_path) == before


def test_existing_output_and_the_input_itself_are_refused(merged, tmp_path):
    (tmp_path / "o.gguf").write_bytes(b"keep")
    (tmp_path / "junk.pth").write_bytes(b"not a model")
    before = snapshot(tmp_path)
    assert "already exists" in run_export("--model", merged, "--format", "gguf", "--output", tmp_path / "o.gguf")
    assert "is the input model itself" in run_export("--model", merged, "--format", "safetensors", "--output", merged)
    assert "could not be read" in run_export("--model", tmp_path / "junk.pth", "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert snapshot(tmp_path) == before
