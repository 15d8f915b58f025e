"""State files (src/state_file.py) and where a trained state goes: merge.py (RWKV-6: into the merged
file; RWKV-7: a state file beside it), export.py (--format state / web-rwkv-state; GGUF says llama.cpp
has no initial state and writes the state beside), generate.py (--state; an adapter's state),
each judged in the `rwkv` package, as RWKV-Runner and ChatRWKV load them. Each state file records the
model family it was trained on where those loaders do not look, and a state of the other family is
refused wherever a state is read (a file without the record loads with a note)."""
import os
import subprocess
import sys

import pytest
import torch

from src import bone
from src.checkpoint import load_state_dict
from src.family import from_checkpoint
from src.rwkv_package import run_rwkv_package
from src.state_file import read_states, read_web_rwkv_states, save_states, states_and_family
from src.tokenizer import world_tokenizer
from tests.test_generate import NO_PENALTY, PROMPT, run_generate
from tests.test_merge import run_merge
from tests.test_train import setup, setup7  # noqa: F401 (fixtures: small bases of each family and data)
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
    assert saved.rwkv_family == "x070" and torch.load(beside, weights_only=True).rwkv_family == "x070"
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
    assert states_and_family(str(tmp_path / "s.st"))[1] == "x060"
    assert torch.equal(raw["blocks.0.att.time_state"], states[0].transpose(-1, -2).half())
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(read_web_rwkv_states(str(tmp_path / "s.st")), states))
    # A LoRA GGUF holds the bone part; the state goes beside it as RWKV-Runner's state file.
    done = export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "a.gguf")
    assert done.returncode == 0, done.stderr
    assert "llama.cpp has no initial state" in done.stdout and (tmp_path / "a-state.pth").exists()
    assert all(torch.equal(a, b) for a, b in zip(read_states(str(tmp_path / "a-state.pth")), states))
    assert torch.load(tmp_path / "a-state.pth", weights_only=True).rwkv_family == "x060"
    # A merged RWKV-6 model with its state: GGUF without it, the state file beside.
    merged = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet") is None
    done = export("--model", merged, "--format", "gguf", "--output", tmp_path / "m.gguf")
    assert done.returncode == 0, done.stderr
    assert "llama.cpp has no initial state" in done.stdout
    assert all(torch.equal(a, b) for a, b in zip(read_states(str(tmp_path / "m-state.pth")), states))
    assert torch.load(tmp_path / "m-state.pth", weights_only=True).rwkv_family == "x060"
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


# --- the model family a state file records, and the check wherever a state is read ------------------

FAMILY_OF = {"world": "x060", "world7": "x070", "small": "x060", "small7": "x070"}
EXT = {"state": ".pth", "web-rwkv-state": ".st"}


def random_states(shape, seed=0):
    cfg = ALL[shape]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cfg.n_head, cfg.head_size, cfg.head_size, generator=g) for _ in range(cfg.n_layer)]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Bases of both families whose states have the same shape (2 layers of [2, 32, 32]: World vocabulary
    ones for generate.py, small ones for merge.py and export.py), and a state file of each family in each
    format."""
    d = tmp_path_factory.mktemp("families")
    files = {shape: save_random_checkpoint(str(d), shape, 0)[0] for shape in ("world", "world7", "small", "small7")}
    for family in ("x060", "x070"):
        for fmt, ext in EXT.items():
            files[family, fmt] = str(d / f"{family}-state{ext}")
            save_states(random_states("world"), files[family, fmt], fmt, family=family)
    return files


@pytest.mark.parametrize("fmt", list(EXT))
def test_a_state_file_records_its_family_where_the_ecosystem_s_loaders_do_not_look(tmp_path, fmt):
    """`state`: the family is an attribute of the saved dict, so RWKV-Runner's load_rwkv_state (its key count
    must be n_layer, its first value a layer's state), ChatRWKV's and the older repository's reads by key and
    the rwkv package's dict of the model's keys see exactly the n_layer tensors; web-rwkv-state: a metadata
    field, which web-rwkv's Reader never reads."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    states = random_states("world7")
    path = str(tmp_path / f"s{EXT[fmt]}")
    save_states(states, path, fmt, family="x070")
    keys = [f"blocks.{i}.att.time_state" for i in range(2)]
    if fmt == "state":
        for weights_only in (True, False):     # torch >= 2.6's default, and the older torch.load
            state_raw = torch.load(path, map_location="cpu", weights_only=weights_only)
            assert list(state_raw) == keys and len(state_raw) == ALL["world7"].n_layer
            first = next(iter(state_raw.values()))
            assert first.shape[0] * first.shape[1] == ALL["world7"].n_embd and first.dtype == torch.float32
            assert all(torch.equal(state_raw[k], s) for k, s in zip(keys, states))
            assert state_raw.rwkv_family == "x070"
        model = {"emb.weight": torch.zeros(1)}
        model.update(torch.load(path, weights_only=True))          # a state added to a model file by key
        assert list(model) == ["emb.weight", *keys] and not hasattr(model, "rwkv_family")
    else:
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt", "rwkv_family": "x070"}
        raw = load_file(path)
        assert list(raw) == keys and all(torch.equal(raw[k], s.transpose(-1, -2).half()) for k, s in zip(keys, states))
    # Read back here: the family, and the tensors in [H, value, key] (f16 rounding for web-rwkv-state).
    got, family = states_and_family(path)
    assert family == "x070"
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(got, states))


def wrong_family(state_family, model_family):
    return (f"holds the state of an {state_family} model, but this is an {model_family} model: use a state trained on "
            "this model.")


@pytest.mark.parametrize("fmt", list(EXT))
@pytest.mark.parametrize("state_family, model_family", [("x060", "x070"), ("x070", "x060")])
def test_a_state_of_the_other_family_is_refused_wherever_a_state_is_read(families, request, tmp_path, capsys, fmt,
                                                                          state_family, model_family):
    """The states have the model's shape; only the family they record tells them apart. generate.py --state and
    --adapter, merge.py, train.py --bone_load (--peft state) and export.py: one sentence, nothing written."""
    import export
    import generate
    import train
    from tests.test_merge import snapshot
    from tests.test_no_surprises import args
    from tests.test_no_surprises import refused as refused_cli
    state = families[state_family, fmt]
    world, small = ("world", "small") if model_family == "x060" else ("world7", "small7")
    message = wrong_family(state_family, model_family)
    before = snapshot(tmp_path)
    for flag in ("--state", "--adapter"):
        with pytest.raises(SystemExit) as e:
            generate.main(["--model", families[world], flag, state, "--prompt", "x", "--max_tokens", "1"])
        assert e.value.code == f"generate.py: {state} {message}"
    assert run_merge("--base_model", families[small], "--adapter", state, "--output", tmp_path / "m.pth") == \
        f"merge.py: {state} {message}"
    with pytest.raises(SystemExit) as e:
        export.main(["--adapter", state, "--model", families[small], "--format", "state", "--output",
                     str(tmp_path / "s.pth")])
    assert e.value.code == f"export.py: {state} {message}"
    setup = request.getfixturevalue("setup" if model_family == "x060" else "setup7")
    argv = args(setup, tmp_path / "run", "--peft", "state", "--bone_load", state)
    argv[argv.index("--bone_r"):argv.index("--bone_r") + 2] = []      # --peft state takes no adapter flag
    assert refused_cli(argv, message, tmp_path) == f"train.py: {state} {message}"
    assert snapshot(tmp_path) == before
    assert "records no model family" not in capsys.readouterr().err


def test_a_merged_rwkv6_file_s_state_is_of_its_own_family(families, tmp_path):
    """A model file with time_state inside (a merged RWKV-6 state tune) records nothing: its keys say x060."""
    import generate
    from src.checkpoint import save_checkpoint
    sd = load_state_dict(families["world"])
    merged = tmp_path / "merged6.pth"
    save_checkpoint({**sd, **{f"blocks.{i}.att.time_state": s for i, s in enumerate(random_states("world"))}},
                    str(merged), "fp32")
    assert states_and_family(str(merged))[1] == "x060"
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", families["world7"], "--state", str(merged), "--prompt", "x", "--max_tokens", "1"])
    assert e.value.code == f"generate.py: {merged} {wrong_family('x060', 'x070')}"


def test_a_state_file_without_the_record_loads_with_a_note(families, tmp_path, capsys, monkeypatch):
    """The older repository's file (a plain dict of the n_layer tensors) and a web-rwkv-state file as web-rwkv's
    converter writes it (metadata {"format": "pt"}) load everywhere, each with one note line, once; ours say
    nothing; export.py with --model records the base's family in what it writes."""
    import export
    import generate
    from safetensors.torch import save_file
    from src import state_file
    states = random_states("world")
    old, st = tmp_path / "rwkv-0.pth", tmp_path / "converted.st"
    torch.save({f"blocks.{i}.att.time_state": s for i, s in enumerate(states)}, old)
    save_file({f"blocks.{i}.att.time_state": s.transpose(-1, -2).half().contiguous() for i, s in enumerate(states)},
              str(st), metadata={"format": "pt"})

    def notes():
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if "records no model family" in line]

    def generate_with(state):
        generate.main(["--model", families["world"], "--state", str(state), "--prompt", "x", "--max_tokens", "1",
                       "--temperature", "0"])

    for path in (old, st):
        monkeypatch.setattr(state_file, "_NOTED", set())     # once per file and process: a new process each time
        generate_with(path)
        note = f"note: {path} records no model family"
        assert [line.startswith(note) for line in notes()] == [True], path
        monkeypatch.setattr(state_file, "_NOTED", set())
        assert run_merge("--base_model", families["small"], "--adapter", path, "--output", tmp_path / "m.pth",
                         "--overwrite", "--quiet") is None
        assert [line.startswith(note) and "that it is an x060 state cannot be checked" in line for line in notes()] \
            == [True], path
        monkeypatch.setattr(state_file, "_NOTED", set())
        written = tmp_path / "s.pth"
        export.main(["--adapter", str(path), "--model", families["small7"], "--format", "state", "--output",
                     str(written), "--overwrite"])
        assert len(notes()) == 1 and torch.load(written, weights_only=True).rwkv_family == "x070"
    # Ours, of the right family: not a word.
    generate_with(families["x060", "web-rwkv-state"])
    assert notes() == []
