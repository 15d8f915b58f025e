"""Multi-turn chat data: one conversation a record, in OpenAI `messages` ([{"role", "content"}]),
ShareGPT `conversations` ([{"from", "value"}]) or prompt/response (one turn), from .jsonl, .json (a
list), .parquet, or a directory (HF `datasets` save_to_disk, or parquet/jsonl/json shards); several
comma-separated. Rendered in RWKV's chat format (src/chat_template.py) and tokenized whole, as RWKV's
own SFT data is, since the World vocabulary has tokens that span a turn's end (`。\\n`); the loss mask
comes from the character offsets of the learnt replies, so a token straddling a reply's start is learnt."""
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..chat_template import clean_turn, render
from .common import EOD, DataError
from .text import iter_json_lines

LOSS_ON = ("assistant", "last", "all")
LOSS_WHAT = {"assistant": "every assistant reply", "last": "each conversation's last assistant reply",
             "all": "every token"}
ROLES = ("system", "user", "assistant")
# Role names known without --chat_roles: OpenAI's and ShareGPT's.
KNOWN_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


@dataclass(frozen=True)
class ChatFormat:
    """Where a record keeps its conversation and what its role names mean (train.py's options)."""
    chat_fields: tuple = ("messages", "conversations")   # --chat_field: the first one a record has is read
    turn_keys: tuple = (("role", "content"), ("from", "value"))  # --turn_keys: the first pair a turn has
    roles: dict = field(default_factory=lambda: dict(KNOWN_ROLES))  # name -> system | user | assistant
    prompt_field: str = "prompt"
    response_field: str = "response"
    loss_on: str = "assistant"

    @classmethod
    def from_options(cls, chat_field="messages,conversations", turn_keys="role:content,from:value", chat_roles="",
                     prompt_field="prompt", response_field="response", loss_on="assistant"):
        """From the option strings; a malformed one is one sentence naming its option."""
        if loss_on not in LOSS_ON:
            raise DataError(f"--loss_on must be one of {', '.join(LOSS_ON)}, not {loss_on!r}.")
        fields = tuple(f.strip() for f in chat_field.split(",") if f.strip())
        if not fields:
            raise DataError("--chat_field names no field: give the field that holds a conversation, e.g. messages.")
        pairs = [p.split(":") for p in turn_keys.split(",") if p.strip()]
        if not pairs or any(len(p) != 2 or not all(k.strip() for k in p) for p in pairs):
            raise DataError(f"--turn_keys {turn_keys!r} is not a comma-separated list of ROLE_KEY:CONTENT_KEY pairs, "
                            "e.g. role:content,from:value.")
        roles = dict(KNOWN_ROLES)
        for item in filter(str.strip, chat_roles.split(",")):
            name, _, role = (s.strip() for s in item.partition("="))
            if not name or role not in ROLES:
                raise DataError(f"--chat_roles {chat_roles!r}: {item.strip()!r} is not NAME=system, NAME=user or "
                                "NAME=assistant.")
            roles[name] = role
        return cls(fields, tuple((a.strip(), b.strip()) for a, b in pairs), roles, prompt_field, response_field,
                   loss_on)


def conversation(record, where, fmt):
    """A record as [{"role": system|user|assistant, "content": str}] (uncleaned), checked:
    one sentence naming `where` (file and record) for anything unusable."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object holding a conversation.")
    # (None is an absent field: a parquet or HF datasets row holds every column of its file)
    name = next((f for f in fmt.chat_fields if record.get(f) is not None), None)
    if name is None:
        if record.get(fmt.prompt_field) is not None and record.get(fmt.response_field) is not None:
            turns = [("user", record[fmt.prompt_field], f'"{fmt.prompt_field}"'),
                     ("assistant", record[fmt.response_field], f'"{fmt.response_field}"')]
        else:
            fields = " or ".join(f'"{f}"' for f in fmt.chat_fields)
            raise DataError(f'{where} has neither a {fields} list of turns nor "{fmt.prompt_field}" and '
                            f'"{fmt.response_field}" fields (other field names: --chat_field, --prompt_field, '
                            "--response_field).")
    else:
        if not isinstance(record[name], list) or not record[name]:
            raise DataError(f'{where}: "{name}" is not a non-empty list of turns.')
        turns = []
        for k, turn in enumerate(record[name], 1):
            keys = next((p for p in fmt.turn_keys if isinstance(turn, dict) and p[0] in turn and p[1] in turn), None)
            if keys is None:
                pairs = " or ".join(f'"{a}" and "{b}"' for a, b in fmt.turn_keys)
                raise DataError(f'{where}: turn {k} of "{name}" has no {pairs} (other keys: --turn_keys).')
            role = turn[keys[0]]
            if not isinstance(role, str) or role not in fmt.roles:
                raise DataError(f'{where}: turn {k} has the role {role!r}, which is not system, user or assistant: '
                                f"name its role with --chat_roles (e.g. --chat_roles {role}=user), or leave such turns out.")
            turns.append((fmt.roles[role], turn[keys[1]], f'turn {k} ("{keys[1]}")'))
    out = []
    for k, (role, content, what) in enumerate(turns):
        if not isinstance(content, str):
            raise DataError(f"{where}: {what} is not a string.")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: {what} holds an unpaired surrogate escape, not Unicode text.") from None
        if not clean_turn(content):
            raise DataError(f"{where}: {what} ({role}) is empty.")
        if role == "system" and k:
            raise DataError(f"{where}: turn {k + 1} is a system turn; a system turn may only come first.")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where} has no assistant turn: nothing to learn.")
    return out


def encode(messages, tokenizer, loss_on="assistant"):
    """(ids, mask, bounds) of one conversation: its whole text tokenized at once, then EOD.
    mask[j] = 1 when token j is learnt: it overlaps a learnt reply (from its leading space to its
    closing `\n\n`), or it is the EOD after a conversation that ends with a learnt reply; every
    token for `all`. bounds: for each turn, how many tokens lie wholly within the text up to its end."""
    text, spans = render(messages)
    ids = tokenizer.encode(text) + [EOD]
    sizes = np.array([len(tokenizer.token_bytes[i]) for i in ids])
    ends = np.cumsum(sizes)         # the byte offset where each token ends
    starts = ends - sizes
    # every `\n\n` in the text ends a turn: the template's cleaning leaves no blank line inside one
    turn_ends = [m.end() for m in re.finditer(b"\n\n", text.encode("utf-8"))]
    bounds = np.searchsorted(ends, turn_ends, side="right")
    if loss_on == "all":
        return np.array(ids, np.int32), np.ones(len(ids), np.uint8), bounds
    mask = np.zeros(len(ids), np.uint8)
    for a, b in spans[-1:] if loss_on == "last" else spans:
        a, b = len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))
        mask[(starts < b) & (ends > a)] = 1
    mask[-1] = messages[-1]["role"] == "assistant"     # the EOD after a learnt last reply
    return np.array(ids, np.int32), mask, bounds


def data_files(data_file):
    """The files a --data_file names: comma-separated paths, a directory's data files in name order."""
    files = []
    for path in (p.strip() for p in os.fspath(data_file).split(",")):
        if not path:
            continue
        if os.path.isdir(path):
            if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
                files.append(path)      # saved by HF datasets' save_to_disk
                continue
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                           if f.endswith((".jsonl", ".json", ".parquet")))
            if not found:
                raise DataError(f"{path} is a directory without .jsonl, .json or .parquet files, and was not saved "
                                "by HF datasets' save_to_disk.")
            files += found
        elif not os.path.isfile(path):
            raise DataError(f"{path} does not exist.")
        elif not path.endswith((".jsonl", ".json", ".parquet")):
            raise DataError(f"{path} is not a .jsonl, .json or .parquet file, nor a directory of them.")
        else:
            files.append(path)
    if not files:
        raise DataError(f"--data_file {data_file!r} names no file.")
    return files


def records(path, fmt, pick=None):
    """(where, record) for each record of one file or save_to_disk directory. pick(path, names): the
    columns of a table to read (by default those holding conversations, see columns)."""
    pick = pick or (lambda where, names: columns(where, names, fmt))
    if os.path.isdir(path):
        yield from saved_dataset(path, pick)
    elif path.endswith(".jsonl"):
        for n, record, _ in iter_json_lines(path):
            yield f"{path} line {n}", record
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path} is not valid JSON ({getattr(e, 'msg', None) or e}).") from None
        if not isinstance(data, list):
            raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of conversations "
                            "(one conversation a line: give a .jsonl file).")
        for n, record in enumerate(data, 1):
            yield f"{path} record {n}", record
    else:
        yield from parquet_rows(path, pick)


def columns(path, names, fmt):
    """The columns of a table (parquet, HF datasets) that hold conversations; none is one sentence."""
    pair = [fmt.prompt_field, fmt.response_field]
    found = [f for f in fmt.chat_fields if f in names] + (pair if set(pair) <= set(names) else [])
    if not found:
        wanted = ", ".join(f'"{f}"' for f in fmt.chat_fields)
        raise DataError(f'{path} has no column {wanted}, nor "{fmt.prompt_field}" and "{fmt.response_field}" '
                        f"(its columns: {', '.join(sorted(names))}; other names: --chat_field, --prompt_field, "
                        "--response_field).")
    return found


def parquet_rows(path, pick):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:      # pyarrow raises several kinds for a file that is not parquet
        raise DataError(f"{path} is not a readable parquet file ({e}).") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=pick(path, pf.schema_arrow.names)):
        for record in batch.to_pylist():
            n += 1
            yield f"{path} row {n}", record


def saved_dataset(path, pick):
    """Rows of a directory written by HF datasets' save_to_disk (local files only: no hub)."""
    import datasets
    try:
        data = datasets.load_from_disk(path)
    except Exception as e:      # datasets' own errors for a damaged or foreign directory
        raise DataError(f"{path} could not be read as an HF datasets directory ({e}).") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data and len(data) != 1:
            raise DataError(f"{path} holds the splits {', '.join(data)}: name one, e.g. {os.path.join(path, next(iter(data)))}.")
        data = data["train"] if "train" in data else next(iter(data.values()))
    data = data.select_columns(pick(path, data.column_names))
    for n, record in enumerate(data, 1):
        yield f"{path} row {n}", record


def iter_chat(data_file, tokenizer, fmt):
    """(where, messages, ids, mask, bounds) for each conversation of the files, read as needed."""
    for path in data_files(data_file):
        found = False
        for where, record in records(path, fmt):
            messages = conversation(record, where, fmt)
            found = True
            yield (where, messages, *encode(messages, tokenizer, fmt.loss_on))
        if not found:
            raise DataError(f"{path} contains no conversations.")


def read_chat(data_file, tokenizer, fmt):
    """(docs, masks, bounds, turns, changed): per conversation its ids, mask and turn bounds (see
    encode), and how many turns there are and how many the template's cleaning changed."""
    docs, masks, bounds, turns, changed = [], [], [], 0, 0
    for _, messages, ids, mask, bound in iter_chat(data_file, tokenizer, fmt):
        turns += len(messages)
        changed += sum(clean_turn(m["content"]) != m["content"] for m in messages)
        docs.append(ids)
        masks.append(mask)
        bounds.append(bound)
    return docs, masks, bounds, turns, changed


def cut_at_turns(docs, masks, bounds, limit):
    """Each conversation longer than `limit` tokens cut to its longest prefix that ends at a turn's
    end (its first `limit` tokens when even the first turn is longer); and how many were cut."""
    cut = 0
    for i, (doc, b) in enumerate(zip(docs, bounds)):
        if len(doc) > limit:
            fits = b[b <= limit]
            n = int(fits[-1]) if len(fits) and fits[-1] > 1 else limit
            docs[i], masks[i], cut = doc[:n], masks[i][:n], cut + 1
    return docs, masks, cut
