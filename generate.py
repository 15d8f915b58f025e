"""Continue a prompt with an RWKV-6 or RWKV-7 World model: a base with the adapter train.py wrote (no merge
needed), or a merged file. The prompt is read once, then the model runs one token at a time
through its state; the continuation streams to stdout. Sampling options mean what they mean in
the `rwkv` package's PIPELINE_ARGS (and default to its values); --temperature 0 is greedy: plain
argmax, the text merge.py --verify prints, unless --alpha_presence or --alpha_frequency is given.

    python generate.py --model RWKV-x060-World-1B6.pth --adapter out/bone/adapter-0001000.pth \\
        --prompt_file prompt.txt --max_tokens 200 --temperature 1 --top_p 0.3

--chat talks instead, in RWKV's chat format, the state carried from turn to turn; from a script
(stdin not a terminal) each line is a user message, and each reply is printed as its lines
followed by one empty line:

    printf 'Hi!\nAnd then?\n' | python generate.py --model merged.pth --chat --temperature 0 --history chat.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def ids(text):
    return tuple(int(i) for i in text.split(",") if i.strip())


def parse_args(argv=None):
    from src.cli import ArgumentParser
    p = ArgumentParser("generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="the base .pth (with --adapter), or a merged one")
    a("--adapter", default=None, help="an adapter file from train.py (adapter-STEP.pth), applied to --model; one with "
                                      "a trained state starts every prompt from it")
    a("--state", default=None, help="a state file (export.py --format state, merge.py's -state.pth for RWKV-7, or the "
                                    "older repository's --peft state file): every prompt starts from it")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt_file", help="a UTF-8 text file holding the prompt")
    prompt.add_argument("--chat", action="store_true", help="chat in RWKV's format (User: ...\\n\\nAssistant: ...), the "
                                                           "state carried turn to turn; with stdin not a terminal, one "
                                                           "user message a line, each reply printed then a blank line")
    a("--system", default=None, help="with --chat: the system prompt the chat starts with")
    a("--history", default=None, help="with --chat: keep the chat in this JSON file ({\"messages\": [...]}), rewritten "
                                      "after each turn; an existing one is resumed")
    a("--max_tokens", type=int, default=200, help="generate at most this many tokens (with --chat: a reply)")
    a("--temperature", type=float, default=1.0, help="0: greedy (plain argmax, as merge.py --verify prints it, unless "
                                                     "a penalty is given); below 1 sharper, above 1 flatter")
    a("--top_p", type=float, default=0.85, help="sample among the most likely tokens that together reach this probability")
    a("--top_k", type=int, default=0, help="sample among at most this many tokens (0: no limit)")
    # None: not given. Sampling takes the package's 0.2; --temperature 0 takes 0 (plain greedy).
    a("--alpha_presence", type=float, default=None, help="penalty on any token already generated "
                                                         "(default 0.2; 0 with --temperature 0)")
    a("--alpha_frequency", type=float, default=None, help="penalty per earlier occurrence (decayed by --alpha_decay "
                                                          "per token; default 0.2; 0 with --temperature 0)")
    a("--alpha_decay", type=float, default=0.996, help="how fast occurrences are forgotten")
    a("--token_ban", type=ids, default=(), help="comma-separated token ids never to generate")
    a("--token_stop", type=ids, default=(0,), help="comma-separated ids that end the text (default 0, the end-of-document "
                                                 "token train.py's data puts after every document; '' for none)")
    a("--seed", type=int, default=None, help="seed the sampling: the same seed gives the same text (default: random)")
    a("--device", default="auto", help="cpu | cuda | auto (cuda when there is a GPU)")
    a("--op", default="auto", help="WKV (WKV6 or WKV7, by the model's family) implementation: auto | cuda | cpu")
    a("--dtype", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on a GPU, fp32 on the CPU)")
    a("--allow_other_base", action="store_true", help="apply --adapter even when --model is not the base it records "
                                                      "(another model, or this adapter already merged): by default "
                                                      "that is refused")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:  # checkpoint, adapter and argument errors are one sentence
        sys.exit(f"generate.py: {e}")
    except BrokenPipeError:     # `generate.py ... | head`: the reader has all it wanted
        sys.stderr.close()
    except KeyboardInterrupt:   # Ctrl-C ends the text, not with a traceback
        sys.exit("\ngenerate.py: interrupted.")


def run(args):
    import torch

    from src.checkpoint import DTYPES, load_checkpoint
    from src.generation import WORLD_VOCAB, Chat, generate, load_model, model_step, stream_text, world_sampler
    from src.sampling import GREEDY, SamplingArgs
    from src.tokenizer import world_tokenizer

    # A penalty not given: the package's default when sampling, none when greedy (plain argmax).
    unset = GREEDY if args.temperature == 0 else SamplingArgs()
    presence = unset.alpha_presence if args.alpha_presence is None else args.alpha_presence
    frequency = unset.alpha_frequency if args.alpha_frequency is None else args.alpha_frequency
    sampling = SamplingArgs(args.temperature, args.top_p, args.top_k, presence, frequency,
                            args.alpha_decay, args.token_ban).check()
    if args.max_tokens < 1:
        raise ValueError(f"--max_tokens {args.max_tokens} generates nothing: give 1 or more.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cpu", "cuda"):
        raise ValueError(f"Unknown --device {args.device!r}: choose cpu, cuda or auto.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but PyTorch sees no GPU here: use --device cpu.")
    dtype = {"auto": "bf16" if device == "cuda" else "fp32"}.get(args.dtype, args.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"Unknown --dtype {args.dtype!r}: choose fp32, bf16, fp16 or auto.")
    if not args.chat and (args.system is not None or args.history is not None):
        raise ValueError("--system and --history are options of --chat: add --chat, or drop them.")
    messages = chat_messages(args) if args.chat else None    # before any work: a bad history is one sentence
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"--prompt_file {args.prompt_file} does not exist.")
        with open(args.prompt_file, encoding="utf-8") as f:
            args.prompt = f.read()
    tokenizer = world_tokenizer()
    prompt = None if args.chat else tokenizer.encode(args.prompt)
    if prompt == []:
        raise ValueError("The prompt is empty: give some text to continue.")
    bad = [i for i in args.token_ban + args.token_stop if not 0 <= i < WORLD_VOCAB]
    if bad:
        raise ValueError(f"Token id {bad[0]} is outside the World vocabulary (0..{WORLD_VOCAB - 1}).")

    if args.op == "cuda" and device != "cuda":
        raise ValueError("--op cuda runs on a GPU: add --device cuda, or use --op cpu.")
    base_sd, config = load_checkpoint(args.model)     # memory-mapped: a quick look before loading
    vocab = config.vocab_size
    if vocab != WORLD_VOCAB:
        raise ValueError(f"{args.model} has a vocabulary of {vocab} ids, not the World tokenizer's {WORLD_VOCAB}: "
                         "generate.py writes text for World models only.")
    if args.adapter is not None:
        # The file's tensors as stored, not the model's (--dtype may round them).
        from src.bone import check_base
        note = check_base(args.adapter, base_sd, config, args.model, args.allow_other_base)
        if note:
            print(f"generate.py: {note}", file=sys.stderr)
    states = None
    if args.state is not None:
        from src.bone import read_adapter
        from src.state_file import read_states
        if not os.path.isfile(args.state):
            raise FileNotFoundError(f"--state {args.state} does not exist.")
        states = read_states(args.state, config)       # another model's shape or family: one sentence, before loading
        if args.adapter is not None and "state" in read_adapter(args.adapter, mmap=True)[1]["train_parts"]:
            raise ValueError(f"--adapter {args.adapter} has a trained state of its own, and --state gives another: "
                             "give one of them.")
        if any(k.endswith(".att.time_state") for k in base_sd):
            print(f"generate.py: note: --state {args.state} replaces the state inside {args.model}.", file=sys.stderr)
    del base_sd

    model = load_model(args.model, args.adapter, DTYPES[dtype], args.op, device)
    if states is not None:
        from src.model import STATE_KEY, add_time_state, remove_time_state
        remove_time_state(model)
        add_time_state(model, {f"blocks.{i}.att.{STATE_KEY}": torch.nn.Parameter(s.to(device), requires_grad=False)
                               for i, s in enumerate(states)})
    generator = torch.Generator()
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    sampler = world_sampler(sampling, tokenizer, WORLD_VOCAB, generator)
    if args.chat:
        return chat(Chat(model_step(model), tokenizer, sampler, args.max_tokens, args.token_stop, messages), args.history)
    tokens = generate(model_step(model), prompt, args.max_tokens, sampler, args.token_stop)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()
    stream_text(tokens, tokenizer, write)
    write("\n")


def chat_messages(args):
    """The chat's first messages: --history's when the file exists (checked as a whole), else the
    --system turn, if any. One sentence for a file that is not a history, or not one to resume."""
    from src.chat_template import ROLES, clean_turn
    path = args.history
    system = None if args.system is None else clean_turn(args.system)
    if system == "":
        raise ValueError("--system is empty: give the system prompt's text, or drop --system.")
    start = [{"role": "system", "content": system}] if system else []
    if path is None:
        return start
    if os.path.isdir(path):
        raise ValueError(f"--history {path} is a folder: give a file.")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"--history {path}: its folder does not exist.")
    if not os.path.exists(path):
        return start
    want = "generate.py --chat keeps {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}, user and assistant turns " \
           "in turn after an optional system turn"
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f)
    except ValueError as e:     # not UTF-8, or not JSON
        raise ValueError(f"--history {path} is not a chat history ({type(e).__name__}): {want}.") from None
    messages = history.get("messages") if isinstance(history, dict) else None
    ok = isinstance(messages, list) and all(isinstance(m, dict) and set(m) == {"role", "content"} and
                                            m["role"] in ROLES and isinstance(m["content"], str) for m in messages)
    turns = messages[1:] if ok and messages and messages[0]["role"] == "system" else messages
    if not ok or [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2) or len(turns) % 2:
        raise ValueError(f"--history {path} is not a chat history: {want}.")
    if system and messages[:1] != start:
        raise ValueError(f"--history {path} already starts the chat, with another system prompt or none: drop "
                         "--system to resume it, or give a new --history file.")
    return messages


def chat(session, history):
    """Talk until EOF or Ctrl-C: a terminal gets prompts and the reply as it streams; otherwise each
    stdin line is a user message and each reply is printed whole, then a blank line. The history
    file, if any, is rewritten (atomically) after every reply."""
    from src.checkpoint import atomic_write
    interactive = sys.stdin.isatty()

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()
    if interactive:
        print("generate.py: chat; an empty line is ignored, Ctrl-D or Ctrl-C ends it.", file=sys.stderr)
    try:
        while True:
            line = input("User: ") if interactive else sys.stdin.readline()
            if not line:
                if interactive:
                    continue
                break                   # EOF
            if not line.strip():
                continue
            if interactive:
                write("Assistant:")
                session.reply(line, write)
                write("\n\n")
            else:
                reply = session.reply(line)
                write(reply + "\n\n" if reply else "\n")    # the reply's lines, then one empty line
            if history is not None:
                text = json.dumps({"messages": session.messages}, ensure_ascii=False, indent=1) + "\n"
                atomic_write(history, lambda f: f.write(text.encode("utf-8")))
    except (EOFError, KeyboardInterrupt):   # the chat ends; the history holds every finished turn
        if interactive:
            write("\n")


if __name__ == "__main__":
    main()
