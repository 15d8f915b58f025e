"""No surprises, round two (issue 20): the newer features under bad input, in the house style of
tests/test_no_surprises.py (exit != 0, one sentence, no traceback, directories unchanged, nothing
left behind), and the house itself: no import circle in src/bone/. The loaders' random
corruptions are in tests/test_fuzz_loaders.py."""
import ast
import os
import subprocess
import sys

import pytest

import generate
import train
from src.data import write_binidx
from tests.test_no_surprises import args, refused
from tests.test_train import ROOT, setup  # noqa: F401 (a fixture)
from tests.tiny import save_random_checkpoint


# --- the house --------------------------------------------------------------------------------------

def bone_imports():
    """{module: modules of src/bone it imports} read off the source (relative and absolute imports)."""
    folder = os.path.join(ROOT, "src", "bone")
    names = {f[:-3] for f in os.listdir(folder) if f.endswith(".py")}
    graph = {}
    for name in names:
        tree = ast.parse(open(os.path.join(folder, name + ".py")).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 1 and mod.split(".")[0] in names:
                    deps.add(mod.split(".")[0])
                elif node.level == 1 and not mod:
                    deps |= {a.name for a in node.names if a.name in names}
                elif mod.startswith("src.bone."):
                    deps.add(mod.split(".")[2])
        graph[name] = deps - {name}
    return graph


def test_src_bone_has_no_import_circle():
    graph = bone_imports()
    assert "state" in graph["files"] and "files" in graph["model"] and "model" not in graph["files"]
    done, path = set(), []

    def visit(n):
        assert n not in path, f"import circle: {' -> '.join(path[path.index(n):] + [n])}"
        if n in done:
            return
        path.append(n)
        for m in graph[n]:
            visit(m)
        path.pop()
        done.add(n)
    for n in graph:
        visit(n)
    p = subprocess.run([sys.executable, "-c", "import src.bone"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


# --- --quant ---------------------------------------------------------------------------------------------

def test_quant_without_bitsandbytes_or_too_old(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)      # import bitsandbytes raises ImportError
    refused(args(setup, out, "--quant", "nf4"), r"--quant needs bitsandbytes >= 0.46, which could not be imported "
                                                r"\((ModuleNotFound|Import)Error\)", setup[0], tmp_path)
    monkeypatch.undo()
    import bitsandbytes
    monkeypatch.setattr(bitsandbytes, "__version__", "0.42.0")
    refused(args(setup, out, "--quant", "int8"), r"but 0.42.0 is installed", setup[0], tmp_path)
    refused(args(setup, out, "--quant", "nf8"), r"Unknown --quant 'nf8'", setup[0], tmp_path)
    assert not out.exists()


# --- --chunk_ctx -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, pattern", [("64", r"--chunk_ctx 64 is larger than --ctx_len 32"),
                                            ("-1", r"--chunk_ctx -1 is too small: it must be at least 0")])
def test_chunk_ctx_out_of_range(setup, tmp_path, value, pattern):
    refused(args(setup, tmp_path / "out", "--chunk_ctx", value), pattern, setup[0], tmp_path)
    assert not (tmp_path / "out").exists()


# --- validation data ------------------------------------------------------------------------------------------

def test_bad_validation_data(setup, tmp_path):
    out = tmp_path / "out"
    refused(args(setup, out, "--val_data", str(tmp_path / "nope")), r"nope.idx does not exist", setup[0], tmp_path)
    write_binidx(str(tmp_path / "short"), [list(range(1, 10))])
    refused(args(setup, out, "--val_data", str(tmp_path / "short")), r"holds 9 tokens, fewer than the ctx_len \+ 1 = 33",
            setup[0], tmp_path)
    write_binidx(str(tmp_path / "wide"), [list(range(200, 300))])
    refused(args(setup, out, "--val_data", str(tmp_path / "wide")), r"holds token id 299 .* outside the model's "
                                                                    r"vocabulary of 260 ids", setup[0], tmp_path)
    assert not out.exists() or not [p for p in os.listdir(out) if p != ".lock"]


# --- loggers ------------------------------------------------------------------------------------------------

def test_loggers_that_cannot_work(setup, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    refused(args(setup, tmp_path / "a", "--logger", "wandb"), r"--logger wandb needs the wandb package, which is not "
                                                               r"installed", setup[0], tmp_path)
    # As root chmod does not stop writes: the events folder's place is taken by a file instead.
    out = tmp_path / "b"
    out.mkdir()
    (out / "tensorboard").write_text("a file where the events folder goes")
    refused(args(setup, out, "--logger", "tensorboard"), r"writes into .*tensorboard, which is not a writable "
                                                         r"directory", setup[0], tmp_path)


# --- generate.py ---------------------------------------------------------------------------------------------

def test_generate_bad_input(setup, tmp_path):
    world, _, _ = save_random_checkpoint(str(tmp_path), "world", seed=0)
    from tests.test_merge import make_pair
    _, adapter = make_pair(tmp_path, "small", "bone", 16)
    refused(["--model", world, "--adapter", adapter, "--prompt", "Hi", "--max_tokens", "2"],
            r"was made for a model with vocab_size=260", tmp_path, main=generate.main)
    refused(["--model", world, "--prompt", "", "--max_tokens", "2"], r"The prompt is empty", tmp_path,
            main=generate.main)
    refused(["--model", setup[1], "--prompt", "Hi"], r"has a vocabulary of 260 ids, not the World tokenizer's",
            tmp_path, main=generate.main)


# --- adapter metadata, run.json and the resume point, through the commands --------------------------------

@pytest.mark.parametrize("change, pattern", [
    (lambda m: m.pop("mode"), r"without its mode field"),
    (lambda m: m.update(extra=1), r"an unknown field 'extra'"),
    (lambda m: m.update(train_parts="ln"), r"train_parts is the string 'ln', not a list"),
    (lambda m: m.update(fingerprint=[1, 2]), r"fingerprint is a list, not a dict"),
    (lambda m: m.update(quant=3), r"quant is 3, not one of none"),
])
def test_adapter_metadata_fields_through_merge(tmp_path, change, pattern):
    import merge
    import torch
    from src.checkpoint import atomic_save, load_state_dict
    from tests.test_merge import make_pair
    base, adapter = make_pair(tmp_path, "small", "bone", 32)
    sd = load_state_dict(adapter, mmap=False)
    meta = dict(sd["__bone_meta__"])
    change(meta)
    atomic_save({**sd, "__bone_meta__": meta}, tmp_path / "bad.pth")
    refused(["--base_model", base, "--adapter", str(tmp_path / "bad.pth"), "--output", str(tmp_path / "m.pth")],
            r"bad.pth has adapter metadata .*" + pattern, tmp_path, main=merge.main)
    assert torch is not None


def test_damaged_run_json_and_resume_point(setup, tmp_path):
    from tests.test_train import train as run_train
    out = tmp_path / "out"
    run_train(setup, out, "--strategy", "deepspeed_stage_2", steps=8)
    good = (out / "run.json").read_bytes()
    (out / "run.json").write_text('{"settings": {}, "total_steps": "8"}')
    refused(args(setup, out, "--resume", steps=16), r"run.json is a run record with a field of the wrong type "
                                                    r"\(total_steps is the string '8'", out)
    (out / "run.json").write_bytes(good)
    model_states = out / "resume" / "checkpoint" / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    refused(args(setup, out, "--resume", steps=16), r"the resume point .*resume is damaged \(mp_rank_00_model_states.pt "
                                                    r"is not a complete PyTorch file", out)
