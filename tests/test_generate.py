"""generate.py and src/sampling.py against the `rwkv` package: greedy decoding of base + adapter
is greedy decoding of the fp32-merged file in the rwkv runtime; the repetition penalties choose
what PIPELINE.generate chooses; the sampling distribution and its top_p / top_k support are
PIPELINE.sample_logits'; seeded runs repeat; bad input is one sentence."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import generate
from src.generation import load_model, model_step, world_sampler
from src.generation import generate as generate_ids
from src.sampling import Sampler, SamplingArgs, distribution
from src.rwkv_package import run_rwkv_package
from src.tokenizer import world_tokenizer
from tests.test_merge import make_pair, run_merge
from tests.tiny import rwkv_runtime, save_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The quick brown fox"
NO_PENALTY = ["--alpha_presence", "0", "--alpha_frequency", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A World-vocabulary base, a trained-looking adapter and their fp32 merge."""
    d = tmp_path_factory.mktemp("generate")
    base, adapter = make_pair(d, "world", "bone", 16, base_dtype="fp32")
    merged = d / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet") is None
    return base, adapter, str(merged)


def run_generate(capsys, *argv):
    generate.main([str(a) for a in argv])
    return capsys.readouterr().out


def runtime_greedy(path, ids, n):
    """Plain greedy decoding in the rwkv runtime: argmax, feed back, through its state."""
    runtime, out = rwkv_runtime(path), []
    with torch.no_grad():
        logits, state = runtime.forward(ids, None)
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits, state = runtime.forward([out[-1]], state)
    return out


@pytest.mark.numerical
def test_greedy_on_base_and_adapter_is_greedy_on_the_merged_file_in_the_rwkv_runtime(world, capsys):
    base, adapter, merged = world
    tokenizer = world_tokenizer()
    prompt = tokenizer.encode(PROMPT)
    expected = runtime_greedy(merged, prompt, 32)
    assert max(expected) < tokenizer.vocab_size       # ids with text (else the comparison below means nothing)
    greedy = SamplingArgs(temperature=0, alpha_presence=0, alpha_frequency=0)
    ours = list(generate_ids(model_step(load_model(base, adapter)), prompt, 32, world_sampler(greedy, tokenizer)))
    assert ours == expected
    out = run_generate(capsys, "--model", base, "--adapter", adapter, "--prompt", PROMPT, "--max_tokens", 32,
                       "--temperature", 0, "--token_stop", "", *NO_PENALTY)
    assert out == tokenizer.decode(expected) + "\n"
    # The adapter matters: the base alone continues differently.
    plain = run_generate(capsys, "--model", base, "--prompt", PROMPT, "--max_tokens", 32, "--temperature", 0,
                         "--token_stop", "", *NO_PENALTY)
    assert plain != out


@pytest.mark.numerical
def test_rwkv7_greedy_is_the_rwkv_package_greedy_on_the_merged_file(tmp_path, capsys):
    """The same for an x070 base + adapter: generate.py's greedy text is the `rwkv` package's
    (RWKV_V7_ON=1, its own process) greedy continuation of the fp32-merged file."""
    base, adapter = make_pair(tmp_path, "world7", "bone", 16, base_dtype="fp32")
    merged = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet") is None
    capsys.readouterr()
    tokenizer = world_tokenizer()
    expected = run_rwkv_package(merged, "x070", tokenizer.encode(PROMPT), n_tokens=24)["continuation"]
    assert len(expected) == 24 and max(expected) < tokenizer.vocab_size
    out = run_generate(capsys, "--model", base, "--adapter", adapter, "--prompt", PROMPT, "--max_tokens", 24,
                       "--temperature", 0, "--token_stop", "", *NO_PENALTY)
    assert out == tokenizer.decode(expected) + "\n"
    plain = run_generate(capsys, "--model", base, "--prompt", PROMPT, "--max_tokens", 24, "--temperature", 0,
                         "--token_stop", "", *NO_PENALTY)
    assert plain != out


@pytest.mark.parametrize("presence, frequency, decay", [(0.2, 0.2, 0.996), (0.05, 0.3, 0.7)])
def test_penalties_are_pipeline_generates(presence, frequency, decay):
    """Greedy choice under PIPELINE's repetition penalties: PIPELINE.generate itself (temperature 0
    is its greedy) and ours pick the same 300 tokens from the same scripted logits, near-ties
    among a dozen tokens (spaces and digits among them, which count with weight 0)."""
    from rwkv.utils import PIPELINE, PIPELINE_ARGS
    tokenizer = world_tokenizer()
    candidates = [tokenizer.encode(t)[0] for t in (" ", "\t", "1", "23", "0", "a", "the", " cat", "\n", "!", "45", "9")]
    g = torch.Generator().manual_seed(3)
    script = -1e9 * torch.ones(301, 65536)
    script[:, candidates] = 0.5 * torch.randn(301, len(candidates), generator=g)

    class Scripted:  # the model: step n's logits are script[n], whatever the tokens
        def forward(self, tokens, state):
            n = 0 if state is None else state + 1
            return script[n].clone(), n

    pipeline = PIPELINE(Scripted(), "rwkv_vocab_v20230424")
    chosen, sample_logits = [], pipeline.sample_logits
    pipeline.sample_logits = lambda *a, **k: chosen.append(sample_logits(*a, **k)) or chosen[-1]
    pipeline.generate("x", token_count=300, args=PIPELINE_ARGS(temperature=0, alpha_presence=presence,
                                                               alpha_frequency=frequency, alpha_decay=decay))
    args = SamplingArgs(temperature=0, alpha_presence=presence, alpha_frequency=frequency, alpha_decay=decay)
    ours = list(generate_ids(Scripted().forward, [1], 300, world_sampler(args, tokenizer)))
    assert ours == chosen
    assert chosen != [int(script[n].argmax()) for n in range(300)]     # the penalties did change the choice


def test_seeded_sampling_repeats_exactly(world, capsys):
    base, adapter, _ = world
    argv = ["--model", base, "--adapter", adapter, "--prompt", PROMPT, "--max_tokens", 16, "--token_stop", ""]
    first = run_generate(capsys, *argv, "--seed", 5)
    assert run_generate(capsys, *argv, "--seed", 5) == first
    assert run_generate(capsys, *argv, "--seed", 6) != first


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.2, 0.0, -0.5, -1.0, -2.0, -3.0])


@pytest.mark.parametrize("temperature, top_p, top_k, support", [
    (1.0, 0.85, 0, 5), (1.0, 0.5, 0, 2), (1.0, 1.0, 0, 10), (1.0, 1.0, 3, 3), (1.0, 0.5, 3, 2), (0.7, 0.9, 4, 4),
    (1.5, 0.0, 0, 1)])
@pytest.mark.numerical
def test_top_p_and_top_k_restrict_the_support_as_pipeline_does(temperature, top_p, top_k, support):
    from rwkv.utils import PIPELINE
    probs = distribution(LOGITS, temperature, top_p, top_k)
    assert (probs > 0).sum() == support and probs.sum().item() == pytest.approx(1.0)
    # The support: the most likely tokens, the first of which reach top_p, at most top_k of them.
    p = torch.softmax(LOGITS, -1)
    n = int((p.cumsum(-1) < top_p).sum()) + 1
    assert support == min(n, top_k or 10, 10)
    # On it, p ** (1 / temperature), renormalised.
    expected = p[:support] ** (1 / temperature)
    assert torch.allclose(probs[:support], expected / expected.sum(), atol=1e-6)   # fp32 of 10 values: 8 eps
    # PIPELINE.sample_logits draws from that distribution: same support, frequencies within 4 sigma.
    # (Its fp32 cumulative sum can stop short of 1.0, and then top_p = 1 falls back to greedy:
    # asked just below 1, it keeps every token here, which is what top_p = 1 means.)
    draws = 4000
    np.random.seed(0)
    counts = np.bincount([PIPELINE.sample_logits(None, LOGITS, temperature, min(top_p, 0.9999), top_k)
                          for _ in range(draws)], minlength=10)
    assert np.flatnonzero(counts).tolist() == list(range(support))
    # 4 sigma: a right sampler fails with chance 6e-5 per token; the seeds are fixed, so every run and
    # machine draws the same numbers and gets the same verdict.
    sigma = np.sqrt(probs.numpy() * (1 - probs.numpy()) / draws)
    assert np.all(np.abs(counts / draws - probs.numpy()) <= 4 * sigma + 1e-9)
    # ... and so does ours, seeded.
    g = torch.Generator().manual_seed(0)
    sampler = Sampler(SamplingArgs(temperature, top_p, top_k, 0, 0), 10, generator=g)
    ours = np.bincount([sampler(LOGITS) for _ in range(draws)], minlength=10)
    assert np.flatnonzero(ours).tolist() == list(range(support))


def test_bad_input_is_one_sentence(world, tmp_path):
    base, adapter, _ = world
    small, _, _ = save_random_checkpoint(str(tmp_path), "small", 0)
    cases = [
        (["--model", tmp_path / "nope.pth", "--prompt", "x"], "nope.pth does not exist"),
        (["--model", small, "--prompt", "x"], "has a vocabulary of 260 ids, not the World tokenizer's 65536"),
        (["--model", base, "--prompt", ""], "The prompt is empty"),
        (["--model", base, "--prompt_file", tmp_path / "none.txt"], "none.txt does not exist"),
        (["--model", base, "--prompt", "x", "--top_p", "1.5"], "--top_p 1.5 is out of range"),
        (["--model", base, "--prompt", "x", "--temperature", "-1"], "--temperature -1.0 is out of range"),
        (["--model", base, "--prompt", "x", "--max_tokens", "0"], "--max_tokens 0 generates nothing"),
        (["--model", base, "--prompt", "x", "--token_ban", "70000"], "Token id 70000 is outside"),
        (["--model", base, "--prompt", "x", "--device", "cpu", "--op", "cuda"], "--op cuda runs on a GPU"),
        (["--model", base, "--prompt", "x", "--dtype", "fp8"], "Unknown --dtype 'fp8'"),
        (["--model", small, "--adapter", adapter, "--prompt", "x"], "vocabulary of 260 ids"),
        (["--model", base, "--adapter", small, "--prompt", "x"], "small-0.pth"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            generate.main([str(a) for a in argv])
        assert isinstance(e.value.code, str) and message in e.value.code, (argv, e.value.code)
        assert e.value.code.startswith("generate.py: ") and "\n" not in e.value.code
    # The real process: exit status 1, the sentence on stderr, no traceback.
    p = subprocess.run([sys.executable, "generate.py", "--model", base, "--prompt", "x", "--top_k", "-2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == "generate.py: --top_k -2 is out of range: give a value 0 (no limit) or more."
