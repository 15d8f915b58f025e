"""jsonl -> Megatron binidx (OUTPUT.bin + OUTPUT.idx) with the RWKV World tokenizer, one
document per line, each followed by the end-of-document id 0 unless --no-eod.

    python scripts/make_binidx.py data/train.jsonl data/train [--text-field text] [--overwrite]

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
from src.data import EOD, BinIdxWriter, DataError, binidx_prefix, iter_jsonl  # noqa: E402
from src.tokenizer import world_tokenizer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="jsonl file, one JSON object per line, e.g. {\"text\": \"...\"}")
    p.add_argument("output", help="output prefix: writes OUTPUT.bin and OUTPUT.idx (a .bin or .idx ending is dropped)")
    p.add_argument("--text-field", default="text", help="the field holding each document's text (default: text)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document id 0 to each document")
    p.add_argument("--vocab", default=None, help="World vocabulary file (default: the one in the rwkv package)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT.bin / OUTPUT.idx")
    args = p.parse_args(argv)
    if os.path.isdir(args.input):
        sys.exit(f"make_binidx.py: {args.input} is a directory: give one .jsonl file (concatenate several first).")
    if not os.path.isfile(args.input):
        sys.exit(f"make_binidx.py: {args.input} does not exist or is not a file.")
    prefix = binidx_prefix(args.output)
    existing = [prefix + ext for ext in (".bin", ".idx") if os.path.exists(prefix + ext)]
    if existing and not args.overwrite:
        sys.exit(f"make_binidx.py: {existing[0]} already exists: choose another output, or pass --overwrite to replace it.")
    for ext in (".bin", ".idx"):
        clean_stale_temporaries(prefix + ext, say=lambda m: print(m, file=sys.stderr))

    tokenizer = world_tokenizer(args.vocab)
    eod = [] if args.no_eod else [EOD]
    total = os.path.getsize(args.input) if os.path.isfile(args.input) else 0
    docs = tokens = 0
    start = shown = time.time()
    try:
        # uint16 holds every World id (1..65529); the writer refuses anything that does not fit
        with BinIdxWriter(args.output, np.uint16) as writer:
            for _, (text,), done in iter_jsonl(args.input, (args.text_field,)):
                ids = tokenizer.encode(text) + eod
                writer.add(ids)
                docs, tokens = docs + 1, tokens + len(ids)
                if time.time() - shown > 2 or done == total:
                    shown = time.time()
                    print(f"\r{done / max(total, 1):6.1%}  {docs:,} documents  {tokens:,} tokens  "
                          f"{tokens / max(shown - start, 1e-9) / 1e6:.2f} M tokens/s", end="", file=sys.stderr)
    except DataError as e:
        sys.exit(f"\n{e}")
    print(f"\nwrote {writer.prefix}.bin and {writer.prefix}.idx: {docs:,} documents, {tokens:,} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
