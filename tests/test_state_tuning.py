"""State tuning (--peft state, train part "state"): each layer's initial WKV state
blocks.{i}.att.time_state [H, value, key] trains, every weight frozen.

Judged against independent references: the float64 step-by-step WKV operators and finite
differences for the gradient, the plain pass for --chunk_ctx, the `rwkv` package for the layout
(RWKV-6 reads time_state from the model file and transposes it; RWKV-7 takes it as the initial
state as RWKV-Runner passes it), and a deliberately transposed state, which these tests catch."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import src.model
import src.model_x070
from src import bone
from src.family import from_state_dict
from src.ops.wkv6_reference import wkv6_reference
from src.ops.wkv7_reference import wkv7_reference
from src.training.loss import lm_loss
from tests.test_train import ROOT, free_port, latest_adapter, losses, setup, setup7  # noqa: F401 (setup, setup7: fixtures)
from tests.tiny import ALL, package_logits, random_state_dict

FAMILY_SHAPES = {"x060": "deep", "x070": "deep7"}


def state_model(shape, seed=0, dtype=torch.float32, scale=0.5, **kwargs):
    """A tiny model with trained-looking (random) initial states, only they requiring grad."""
    sd = {k: v.to(dtype) for k, v in random_state_dict(ALL[shape], seed).items()}
    model = from_state_dict(sd, op="cpu", **kwargs)
    bone.apply_adapters(model, bone.BoneConfig(target_modules=[], train_parts=["state"]), verbose=False)
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("time_state"):
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def tokens(shape, T=40, B=2, seed=1):
    return torch.randint(1, ALL[shape].vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def plain_loss(model, idx):
    """Cross-entropy on the materialised logits: no L2Wrap, whose extra gradient no loss value shows."""
    logits = model(idx[:, :-1])[0]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


def state_grads(model, idx, chunk_ctx=None):
    model.zero_grad(set_to_none=True)
    loss = plain_loss(model, idx) if chunk_ctx is None else lm_loss(model, idx[:, :-1], idx[:, 1:], None, chunk_ctx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("time_state")}


def reference_ops(monkeypatch):
    """The float64 step-by-step operators in place of the CPU paths."""
    monkeypatch.setattr(src.model, "wkv6", lambda r, k, v, w, u, s, op: wkv6_reference(r, k, v, w, u, s))
    monkeypatch.setattr(src.model_x070, "wkv7", lambda r, w, k, v, a, b, s, op: wkv7_reference(r, w, k, v, a, b, s))


@pytest.mark.parametrize("family", ["x060", "x070"])
@pytest.mark.numerical
def test_state_gradient_is_the_float64_reference_and_finite_differences(family, monkeypatch):
    shape = FAMILY_SHAPES[family]
    idx = tokens(shape)
    model = state_model(shape, dtype=torch.float64).train()
    _, fast = state_grads(model, idx)
    fp32 = state_grads(state_model(shape).train(), idx)[1]
    reference_ops(monkeypatch)
    loss, slow = state_grads(model, idx)
    assert len(slow) == ALL[shape].n_layer
    for n in slow:
        scale = slow[n].abs().max()
        assert scale > 0, n
        # float64: the chunked ops and the step-by-step reference sum in other orders, ~T eps = 1e-14 of
        # the scale. fp32: the same sums in fp32, whose cancellation costs up to 3e-4 relative on the
        # worst tensor of a model gradient (tests/test_long_context.py); the state's gradient is a
        # sum over the sequence's first steps only, with far less cancellation.
        assert (fast[n] - slow[n]).abs().max() <= 1e-9 * scale, n
        assert (fp32[n] - slow[n]).abs().max() <= 1e-4 * scale, n
    # Finite differences on the reference: central, float64, a few elements of each layer.
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    for n in slow:
        p = params[n]
        for flat in torch.randint(0, p.numel(), (3,), generator=g).tolist():
            with torch.no_grad():
                old = p.view(-1)[flat].item()
                p.view(-1)[flat] = old + 1e-6
                up = plain_loss(model, idx).item()
                p.view(-1)[flat] = old - 1e-6
                down = plain_loss(model, idx).item()
                p.view(-1)[flat] = old
            fd = (up - down) / 2e-6
            # Central differences with h = 1e-6 on a float64 loss of order 5: truncation ~ h^2 = 1e-12,
            # rounding ~ eps |loss| / h = 1e-9 (test_bone measured 1.1e-7 relative on the same method).
            assert abs(fd - slow[n].view(-1)[flat].item()) <= 1e-6 * max(1.0, abs(fd)) + 1e-8, (n, flat, fd)


@pytest.mark.parametrize("family", ["x060", "x070"])
@pytest.mark.parametrize("grad_cp", [False, True])
@pytest.mark.numerical
def test_chunked_state_gradient_is_the_plain_pass(family, grad_cp):
    """--chunk_ctx: the state enters the first piece only; later pieces start from the carried state."""
    shape = FAMILY_SHAPES[family]
    idx = tokens(shape, T=49)
    model = state_model(shape, dtype=torch.float64, grad_cp=grad_cp).train()
    loss, plain = state_grads(model, idx, chunk_ctx=0)
    for chunk in (16, 13):
        loss_c, chunked = state_grads(model, idx, chunk_ctx=chunk)
        # float64, the same terms in other groupings: ~100 eps at most (2e-14), 1e-10 for gradients
        # summed over 49 steps with cancellation.
        assert abs(loss_c - loss) <= 1e-12 * abs(loss)
        for n in plain:
            assert (chunked[n] - plain[n]).abs().max() <= 1e-10 * plain[n].abs().max(), (chunk, n)


@pytest.mark.numerical
def test_a_zero_state_is_the_base_and_the_state_starts_each_sequence_once():
    shape = "deep"
    idx = tokens(shape, T=24)
    base = from_state_dict(random_state_dict(ALL[shape], 0), op="cpu")
    with torch.no_grad():
        want = base(idx)[0]
        bone.apply_adapters(base, bone.BoneConfig(target_modules=[], train_parts=["state"]), verbose=False)
        assert torch.equal(base(idx)[0], want)          # zero at the start: the base's logits bit for bit
        model = state_model(shape)
        whole = model(idx)[0]
        first, state = model(idx[:, :10])
        rest, _ = model(idx[:, 10:], state)             # the carried state, not time_state again
    # fp32 logits of order 1, one split of the sequence regrouping the WKV chunks: a few eps (1e-6);
    # a state applied twice moves them 1e-2 or more (the line below).
    assert torch.allclose(torch.cat([first, rest], 1), whole, atol=1e-5)
    assert (whole - want).abs().max() > 1e-2


def package_state_logits(family, model_path, ids, states=None):
    """The `rwkv` package's logits at every position (cpu fp32); for RWKV-7 with `states` (a list of
    [H, N, N] tensors) as each layer's initial WKV state, as RWKV-Runner passes a state file."""
    from src.rwkv_package import run_rwkv_package
    return run_rwkv_package(model_path, family, list(ids), initial_state=states)["logits"]


@pytest.mark.parametrize("family", ["x060", "x070"])
@pytest.mark.numerical
def test_the_layout_is_the_rwkv_package_s_and_a_transposed_state_is_caught(family, tmp_path):
    """x060: the package reads time_state from the model file and transposes it (1, 2); x070: it takes the
    state file's tensors as the initial state as they are. Our model on the same tensors gives its logits;
    the transposed tensors do not."""
    from src.checkpoint import save_checkpoint
    shape = FAMILY_SHAPES[family]
    model = state_model(shape, scale=1.0).eval()
    ids = tokens(shape, T=12, B=1)[0].tolist()
    states = [model.blocks[i].att.time_state.detach().clone() for i in range(ALL[shape].n_layer)]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
        for s in (p for n, p in model.named_parameters() if n.endswith("time_state")):
            s.copy_(s.transpose(-1, -2).clone())
        transposed = model(torch.tensor([ids]))[0][0]
    base = random_state_dict(ALL[shape], 0)
    if family == "x060":
        path = tmp_path / "with-state.pth"
        save_checkpoint({**base, **{f"blocks.{i}.att.time_state": s for i, s in enumerate(states)}}, str(path), "fp32")
        theirs = package_state_logits(family, path, ids)
    else:
        path = tmp_path / "base.pth"
        save_checkpoint(base, str(path), "fp32")
        theirs = package_state_logits(family, path, ids, states)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale
    assert (transposed - theirs).abs().max() > 1e-2 * scale


SNAPSHOT = """
import sys, torch, train
from src.training.module import RWKVLightning
def on_train_end(self):
    torch.save({n: p.detach().clone() for n, p in self.model.named_parameters()}, sys.argv[1])
RWKVLightning.on_train_end = on_train_end
train.main(sys.argv[2:])
"""


def state_train(setup, out, *extra, steps=16, ctx_len=16, wait=True, snapshot=False):
    """train.py --peft state (test_train's train() sets --bone_r, which --peft state refuses); with
    snapshot, the model's every parameter is saved at the end of training (out/final.pt)."""
    d, model = setup
    head = [sys.executable, "-c", SNAPSHOT, str(out / "final.pt")] if snapshot else [sys.executable, "train.py"]
    cmd = head + ["--load_model", model, "--data_file", str(d / "data"), "--proj_dir", str(out), "--peft", "state",
                  "--ctx_len", str(ctx_len), "--micro_bsz", "4", "--epoch_steps", "8", "--epoch_count", str(steps // 8),
                  "--accelerator", "cpu", "--seed", "1", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MASTER_PORT": str(free_port())})
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def data_loss(model, d, n=16, T=17):
    from src.data import make_dataset
    ds = make_dataset(str(d / "data"), "binidx", ctx_len=T - 1, vocab_size=model.config.vocab_size, seed=0)
    batch = [ds[i] for i in range(n)]
    idx, targets = torch.stack([torch.as_tensor(b[0]) for b in batch]), torch.stack([torch.as_tensor(b[1]) for b in batch])
    with torch.no_grad():
        return lm_loss(model, idx, targets).item()


@pytest.mark.parametrize("base", ["setup", "setup7"])
def test_train_peft_state_under_zero2(request, tmp_path, base):
    """train.py --peft state, ZeRO-2: the default lr is said; every weight is bit-identical after
    training; the file holds exactly n_layer [H, N, N] states; they lower the loss on the data."""
    setup = request.getfixturevalue(base)
    out = state_train(setup, tmp_path, "--strategy", "deepspeed_stage_2", snapshot=True)
    assert "state tuning" in out and "lr 1 -> 0.01 (state tuning's default" in out, out[-2000:]
    d, path = setup
    base_sd = torch.load(path, weights_only=True)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    cfg = from_state_dict(base_sd).config
    states = {f"blocks.{i}.att.time_state" for i in range(cfg.n_layer)}
    assert set(final) == set(base_sd) | states
    for k, v in base_sd.items():
        assert torch.equal(final[k], v.to(final[k].dtype)), k
    saved = torch.load(latest_adapter(tmp_path), weights_only=True)
    assert set(saved) == states | {"__bone_meta__"}
    assert all(saved[k].shape == (cfg.n_head, cfg.head_size, cfg.head_size) and saved[k].dtype == torch.float32
               for k in states)
    assert all(torch.equal(saved[k], final[k]) for k in states)
    model = from_state_dict(base_sd, op="cpu")
    before = data_loss(model, d)
    bone.load_adapter(model, latest_adapter(tmp_path))
    assert data_loss(model, d) < before - 0.01


def test_sigkill_then_resume_repeats_the_state_tuning_losses(setup, tmp_path):
    extra = ("--lr_init", "0.5", "--lr_final", "0.5", "--strategy", "deepspeed_stage_2", "--save_every_steps", "4",
             "--chunk_ctx", "12")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    state_train(setup, straight, *extra, steps=24, ctx_len=32)
    proc = state_train(setup, killed, *extra, steps=24, ctx_len=32, wait=False)
    deadline = time.time() + 240
    while not (killed / "resume").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first resume point"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = max(int(p.name[8:15]) for p in killed.glob("adapter-*.pth"))
    assert resumed_from < 24, "killed too late to test anything"
    state_train(setup, killed, *extra, "--resume", steps=24, ctx_len=32)
    a, b = losses(straight), losses(killed)
    assert sorted(b) == list(range(1, 25))
    for step in range(resumed_from + 1, 25):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])
    one = torch.load(latest_adapter(straight), weights_only=True)
    two = torch.load(latest_adapter(killed), weights_only=True)
    assert all(torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6) for k in one if k != "__bone_meta__")


@pytest.mark.parametrize("extra, message", [
    (["--peft", "state", "--bone_r", "16"], "--peft state trains only each layer's initial state, but --bone_r"),
    (["--peft", "state", "--lora_r", "4"], "but --lora_r sets up an adapter"),
    (["--peft", "state", "--target_modules", "att.key"], "but --target_modules sets up an adapter"),
    (["--peft", "state", "--train_parts", "state"], "--peft state already trains the state"),
    (["--peft", "state", "--lr_state", "0"], "--lr_state 0.0 must be a positive number"),
    (["--peft", "none", "--train_parts", "state,ln"], "--peft none trains base parameters, and the state is not one"),
])
def test_bad_state_arguments_are_one_sentence(setup, tmp_path, extra, message):
    d, model = setup
    done = subprocess.run([sys.executable, "train.py", "--load_model", model, "--data_file", str(d / "data"),
                           "--proj_dir", str(tmp_path / "run"), "--accelerator", "cpu", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("base, extra", [
    ("setup7", ["--strategy", "deepspeed_stage_3", "--grad_cp", "1", "--chunk_ctx", "12", "--val_split", "0.1"]),
    ("setup", ["--strategy", "deepspeed_stage_1", "--logger", "tensorboard", "--quant", "nf4"]),
], ids=["x070-zero3-grad_cp-chunk-val", "x060-zero1-tensorboard-nf4"])
def test_state_tuning_with_the_other_training_options(request, tmp_path, base, extra):
    """ZeRO-3 gathers each state in its layer's forward: the file holds whole [H, N, N] tensors."""
    setup = request.getfixturevalue(base)
    state_train(setup, tmp_path, *extra, steps=8, ctx_len=32)
    saved = torch.load(latest_adapter(tmp_path), weights_only=True)
    cfg = from_state_dict(torch.load(setup[1], weights_only=True)).config
    assert sorted(k for k in saved if k != "__bone_meta__") == [f"blocks.{i}.att.time_state" for i in range(cfg.n_layer)]
    assert all(v.shape == (cfg.n_head, cfg.head_size, cfg.head_size) and v.abs().max() > 0.1
               for k, v in saved.items() if k != "__bone_meta__")


def test_bone_and_state_in_one_run(setup, tmp_path):
    """--train_parts state beside bone: one file with both; the state at its own learning rate."""
    d, model = setup
    done = subprocess.run([sys.executable, "train.py", "--load_model", model, "--data_file", str(d / "data"),
                           "--proj_dir", str(tmp_path), "--ctx_len", "16", "--micro_bsz", "4", "--epoch_steps", "8",
                           "--bone_r", "16", "--lr_init", "1e-3", "--train_parts", "state,ln", "--accelerator", "cpu",
                           "--strategy", "deepspeed_stage_2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the state at lr 1, the rest at 0.001, on one schedule (--lr_state's default)" in done.stdout
    saved = torch.load(latest_adapter(tmp_path), weights_only=True)
    assert saved["__bone_meta__"]["train_parts"] == ["ln", "state"]
    states = [k for k in saved if k.endswith("time_state")]
    assert len(states) == 2 and any(k.endswith(".bone") for k in saved)
    # Adam's first steps move each element by about the lr: the state's by ~1, bone's by ~1e-3.
    assert min(saved[k].abs().max() for k in states) > 0.5
    assert max(v.abs().max() for k, v in saved.items() if k.endswith(".bone")) < 0.05
    # Merged, the rwkv package runs it as trained: bone, ln and the state inside the RWKV-6 file.
    merged = tmp_path / "merged.pth"
    done = subprocess.run([sys.executable, "merge.py", "--base_model", model, "--adapter", str(latest_adapter(tmp_path)),
                           "--output", str(merged), "--dtype", "fp32", "--quiet"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = list(range(1, 30))
    trained = bone.load_adapter(from_state_dict(torch.load(model, weights_only=True), op="cpu"), latest_adapter(tmp_path))
    with torch.no_grad():
        ours = trained(torch.tensor([ids]))[0][0]
    theirs = package_logits(merged, ids)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert (package_logits(model, ids) - theirs).abs().max() > 1e-2 * theirs.abs().max()


def test_convergence_bench_has_the_state_rows(tmp_path):
    """bench/convergence.py --methods: state and bone+state at their own parameter counts; bone+state's
    state learns at the state row's best lr."""
    import json
    done = subprocess.run([sys.executable, "bench/convergence.py", "--quick", "--steps", "3", "--pretrain", "4",
                           "--lrs", "0.01", "--state_lrs", "0.1,1", "--methods", "bone+state,state,bone",
                           "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    results = summary["results"]
    assert summary["methods"] == ["bone", "state", "bone+state"]
    assert results["state"]["params"] == 2 * 4 * 32 * 32            # quick: 2 layers, 128 wide, heads of 32
    assert results["bone+state"]["params"] == results["bone"]["params"] + results["state"]["params"]
    assert results["bone+state"]["state_lr"] == results["state"]["lr"] in (0.1, 1.0)
    table = (tmp_path / "table.md").read_text()
    assert "| state | 8,192 |" in table and f"(state {results['state']['lr']:g})" in table
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_state_tuning_on_sft_data_with_validation(tmp_path):
    """SFT masks (the loss on the responses only) and a validation split, on a World-vocabulary base."""
    from tests.test_data import SFT, write_jsonl
    from tests.tiny import save_random_checkpoint
    model = save_random_checkpoint(str(tmp_path), "world", 0)[0]
    data = write_jsonl(tmp_path / "sft.jsonl", SFT * 4)
    out = state_train((tmp_path, model), tmp_path / "run", "--data_file", data, "--data_type", "sft", "--val_split",
                      "0.2", "--strategy", "deepspeed_stage_2", steps=8)
    assert "validation loss on" in out, out[-2000:]
    saved = torch.load(latest_adapter(tmp_path / "run"), weights_only=True)
    assert sorted(k for k in saved if k != "__bone_meta__") == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    rows = losses(tmp_path / "run")
    assert len(rows) == 8 and all(np.isfinite(v) for v in rows.values())
