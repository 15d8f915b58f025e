"""train.py --objective dpo|simpo|orpo on preference pairs. The DPO reference pass (the trained tensors'
starting values switched in) against the starting model loaded fresh, in fp32, from its files (the base,
and for --bone_load the adapter merged into it by merge.py's code), log-probs computed here from the
plain logits; DPO's loss at the start is ln 2 with zero rewards for each kind of trained tensor; and a
ZeRO-2 Bone run on each family (and on an nf4-quantized base) learns an easy preference set, logging TRL's
metrics, and repeats its losses after kill -9 and --resume."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from src import bone, family
from src.data import make_dataset
from src.merging import merge_checkpoint
from src.training.module import RWKVLightning
from tests.test_train import ROOT, free_port
from tests.tiny import randomize, save_random_checkpoint

CTX = 24
VARIANTS = {"bone": ["--bone_r", "16"], "bat": ["--bone_r", "16", "--bone_mode", "bat"],
            "mini": ["--bone_r", "16", "--bone_mode", "mini", "--bone_mini_r", "8"],
            "lora": ["--peft", "lora", "--lora_r", "4"], "state": ["--peft", "state"],
            "bone_load": ["--bone_r", "16", "--bone_load", "ADAPTER"]}


def make_world(d, shape):
    """A tiny model with the World vocabulary (the pairs are World tokens), an SFT adapter for it, and an
    easy preference set: the same chosen and rejected reply for every prompt."""
    ckpt, _, _ = save_random_checkpoint(str(d), shape, seed=0)
    model = family.from_checkpoint(ckpt, dtype=torch.float32, op="cpu")
    bone.apply_adapters(model, bone.BoneConfig.from_dict({"r": 16}), verbose=False)
    randomize(model, seed=3, scale=0.05)
    adapter = str(d / f"sft-{shape}.pth")
    bone.save_adapter(model, adapter)
    with open(d / "easy.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "No idea."}) + "\n")
    return d, ckpt, adapter


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("pref"), "world")


@pytest.fixture(scope="module")
def world7(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("pref7"), "world7")


def build(ckpt, flags, objective="dpo"):
    """The model and Lightning module as train.py builds them for these flags (fp32, CPU)."""
    args = train.parse_args(["--load_model", ckpt, "--data_file", "-", "--data_type", "preference",
                             "--objective", objective, *flags])
    train.check_state_args(args)
    train.check_objective(args)
    model = family.from_checkpoint(ckpt, dtype=torch.float32, op="cpu")
    train.apply_peft(model, args, bone)
    objective, hyper = train.preference(args)
    return model, RWKVLightning(model, lr_init=1e-3, objective=objective, hyper=hyper)


def batch(d, n=3):
    ds = make_dataset(str(d / "easy.jsonl"), "preference", CTX, 65536, seed=0)
    return [torch.stack(t) for t in zip(*(ds[i] for i in range(n)))]


def plain_logps(model, idx, targets, mask):
    """Summed log-probs of the masked targets from the whole logits, in float64: [B, 2]."""
    rows = [t.flatten(0, 1) for t in (idx, targets, mask)]
    with torch.no_grad():
        logits = model(rows[0])[0].double()
    lp = torch.log_softmax(logits, -1).gather(-1, rows[1][..., None]).squeeze(-1)
    return (lp * rows[2].double()).sum(1).view(-1, 2)


def flags(variant, adapter):
    return [adapter if f == "ADAPTER" else f for f in VARIANTS[variant]]


@pytest.mark.numerical
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_is_the_starting_model_loaded_fresh(world, tmp_path, variant):
    d, ckpt, adapter = world
    model, module = build(ckpt, flags(variant, adapter))
    with torch.no_grad():   # as after some training: every trained tensor moved (a state's values are O(1))
        g, scale = torch.Generator().manual_seed(7), 1.0 if variant == "state" else 0.05
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(scale * torch.randn(p.shape, generator=g))
    idx, targets, mask = batch(d)
    pair = module.pair_logps(idx, targets, mask, reference=True)
    start = ckpt
    if variant == "bone_load":      # the starting model: the SFT adapter merged into the base by merge.py's code
        start = str(tmp_path / "merged.pth")
        merge_checkpoint(ckpt, adapter, start, dtype="fp32", progress=False)
    fresh = family.from_checkpoint(start, dtype=torch.float32, op="cpu")
    want = plain_logps(fresh, idx, targets, mask)
    ref = torch.stack([pair.ref_chosen, pair.ref_rejected], 1).double()
    torch.testing.assert_close(ref, want, rtol=2e-6, atol=2e-5)      # fp32 rounding of sums of ~25 log-probs
    policy = torch.stack([pair.chosen, pair.rejected], 1).detach().double()
    assert (policy - want).abs().max() > 1e-2      # the trained tensors were really switched out and back
    torch.testing.assert_close(policy, plain_logps(model, idx, targets, mask), rtol=2e-6, atol=2e-5)


@pytest.mark.numerical
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dpo_starts_at_ln2_with_zero_rewards(world, variant):
    d, ckpt, adapter = world
    _, module = build(ckpt, flags(variant, adapter))
    loss, metrics = module.preference_loss(*batch(d))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[key].item()) < 1e-6, key
    loss.backward()     # and the gradient reaches the trained tensors
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters() if p.requires_grad)


def run_train(d, ckpt, out, *extra):
    cmd = [sys.executable, "train.py", "--load_model", ckpt, "--data_file", str(d / "easy.jsonl"),
           "--data_type", "preference", "--proj_dir", str(out), "--ctx_len", str(CTX), "--micro_bsz", "2",
           "--epoch_steps", "6", "--epoch_count", "1", "--lr_init", "1e-2", "--lr_final", "1e-2",
           "--accelerator", "cpu", "--seed", "1", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("shape, extra", [("world", []), ("world7", []), ("world", ["--quant", "nf4"])],
                         ids=["x060", "x070", "x060-nf4"])
def test_dpo_under_zero2_learns_an_easy_preference(request, tmp_path, shape, extra):
    d, ckpt, _ = request.getfixturevalue(shape)
    rc, output = run_train(d, ckpt, tmp_path / "run", "--objective", "dpo", "--bone_r", "16",
                           "--strategy", "deepspeed_stage_2", *extra)
    assert rc == 0, output[-3000:]
    assert "the reference is the model as the run starts, the base alone" in output
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    first, last = rows[0], rows[-1]
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-5)   # step 1's loss is the start's
    assert float(first["rewards/chosen"]) == 0 and float(first["rewards/margins"]) == 0
    assert float(last["loss"]) < 0.5 and float(last["rewards/accuracies"]) == 1.0
    assert float(last["rewards/chosen"]) > 0 > float(last["rewards/rejected"])


@pytest.mark.parametrize("extra, words", [
    (["--objective", "dpo", "--pref_beta", "0"], "--pref_beta 0"),
    (["--objective", "dpo", "--peft", "none", "--train_parts", "ln"], "reference"),
    (["--objective", "dpo", "--train_parts", "head"], "reference"),
    (["--objective", "orpo", "--pref_beta", "1"], "--pref_beta is not an option of --objective orpo"),
    (["--objective", "sft"], "--data_type preference"),
])
def test_bad_options_are_one_sentence_before_any_work(world, tmp_path, extra, words):
    d, ckpt, _ = world
    rc, output = run_train(d, ckpt, tmp_path / "run", *extra)
    assert rc != 0 and "Traceback" not in output and words in output, output[-2000:]
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.numerical
@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_simpo_and_orpo_steps_are_their_loss_on_the_plain_log_probs(world, objective):
    """The module's step: the objective's loss (tests/test_objectives.py checks those) on log-probs equal
    to the plain logits', the learnt-token counts as |y|, and a gradient on the adapter."""
    from src.objectives import OBJECTIVES, PairLogps
    d, ckpt, _ = world
    model, module = build(ckpt, ["--bone_r", "16"], objective)
    randomize(model, seed=5, scale=0.05)
    idx, targets, mask = batch(d)
    loss, metrics = module.preference_loss(idx, targets, mask)
    want = plain_logps(model, idx, targets, mask).float()
    counts = mask.sum(-1)
    expected, _ = OBJECTIVES[objective].loss(PairLogps(want[:, 0], want[:, 1], counts[:, 0], counts[:, 1]), **module.hyper)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.numerical
def test_sequence_logps_gradients_are_the_plain_forms_row_by_row(world):
    """The fused per-row head (ops/head_loss.py, rows=True) against the plain form on the whole logits, in
    float64: each row's summed log-prob weighted by its own factor (as the objectives weight chosen and
    rejected), L2Wrap on every position; every adapter gradient equal to float64 rounding."""
    from src.training.loss import L2Wrap, sequence_logps
    d, ckpt, _ = world
    idx, targets, mask = (t.flatten(0, 1) for t in batch(d))
    weights = torch.linspace(-1.5, 2.0, idx.shape[0], dtype=torch.float64)       # a different gradient per row
    grads = []
    for fused in (True, False):
        model, _ = build(ckpt, ["--bone_r", "16"])
        randomize(model, seed=5, scale=0.05)
        model.double()
        if fused:
            logps = sequence_logps(model, idx, targets, mask)
        else:
            logits = model(idx)[0]
            lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
            logps = L2Wrap.apply((lp * mask.double()).sum(1), logits, targets.numel())
        (weights * logps).sum().backward()
        grads.append((logps.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    # Measured (default, MKL_CBWR=AVX2, one thread): log-probs (~67) within 1.5e-14, gradients within
    # 9.5e-14 of each tensor's largest: float64 sums taken in another order. Bounds: 100x that.
    assert (grads[0][0] - grads[1][0]).abs().max() <= 1.5e-12
    for name, g in grads[1][1].items():
        assert (grads[0][1][name] - g).abs().max() <= 1e-11 * g.abs().max(), name


@pytest.mark.numerical
def test_chunk_ctx_gives_the_plain_pass_gradients(world):
    """--chunk_ctx: the DPO step's loss and every adapter gradient as without it (the state carried
    across pieces with its gradient)."""
    d, ckpt, _ = world
    grads = []
    for chunk in (0, 7):
        model, module = build(ckpt, ["--bone_r", "16"])
        randomize(model, seed=5, scale=0.05)
        module.chunk_ctx = chunk
        loss, _ = module.preference_loss(*batch(d))
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("shape", ["world", "world7"], ids=["x060", "x070"])
def test_dpo_sigkill_then_resume_repeats_the_losses(request, tmp_path, shape):
    """A DPO run continuing an SFT adapter, killed after its first resume point and resumed, logs the
    uninterrupted run's losses and rewards: the resumed run's reference is still the loaded adapter."""
    import signal
    import time
    d, ckpt, adapter = request.getfixturevalue(shape)
    extra = ["--objective", "dpo", "--bone_r", "16", "--bone_load", adapter, "--strategy", "deepspeed_stage_2",
             "--save_every_steps", "2", "--epoch_steps", "8"]
    rc, output = run_train(d, ckpt, tmp_path / "straight", *extra)
    assert rc == 0, output[-3000:]
    assert f"the base with the adapter loaded from {adapter}" in output
    killed = tmp_path / "killed"
    cmd = [sys.executable, "train.py", "--load_model", ckpt, "--data_file", str(d / "easy.jsonl"), "--data_type",
           "preference", "--proj_dir", str(killed), "--ctx_len", str(CTX), "--micro_bsz", "2", "--epoch_count", "1",
           "--lr_init", "1e-2", "--lr_final", "1e-2", "--accelerator", "cpu", "--seed", "1", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MASTER_PORT": str(free_port())})
    deadline = time.time() + 300
    while not (killed / "resume").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first resume point"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter-0000008.pth").exists(), "killed too late to test anything"
    rc, output = run_train(d, ckpt, killed, *extra, "--resume")
    assert rc == 0, output[-3000:]

    def log(run):
        with open(run / "log.csv") as f:
            return {int(r["step"]): r for r in csv.DictReader(f)}
    a, b = log(tmp_path / "straight"), log(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key in ("loss", "rewards/chosen", "rewards/margins"):
            assert float(b[step][key]) == pytest.approx(float(a[step][key]), rel=1e-5, abs=1e-6), (step, key)


def test_validation_reports_the_held_out_loss_and_preference_accuracy(world, tmp_path):
    """--val_split with DPO: log.csv's val_loss and val_accuracy at the last step are those computed here
    from the plain logits of the run's final adapter and of the base (the reference) on the held-out pairs;
    loss.png has its accuracy panel."""
    from src.generation import load_model
    from src.objectives import OBJECTIVES, PairLogps
    d, ckpt, _ = world
    out = tmp_path / "run"
    rc, output = run_train(d, ckpt, out, "--objective", "dpo", "--bone_r", "16", "--val_split", "0.25",
                           "--val_every", "3")
    assert rc == 0, output[-3000:]
    with open(out / "log.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert rows[3]["val_accuracy"] and not rows[2]["val_accuracy"]
    held = make_dataset(str(d / "easy.jsonl"), "preference", CTX, 65536, seed=1, val_split=0.25, part="val")
    idx, targets, mask = [torch.stack(t) for t in zip(*(held[i] for i in range(len(held))))]
    policy = plain_logps(load_model(ckpt, str(out / "adapter-0000006.pth")), idx, targets, mask)
    ref = plain_logps(family.from_checkpoint(ckpt, dtype=torch.float32, op="cpu"), idx, targets, mask)
    counts = mask.sum(-1)
    loss, _ = OBJECTIVES["dpo"].loss(PairLogps(policy[:, 0], policy[:, 1], counts[:, 0], counts[:, 1],
                                               ref[:, 0], ref[:, 1]), beta=0.1)
    assert float(rows[6]["val_loss"]) == pytest.approx(loss.item(), rel=1e-4)
    assert float(rows[6]["val_accuracy"]) == (policy[:, 0] > policy[:, 1]).double().mean().item()
    assert f"held-out preference accuracy (chosen reply's logp above the rejected one's): {float(rows[6]['val_accuracy']):.3f} " \
           f"at step 6 (first {float(rows[3]['val_accuracy']):.3f} at step 3, the starting model " in output
    assert (out / "loss.png").exists()
