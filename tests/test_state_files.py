"""State files (src/state_file.py) and where a trained state goes: merge.py (RWKV-6: into the merged
file; RWKV-7: a state file beside it), export.py (--format state / web-rwkv-state; GGUF says llama.cpp
has no initial state and writes the state beside), generate.py (--state; an adapter's state),
each judged in the `rwkv` package, as RWKV-Runner and ChatRWKV load them."""
import os
import subprocess
import sys

import pytest
import torch

from src import bone
from src.checkpoint import load_state_dict
from src.family import from_checkpoint
from src.rwkv_package import run_rwkv_package
from src.state_file import read_states, read_web_rwkv_states
from src.tokenizer import world_tokenizer
from tests.test_generate import NO_PENALTY, PROMPT, run_generate
from tests.test_merge import run_merge
from tests.tiny import ALL, package_logits, randomize, save_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state_adapter(tmp_path, shape, r=None, seed=0, scale=1.0):
    """An fp32 base and a 'trained' adapter for it: random initial states (and random bone tensors
    of rank r when r is given). Returns (base path, adapter path, the adapter model)."""
    base = save_random_checkpoint(str(tmp_path), shape, seed, dtype="fp32")[0]
    model = from_checkpoint(base, dtype=torch.float32, op="cpu")
    config = bone.BoneConfig(r=r or 16, target_modules=None if r else [], train_parts=["state"])
    bone.apply_adapters(model, config, verbose=False)
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("time_state"):
                p.copy_(scale * torch.randn(p.shape, generator=g))
    adapter = str(tmp_path / f"adapter-{shape}-{'bone' if r else 'state'}.pth")
    bone.save_adapter(model, adapter)
    return base, adapter, model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def close(a, b, rel=1e-4):
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("r", [None, 16], ids=["state", "bone+state"])
def test_merged_rwkv6_file_gives_the_state_tuned_logits_in_the_rwkv_package(tmp_path, r, capsys):
    base, adapter, model = state_adapter(tmp_path, "deep", r)
    merged = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet") is None
    assert "is inside" in capsys.readouterr().out
    sd = load_state_dict(str(merged))
    n = ALL["deep"].n_layer
    assert [k for k in sd if "time_state" in k] == [f"blocks.{i}.att.time_state" for i in range(n)]
    assert list(sd)[-n:] == [f"blocks.{i}.att.time_state" for i in range(n)]      # after the official keys
    ids = list(range(3, 40))
    theirs = package_logits(merged, ids)
    assert close(logits(model, ids), theirs)
    base_logits = package_logits(base, ids)
    assert (base_logits - theirs).abs().max() > 1e-2 * theirs.abs().max()
    # Our loader reads the merged file, state included.
    assert close(logits(from_checkpoint(str(merged), dtype=torch.float32, op="cpu"), ids), theirs)


def test_rwkv7_state_file_as_the_package_s_initial_state_gives_generate_s_greedy_text(tmp_path, capsys):
    """RWKV-7: merge.py keeps the official layout and writes the state beside; export.py --format state
    writes the same tensors; the `rwkv` package with them as its initial state (as RWKV-Runner passes
    them) continues greedily as generate.py does, from the adapter or from --state on the merged file."""
    base, adapter, _ = state_adapter(tmp_path, "world7", r=16, scale=5.0)
    merged, exported = tmp_path / "merged.pth", tmp_path / "exported-state.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet",
                     "--verify") is None
    out = capsys.readouterr().out
    assert "verify: PASS" in out, out
    beside = tmp_path / "merged-state.pth"
    assert f"written beside it to {beside}" in out and beside.exists()
    assert not any("time_state" in k for k in load_state_dict(str(merged)))
    done = subprocess.run([sys.executable, "export.py", "--adapter", adapter, "--format", "state", "--output",
                           str(exported)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    saved = torch.load(exported, weights_only=True)
    assert list(saved) == [f"blocks.{i}.att.time_state" for i in range(ALL["world7"].n_layer)]
    assert all(torch.equal(saved[k], v) for k, v in torch.load(beside, weights_only=True).items())
    tokenizer = world_tokenizer()
    ran = run_rwkv_package(merged, "x070", tokenizer.encode(PROMPT), n_tokens=20, initial_state=list(saved.values()))
    expected = ran["continuation"]
    text = tokenizer.decode(expected) + "\n"
    greedy = ["--prompt", PROMPT, "--max_tokens", 20, "--temperature", 0, "--token_stop", "", *NO_PENALTY]
    assert run_generate(capsys, "--model", base, "--adapter", adapter, *greedy) == text
    assert run_generate(capsys, "--model", merged, "--state", exported, *greedy) == text
    plain = run_rwkv_package(merged, "x070", tokenizer.encode(PROMPT))["logits"]     # the state matters
    assert (plain - ran["logits"]).abs().max() > 1e-3 * plain.abs().max()


@pytest.mark.parametrize("shape", ["world", "world7"])
def test_an_older_repository_state_file_gives_the_same_text_here_and_in_the_rwkv_package(tmp_path, capsys, shape):
    """The older repository's --peft state file: a plain dict of blocks.{i}.att.time_state, nothing else."""
    base, adapter, model = state_adapter(tmp_path, shape, scale=1.0)
    old = tmp_path / "rwkv-0.pth"
    torch.save({k: v for k, v in torch.load(adapter, weights_only=True).items() if k.endswith("time_state")}, old)
    tokenizer = world_tokenizer()
    ids = tokenizer.encode(PROMPT)
    if shape == "world":    # RWKV-6: the package reads the state from the model file (merge.py puts it there)
        merged = tmp_path / "merged.pth"
        assert run_merge("--base_model", base, "--adapter", old, "--output", merged, "--dtype", "fp32", "--quiet") is None
        ran = run_rwkv_package(merged, "x060", ids, n_tokens=20)
    else:
        ran = run_rwkv_package(base, "x070", ids, n_tokens=20, initial_state=read_states(str(old)))
    expected = ran["continuation"]
    greedy = ["--prompt", PROMPT, "--max_tokens", 20, "--temperature", 0, "--token_stop", "", *NO_PENALTY]
    capsys.readouterr()
    assert run_generate(capsys, "--model", base, "--state", old, *greedy) == tokenizer.decode(expected) + "\n"
    assert run_generate(capsys, "--model", base, "--adapter", old, *greedy) == tokenizer.decode(expected) + "\n"
    # The state matters (a random state moves these tiny models' logits, though not always their argmax).
    plain = run_rwkv_package(base, shape.replace("world7", "x070").replace("world", "x060"), ids)["logits"]
    assert (plain - ran["logits"]).abs().max() > 1e-2 * plain.abs().max()


def export(*argv):
    return subprocess.run([sys.executable, "export.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_export_writes_the_state_files_and_gguf_says_llama_cpp_has_no_state(tmp_path, capsys):
    base, adapter, model = state_adapter(tmp_path, "world", r=16)
    states = [model.blocks[i].att.time_state.detach() for i in range(2)]
    # web-rwkv / Ai00: f16, the last two dims transposed.
    done = export("--adapter", adapter, "--format", "web-rwkv-state", "--output", tmp_path / "s.st")
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file
    raw = load_file(str(tmp_path / "s.st"))
    assert list(raw) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert raw["blocks.0.att.time_state"].dtype == torch.float16
    assert torch.equal(raw["blocks.0.att.time_state"], states[0].transpose(-1, -2).half())
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(read_web_rwkv_states(str(tmp_path / "s.st")), states))
    # A LoRA GGUF holds the bone part; the state goes beside it as RWKV-Runner's state file.
    done = export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "a.gguf")
    assert done.returncode == 0, done.stderr
    assert "llama.cpp has no initial state" in done.stdout and (tmp_path / "a-state.pth").exists()
    assert all(torch.equal(a, b) for a, b in zip(read_states(str(tmp_path / "a-state.pth")), states))
    # A merged RWKV-6 model with its state: GGUF without it, the state file beside.
    merged = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet") is None
    done = export("--model", merged, "--format", "gguf", "--output", tmp_path / "m.gguf")
    assert done.returncode == 0, done.stderr
    assert "llama.cpp has no initial state" in done.stdout
    assert all(torch.equal(a, b) for a, b in zip(read_states(str(tmp_path / "m-state.pth")), states))
    # A state alone has no GGUF form at all.
    (tmp_path / "only").mkdir()
    _, only, _ = state_adapter(tmp_path / "only", "world")
    done = export("--adapter", only, "--format", "gguf", "--output", tmp_path / "o.gguf")
    assert done.returncode != 0 and "llama.cpp has no initial state: write it with --format state" in done.stderr
    assert not (tmp_path / "o.gguf").exists() and "Traceback" not in done.stderr


def test_bad_states_are_one_sentence_before_any_work(tmp_path, capsys):
    base6, adapter6, _ = state_adapter(tmp_path, "world")
    (tmp_path / "seven").mkdir()
    base7, adapter7, _ = state_adapter(tmp_path / "seven", "world7")
    (tmp_path / "deep").mkdir()
    _, deep, _ = state_adapter(tmp_path / "deep", "deep")
    transposed_shape = tmp_path / "odd.pth"
    torch.save({"blocks.0.att.time_state": torch.zeros(2, 32, 16), "blocks.1.att.time_state": torch.zeros(2, 32, 16)},
               transposed_shape)
    gap = tmp_path / "gap.pth"
    torch.save({"blocks.1.att.time_state": torch.zeros(2, 32, 32)}, gap)
    cases = [
        (adapter7, base6, "holds the state of an x070 model, but this is an x060 model"),
        (deep, base6, "holds 3 layers of states of shape [3, 32, 32], but this model needs 2 of [2, 32, 32]"),
        (base6, base6, "holds no blocks.{i}.att.time_state tensor: it is not a state file"),
        (transposed_shape, base6, "not [H, N, N] like the other layers'"),
        (gap, base6, "not one per layer from blocks.0 on"),
    ]
    for state, model, message in cases:
        with pytest.raises(SystemExit) as e:
            run_generate(capsys, "--model", model, "--state", state, "--prompt", "x", "--max_tokens", 1)
        assert message in str(e.value), (state, e.value)
        done = export("--adapter", state, "--model", model, "--format", "state", "--output", tmp_path / "out.pth")
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "out.pth").exists()
    with pytest.raises(SystemExit) as e:
        run_generate(capsys, "--model", base6, "--adapter", adapter6, "--state", adapter6, "--prompt", "x")
    assert "has a trained state of its own, and --state gives another" in str(e.value)
    # A state file where a model goes: said so.
    with pytest.raises(SystemExit) as e:
        run_generate(capsys, "--model", tmp_path / "gap.pth", "--prompt", "x")
    assert "is a state file (initial states only), not a model" in str(e.value)
