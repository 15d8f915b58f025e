"""Print the first documents (conversations) of training data as the model sees them, the learnt
parts marked: what train.py with the same --data_type and field options would train on (each document
whole, before windows or a cut to --ctx_len).

    python scripts/show_data.py data/chat.jsonl --data_type chat [--n 3] [--json]

The learnt tokens are shown green on a terminal, between ⟦ and ⟧ otherwise; <0> is the end-of-document
id. --json prints one line per document instead: {"tokens": [...], "mask": [...]}, the World tokenizer
ids from the document's first token to the 0 that ends it, mask[i] = 1 when tokens[i] is learnt as the
prediction after tokens[:i] (mask[0] is 0: nothing comes before it)."""
import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.cli import ArgumentParser  # noqa: E402
from src.data import DATA_TYPES, DataError, add_data_options, data_options, documents  # noqa: E402
from src.tokenizer import world_tokenizer  # noqa: E402


def marked(tokenizer, ids, mask, colour):
    """The document's text with each run of learnt tokens marked (runs decoded whole, so a
    character split across tokens inside a run stays whole)."""
    on, off = ("\033[32m", "\033[0m") if colour else ("⟦", "⟧")
    out = []
    for learnt, run in itertools.groupby(zip(ids, mask), key=lambda t: bool(t[1])):
        raw = b"".join(b"<0>" if i == 0 else tokenizer.decode_bytes([i]) for i, _ in run)
        text = raw.decode("utf-8", errors="replace")
        out.append(on + text + off if learnt else text)
    return "".join(out)


def main(argv=None):
    p = ArgumentParser("show_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="what train.py's --data_file takes")
    p.add_argument("--data_type", default="binidx", help=" | ".join(DATA_TYPES) + " (default: binidx)")
    p.add_argument("--n", type=int, default=3, help="how many documents (0: all; default 3)")
    p.add_argument("--json", action="store_true", help="one JSON line per document: its tokens and loss mask")
    p.add_argument("--vocab", default=None, help="World vocabulary file (default: the one in the rwkv package)")
    add_data_options(p.add_argument)
    args = p.parse_args(argv)
    if args.n < 0:
        sys.exit(f"show_data.py: --n {args.n} is negative: give a count, or 0 for all.")
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        tokenizer = world_tokenizer(args.vocab)
        docs = documents(args.data, args.data_type, tokenizer, **data_options(args))
        for k, (where, ids, mask) in enumerate(itertools.islice(docs, args.n or None)):
            ids, mask = [int(i) for i in ids], [int(m) for m in mask]
            if args.json:
                print(json.dumps({"tokens": ids, "mask": [0] + mask[1:]}), flush=True)
            else:
                learnt = sum(mask[1:])
                print(f"── {where}: {len(ids)} tokens, {learnt} learnt ──")
                print(marked(tokenizer, ids, [0] + mask[1:], colour), flush=True)
    except DataError as e:
        sys.exit(f"show_data.py: {e}")
    except BrokenPipeError:     # `| head`: the reader has seen enough
        sys.stderr.close()


if __name__ == "__main__":
    main()
