"""generate.py --chat against the `rwkv` package: a tiny World RWKV-7 model fully fine-tuned on one
conversation (so the file is itself the "merged" model) chats it back through stdin; every turn's
logits equal the package's logits of the whole chat text at the same position, so the state is
carried right from turn to turn, also after a reply closed by a `\\n\\n ` id (cut there, the id's
space kept in the state); --history resumes to the same state as the uninterrupted chat, is
never half-written; bad input is one sentence, with the history file untouched."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import generate
from src.chat_template import chat_prompt, render
from src.checkpoint import save_checkpoint
from src.family import from_state_dict
from src.generation import Chat, load_model, model_step, world_sampler
from src.rwkv_package import run_rwkv_package
from src.sampling import GREEDY
from src.tokenizer import world_tokenizer
from tests.tiny import WORLD7, random_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "Be brief."
TURNS = [("Hi!", "Hello."), ("Name?", "Tiny."), ("Bye", "See you.")]
MESSAGES = [{"role": "system", "content": SYSTEM}] + [
    {"role": r, "content": c} for u, a in TURNS for r, c in (("user", u), ("assistant", a))]
# The conversation as trained: the second reply is closed by the id "\n\n " (not "\n\n"), as a
# model may well close one; the chat must cut the reply there and carry that space in its state.
TEXT = render(MESSAGES)[0].replace("Tiny.\n\nUser", "Tiny.\n\n User")
SCRIPT = "".join(u + "\n" for u, _ in TURNS)
REPLIES = "".join(a + "\n\n" for _, a in TURNS)     # what a script reads: each reply, then an empty line


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A random tiny World RWKV-7 trained (all weights, Adam) until greedy decoding gives back TEXT."""
    ids = world_tokenizer().encode(TEXT)
    assert world_tokenizer().encode("\n\n ")[0] in ids      # the test below means something
    torch.manual_seed(0)
    model = from_state_dict(random_state_dict(WORLD7, 0), op="cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    for _ in range(80):
        logits = model(x)[0][0]
        loss = torch.nn.functional.cross_entropy(logits, y)
        if loss < 0.5 and bool((logits.argmax(-1) == y).all()):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
        pytest.fail(f"the tiny model did not learn the conversation (loss {loss.item():.3f})")
    path = tmp_path_factory.mktemp("chat") / "tiny-chat.pth"
    save_checkpoint({k: v.detach() for k, v in model.state_dict().items()}, path, "fp32")
    return str(path)


def recorded_chat(path, messages=()):
    """A greedy Chat on the model at path whose step records (ids fed, logits after them)."""
    inner, calls = model_step(load_model(path)), []

    def step(ids, state):
        logits, state = inner(ids, state)
        calls.append((list(ids), logits))
        return logits, state
    tokenizer = world_tokenizer()
    return Chat(step, tokenizer, world_sampler(GREEDY, tokenizer), 20, (0,), messages), calls


def flat(state):
    return torch.cat([t.flatten() for layer in state for t in layer])


def run_main(monkeypatch, capsys, stdin, *argv):
    """generate.main in this process with stdin a script (not a terminal); its stdout."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    generate.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_scripted_chat_gives_the_trained_replies_with_the_rwkv_packages_state(model_path, tmp_path):
    # The real process, scripted through stdin: three turns, each reply printed and then an empty line.
    history = tmp_path / "chat.json"
    done = subprocess.run([sys.executable, "generate.py", "--model", model_path, "--chat", "--system", SYSTEM,
                           "--temperature", "0", "--history", str(history), "--device", "cpu"],
                          cwd=ROOT, input=SCRIPT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == REPLIES
    assert json.loads(history.read_text(encoding="utf-8")) == {"messages": MESSAGES}
    assert os.listdir(tmp_path) == ["chat.json"]        # no temporary left beside it

    # The same chat through Chat: it feeds exactly the training text's ids (the "\n\n " id among
    # them, as the id that closed reply 2), each turn reading only its own prompt.
    chat, calls = recorded_chat(model_path, MESSAGES[:1])
    assert [chat.reply(u) for u, _ in TURNS] == [a for _, a in TURNS]
    tokenizer = world_tokenizer()
    fed = [i for ids, _ in calls for i in ids]
    assert fed == tokenizer.encode(TEXT)
    assert calls[0][0] == tokenizer.encode(chat_prompt("Hi!", SYSTEM))
    third = tokenizer.encode(chat_prompt("Bye"))
    start = next(n for n, (ids, _) in enumerate(calls) if ids == third)
    assert tokenizer.decode(calls[start - 1][0]) == "\n\n "     # the state after that id carried on

    # The rwkv package reads all of it at once up to the third prompt: at every position we
    # reached through the carried state, its logits are ours; its greedy reply is ours.
    prompt_end = sum(len(ids) for ids, _ in calls[:start + 1])
    reply = tokenizer.encode(" See you.\n\n")
    package = run_rwkv_package(model_path, "x070", fed[:prompt_end], n_tokens=len(reply))
    assert package["continuation"] == reply
    position = -1
    for ids, logits in calls[:start + 1]:
        position += len(ids)
        assert torch.allclose(logits, package["logits"][position], atol=1e-4, rtol=1e-4), position


def test_history_resumes_to_the_uninterrupted_state_and_is_never_half_written(model_path, tmp_path, monkeypatch,
                                                                              capsys):
    argv = ["--model", model_path, "--chat", "--temperature", 0, "--device", "cpu", "--history", tmp_path / "h.json"]
    assert run_main(monkeypatch, capsys, "Hi!\n", *argv, "--system", SYSTEM) == "Hello.\n\n"
    first = (tmp_path / "h.json").read_bytes()
    assert json.loads(first) == {"messages": MESSAGES[:3]}

    # Interrupted while the file is being replaced: the chat ends cleanly, the old file is whole.
    def interrupted(*_):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupted)
        assert run_main(monkeypatch, capsys, "Name?\n", *argv) == "Tiny.\n\n"
    assert (tmp_path / "h.json").read_bytes() == first and os.listdir(tmp_path) == ["h.json"]

    # Resumed (the system prompt comes from the file): the next replies are the uninterrupted chat's.
    assert run_main(monkeypatch, capsys, "Name?\nBye\n", *argv) == "Tiny.\n\nSee you.\n\n"
    assert json.loads((tmp_path / "h.json").read_text(encoding="utf-8")) == {"messages": MESSAGES}

    # ... and so is the state: the history's text read once, then the turn, equals turn by turn.
    whole, _ = recorded_chat(model_path, MESSAGES[:1])
    resumed, calls = recorded_chat(model_path, MESSAGES[:3])
    for u, _ in TURNS[:2]:
        whole.reply(u)
    assert resumed.reply("Name?") == "Tiny."
    assert calls[0][0] == world_tokenizer().encode(render(MESSAGES[:3])[0] + chat_prompt("Name?"))
    assert torch.allclose(flat(resumed.state), flat(whole.state), atol=1e-5, rtol=1e-4)


def test_bad_chat_input_is_one_sentence_and_the_history_untouched(model_path, tmp_path, monkeypatch, capsys):
    def write(name, text):
        (tmp_path / name).write_text(text, encoding="utf-8")
        return tmp_path / name
    other = write("other.json", json.dumps({"conversations": [{"from": "human", "value": "hi"}]}))
    broken = write("broken.json", '{"messages": [')
    order = write("order.json", json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}))
    system = write("system.json", json.dumps({"messages": MESSAGES[:3]}))
    saved = {p: p.read_bytes() for p in (other, broken, order, system)}
    base = ["--model", model_path]
    cases = [
        (base + ["--chat", "--prompt", "hi"], "--prompt and --chat exclude each other"),
        (base + ["--prompt", "hi", "--history", tmp_path / "h.json"], "--system and --history are options of --chat"),
        (base + ["--chat", "--history", other], "other.json is not a chat history: generate.py --chat keeps"),
        (base + ["--chat", "--history", broken], "broken.json is not a chat history (JSONDecodeError)"),
        (base + ["--chat", "--history", order], "order.json is not a chat history"),
        (base + ["--chat", "--history", system, "--system", "Be long."], "system.json already starts the chat"),
        (base + ["--chat", "--history", tmp_path], "is a folder: give a file"),
        (base + ["--chat", "--history", tmp_path / "no" / "h.json"], "its folder does not exist"),
        (base + ["--chat", "--system", "\n\n"], "--system is empty"),
    ]
    for argv, message in cases:
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        with pytest.raises(SystemExit) as e:
            generate.main([str(a) for a in argv])
        assert isinstance(e.value.code, str) and message in e.value.code, (argv, e.value.code)
        assert e.value.code.startswith("generate.py: ") and "\n" not in e.value.code
    assert capsys.readouterr().out == ""
    assert {p: p.read_bytes() for p in saved} == saved and not (tmp_path / "h.json").exists()
