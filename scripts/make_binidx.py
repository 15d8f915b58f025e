"""jsonl -> Megatron binidx (OUTPUT.bin + OUTPUT.idx) with the RWKV World tokenizer, one
document per line, each followed by the end-of-document id 0 unless --no-eod.

    python scripts/make_binidx.py data/train.jsonl data/train [--text-field text] [--overwrite]
    python scripts/make_binidx.py data/chat.jsonl data/chat --chat [--loss_on assistant]

--chat reads conversations as train.py's --data_type chat does (any file or directory it takes, the same
options) and writes OUTPUT.mask beside the pair: the loss mask that --data_type binidx then uses, so
training on OUTPUT samples exactly what --data_type chat does on the input.

Both files are written under temporary names and renamed at the end, so an interrupted run
leaves no half-written output (and the next run for that output removes what a killed one left).
An existing OUTPUT.bin / OUTPUT.idx is replaced only with --overwrite. Use the result with
--data_type binidx --data_file data/train."""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.checkpoint import clean_stale_temporaries  # noqa: E402
from src.data import EOD, BinIdxWriter, DataError, add_data_options, binidx_prefix, data_options, iter_chat, iter_jsonl  # noqa: E402
from src.tokenizer import world_tokenizer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="jsonl file, one JSON object per line, e.g. {\"text\": \"...\"}")
    p.add_argument("output", help="output prefix: writes OUTPUT.bin and OUTPUT.idx (a .bin or .idx ending is dropped)")
    p.add_argument("--text-field", default="text", help="the field holding each document's text (default: text)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document id 0 to each document")
    p.add_argument("--vocab", default=None, help="World vocabulary file (default: the one in the rwkv package)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT.bin / OUTPUT.idx (/ OUTPUT.mask)")
    p.add_argument("--chat", action="store_true", help="conversations, as train.py's --data_type chat reads them, "
                                                       "with their loss mask in OUTPUT.mask")
    add_data_options(p.add_argument, kinds=("chat",))    # --prompt_field, --response_field, --loss_on, ...
    args = p.parse_args(argv)
    if not args.chat and os.path.isdir(args.input):
        sys.exit(f"make_binidx.py: {args.input} is a directory: give one .jsonl file (concatenate several first).")
    if not args.chat and not os.path.isfile(args.input):
        sys.exit(f"make_binidx.py: {args.input} does not exist or is not a file.")
    if args.chat and args.no_eod:
        sys.exit("make_binidx.py: --chat ends each conversation with the id 0 (learnt after a final reply): drop --no-eod.")
    prefix = binidx_prefix(args.output)
    existing = [prefix + ext for ext in (".bin", ".idx", ".mask") if os.path.exists(prefix + ext)]
    if existing and not args.overwrite:
        sys.exit(f"make_binidx.py: {existing[0]} already exists: choose another output, or pass --overwrite to replace it.")
    for ext in (".bin", ".idx", ".mask"):
        clean_stale_temporaries(prefix + ext, say=lambda m: print(m, file=sys.stderr))

    tokenizer = world_tokenizer(args.vocab)
    eod = [] if args.no_eod else [EOD]
    total = os.path.getsize(args.input) if os.path.isfile(args.input) else 0
    docs = tokens = 0
    start = shown = time.time()
    try:
        if args.chat:   # the options' mistakes before any file is made
            chat = data_options(args)["chat"]
            items = ((None, ids, mask) for _, _, ids, mask, _ in iter_chat(args.input, tokenizer, chat))
        else:
            items = ((done, tokenizer.encode(text) + eod, None)
                     for _, (text,), done in iter_jsonl(args.input, (args.text_field,), ("--text-field",)))
        # uint16 holds every World id (1..65529); the writer refuses anything that does not fit
        with BinIdxWriter(args.output, np.uint16, masked=args.chat) as writer:
            for done, ids, mask in items:
                writer.add(ids, mask)
                docs, tokens = docs + 1, tokens + len(ids)
                if time.time() - shown > 2 or done == total:
                    shown = time.time()
                    at = f"{done / max(total, 1):6.1%}  " if done is not None else ""
                    print(f"\r{at}{docs:,} documents  {tokens:,} tokens  "
                          f"{tokens / max(shown - start, 1e-9) / 1e6:.2f} M tokens/s", end="", file=sys.stderr)
    except DataError as e:
        sys.exit(f"\n{e}")
    made = f"{writer.prefix}.bin, {writer.prefix}.idx and {writer.prefix}.mask" if args.chat else \
        f"{writer.prefix}.bin and {writer.prefix}.idx"
    print(f"\nwrote {made}: {docs:,} documents, {tokens:,} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
