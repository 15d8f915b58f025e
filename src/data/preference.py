"""Preference pairs (--data_type preference): records {"prompt", "chosen", "rejected"}, as strings (a
one-turn chat) or in TRL's conversational form (`prompt` a list of {"role", "content"} messages ending
with a user turn, `chosen` and `rejected` lists holding the assistant reply), from the files chat data
reads (.jsonl, .json, .parquet, save_to_disk directories). Each pair renders in RWKV's chat format as
chat data does (src/data/chat.py), once with each reply; the mask marks the learnt tokens of the final
reply (its leading space to its closing `\\n\\n`, not the EOD, which is left out)."""
import numpy as np
import torch

from ..chat_template import render
from .chat import ChatFormat, conversation, data_files, encode, records
from .common import DataError
from .samples import PaddedDataset

FIELDS = ("prompt", "chosen", "rejected")


def pair_messages(record, where, fmt=ChatFormat()):
    """(prompt + chosen, prompt + rejected) as message lists, checked: one sentence naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object holding a preference pair.")
    for name in FIELDS:
        if record.get(name) is None:
            raise DataError(f'{where} has no "{name}" field: a preference record holds "prompt", "chosen" and '
                            '"rejected", as strings or TRL\'s conversational lists.')
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    replies = []
    for name in FIELDS[1:]:
        reply = record[name]
        if isinstance(reply, str):
            reply = [{"role": "assistant", "content": reply}]
        if not (isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict)
                and reply[0].get("role") == "assistant"):
            raise DataError(f'{where}: "{name}" is neither a string nor a list holding one assistant message '
                            '({"role": "assistant", "content": ...}).')
        replies.append(reply)
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) \
            or prompt[-1].get("role") not in ("user", "human"):
        raise DataError(f'{where}: "prompt" is neither a string nor a list of messages ending with a user turn.')
    # checked as chat data checks a conversation: TRL's messages ({"role", "content"}), --chat_roles' names
    chat = ChatFormat(roles=fmt.roles)
    pair = [conversation({"messages": prompt + reply}, f'{where} ("prompt" + "{name}")', chat)
            for name, reply in zip(FIELDS[1:], replies)]
    if render(pair[0])[0] == render(pair[1])[0]:
        raise DataError(f'{where}: "chosen" and "rejected" are the same reply (after the chat template\'s cleaning): '
                        "a pair must prefer one reply to another.")
    return pair


def read_pairs(data_file, tokenizer, fmt=ChatFormat()):
    """[(where, chosen ids, chosen mask, rejected ids, rejected mask)] of every record, all read and
    checked before any is used."""
    pairs = []
    for path in data_files(data_file):
        found = False
        for where, record in records(path, fmt, pick=lambda p, names: table_columns(p, names)):
            chosen, rejected = pair_messages(record, where, fmt)
            found = True
            pairs.append((where, *learnt_reply(chosen, tokenizer), *learnt_reply(rejected, tokenizer)))
        if not found:
            raise DataError(f"{path} contains no preference pairs.")
    return pairs


def learnt_reply(messages, tokenizer):
    """(ids, mask) of a conversation whose last reply alone is learnt, without the EOD."""
    ids, mask, _ = encode(messages, tokenizer, "last")
    return ids[:-1], mask[:-1]


def table_columns(path, names):
    missing = [f for f in FIELDS if f not in names]
    if missing:
        raise DataError(f'{path} has no column "{missing[0]}" (its columns: {", ".join(sorted(names))}): a preference '
                        'table holds "prompt", "chosen" and "rejected".')
    return list(FIELDS)


class PreferenceDataset(PaddedDataset):
    """One pair per item: (inputs, targets, mask), each [2, ctx_len], row 0 the chosen sequence, row 1
    the rejected one, each padded with EOD (masked) or cut at ctx_len + 1 tokens from the reply's end."""

    def __init__(self, pairs, ctx_len, seed=0, summary=""):
        super().__init__([p[1] for p in pairs], [p[2] for p in pairs], ctx_len, seed, summary)
        self.rejected, self.rejected_masks = [p[3] for p in pairs], [p[4] for p in pairs]

    def sample(self, i):
        d = self.document(i)
        rows = (self.padded(self.docs[d], self.masks[d]), self.padded(self.rejected[d], self.rejected_masks[d]))
        return tuple(torch.stack(t) for t in zip(*rows))


def preference_dataset(pairs, ctx_len, seed, summary):
    """The dataset of these pairs; a prompt too long to leave one reply token within ctx_len is one
    sentence naming its record; the pairs cut at ctx_len + 1 tokens are counted in the summary."""
    for where, _, mask_c, _, mask_r in pairs:
        for mask in (mask_c, mask_r):
            if not mask[1:ctx_len + 1].any():   # the first id is never a target
                raise DataError(f"{where}: the prompt alone takes {int(np.argmax(mask))} tokens, which leaves no reply "
                                f"token within ctx_len {ctx_len}: raise --ctx_len or shorten the prompt.")
    cut = sum(len(c) > ctx_len + 1 or len(r) > ctx_len + 1 for _, c, _, r, _ in pairs)
    if cut:
        summary += (f"; {cut:,} pairs longer than ctx_len + 1 = {ctx_len + 1} tokens, their replies cut at the end "
                    "(a larger --ctx_len, with --chunk_ctx to keep memory flat, trains them whole)")
    return PreferenceDataset(pairs, ctx_len, seed, summary)
