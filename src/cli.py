"""The command lines' argument parser (train.py, merge.py, generate.py, export.py): a mistake on
the command line is one short line, the script's name first, with no usage dump and no traceback;
a misspelled option gets the nearest real one ("did you mean"). --help is argparse's."""
import argparse
import difflib
import re
import sys

# argparse's messages (Python 3.10-3.13) -> one line that says what was wrong and what to give.
REWRITES = [
    (r"argument (\S+): invalid int value: (.*)", r"\1 \2 is not a whole number"),
    (r"argument (\S+): invalid float value: (.*)", r"\1 \2 is not a number"),
    (r"argument (\S+): invalid choice: (\S+) \(choose from (.*)\)", r"\1 \2 is not a choice: choose from \3"),
    (r"argument (\S+): expected one argument", r"\1 needs a value"),
    (r"argument (\S+): not allowed with argument (\S+)", r"\1 and \2 exclude each other: give one of them"),
    (r"argument (\S+): (.*)", r"\1: \2"),
    (r"ambiguous option: (\S+) could match (.*)", r"\1 could be \2: give the whole name"),
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are SystemExit("PROG: one line (PROG --help lists all)")."""

    def __init__(self, prog, **kwargs):
        super().__init__(prog=prog, **kwargs)     # the name in messages, also when main() runs in a test

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        options = [o for o in self._option_string_actions if o.startswith("--")]
        for a in args[:args.index("--") if "--" in args else None]:
            flag = a.split("=", 1)[0]
            if flag.startswith("--") and not any(o.startswith(flag) for o in options):   # (prefixes: argparse's abbreviations)
                self.error(self.unknown([flag]))     # before "X is required": the typo is the cause
        args, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(self.unknown(extra))
        return args

    def unknown(self, extra):
        flag = next((a.split("=", 1)[0] for a in extra if a.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {extra[0]!r}: every input is given by an option"
        options = [o for o in self._option_string_actions if o.startswith("--")]
        near = difflib.get_close_matches(flag, options, n=1)
        return f"unknown option {flag}" + (f"; did you mean {near[0]}?" if near else "")

    def error(self, message):
        for pattern, replacement in REWRITES:
            if re.fullmatch(pattern, message, flags=re.S):
                message = re.sub(pattern, replacement, message, flags=re.S)
                break
        if message.startswith("the following arguments are required: "):
            names = message.split(": ", 1)[1].split(", ")
            message = " and ".join(names) + (" is" if len(names) == 1 else " are") + " required"
        if message.startswith("one of the arguments "):
            message = "give " + " or ".join(message.split()[4:-2])
        message = " ".join(message.split())
        raise SystemExit(f"{self.prog}: {message} ({self.prog} --help lists all)")


def sentence(error, adapter_flag="--adapter", model_flag="--model"):
    """An error's one sentence; an adapter file given as the model is told this script's flags
    (adapter_flag None: a script that takes no adapter)."""
    from .config import AdapterFileError
    return error.advice(adapter_flag, model_flag) if isinstance(error, AdapterFileError) else str(error)
