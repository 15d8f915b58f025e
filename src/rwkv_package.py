"""The `rwkv` pip package, the runtime merged files are checked in, run in a child process.

The package picks its model class at import time (RWKV_V7_ON=1 gives RWKV_x070, which then
replaces RWKV-6 support), so each call gets a fresh interpreter set for the file's family and
never disturbs a package imported here. The child reads the prompt in one call (the logits of
every position and the state after it), then continues greedily token by token through the
state, with the same generate loop and sampler as this repository's model; or, for
bench/speed.py, times that loop as src/generation.py's generation_times times ours.
"""
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_rwkv_package(path, family, ids, n_tokens=0, initial_state=None):
    """{"logits": [T, V] fp32 of every prompt position, "state": the package's state list after
    the prompt, "continuation": n_tokens greedy ids} from the `rwkv` package ("cpu fp32").
    initial_state: a list of each layer's [H, N, N] WKV state (a state file's tensors), set into the
    package's zero state as RWKV-Runner does for RWKV-7 (state[3 i + 1] = tensor, as it is)."""
    return _run_child(path, family, {"ids": list(ids), "n_tokens": n_tokens,
                                     "initial_state": None if initial_state is None else [s.float() for s in initial_state]})


def time_rwkv_package(path, family, prompt, short_prompt, new_tokens, repeat, threads):
    """generation_times (src/generation.py) of the `rwkv` package's forward on this file, "cpu fp32"
    with `threads` torch threads and TorchScript on, the package's default (RWKV-7 always runs it)."""
    job = {"timing": [list(prompt), list(short_prompt), new_tokens, repeat], "threads": threads}
    return _run_child(path, family, job, jit=True)["timing"]


def _run_child(path, family, job, jit=False):
    with tempfile.TemporaryDirectory(prefix="rwkv-package-") as tmp:
        # RWKV_x070 opens NAME + ".pth", RWKV-6 appends .pth when missing: a link named *.pth serves both.
        model = os.path.join(tmp, "model.pth")
        os.symlink(os.path.abspath(os.fspath(path)), model)
        request, result = os.path.join(tmp, "request.pt"), os.path.join(tmp, "result.pt")
        torch.save({"model": model[:-4], **job}, request)
        env = {**os.environ, "RWKV_JIT_ON": "1" if jit else "0", "RWKV_CUDA_ON": "0",
               "RWKV_V7_ON": "1" if family == "x070" else "0"}
        done = subprocess.run([sys.executable, "-m", "src.rwkv_package", request, result], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"The rwkv package could not run {path} ({last}).")
        return torch.load(result, weights_only=True)


def _child(request, result):
    from rwkv.model import RWKV

    from .generation import WORLD_VOCAB, generate, generation_times, world_sampler
    from .sampling import GREEDY, Sampler
    from .tokenizer import world_tokenizer

    job = torch.load(request, weights_only=True)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    runtime = RWKV(job["model"], strategy="cpu fp32")    # (RWKV_x070 takes no verbose flag)
    if "timing" in job:
        with torch.no_grad():
            torch.save({"timing": generation_times(runtime.forward, *job["timing"])}, result)
        return

    def start():
        """The state a sequence starts from: the package's zeros, or the given initial WKV states."""
        if job.get("initial_state") is None:
            return None
        state = runtime.generate_zero_state()
        for i, s in enumerate(job["initial_state"]):
            state[i * 3 + 1] = s.to(state[i * 3 + 1].dtype).clone()
        return state

    def forward(ids, state, **kwargs):
        return runtime.forward(ids, start() if state is None else state, **kwargs)

    with torch.no_grad():
        logits, state = forward(job["ids"], None, full_output=True)
        logits = logits.float().reshape(len(job["ids"]), -1)
        state = [s.clone() for s in state]
        vocab = logits.shape[-1]
        sampler = world_sampler(GREEDY, world_tokenizer()) if vocab == WORLD_VOCAB else Sampler(GREEDY, vocab)
        new = list(generate(forward, job["ids"], job["n_tokens"], sampler)) if job["n_tokens"] else []
    torch.save({"logits": logits, "state": state, "continuation": new}, result)


if __name__ == "__main__":
    os.environ.setdefault("RWKV_JIT_ON", "0")
    with open(os.devnull, "w") as quiet:     # the package prints a banner on import
        stdout, sys.stdout = sys.stdout, quiet
        try:
            _child(*sys.argv[1:3])
        finally:
            sys.stdout = stdout
