"""Single-turn SFT data: {prompt, response} per jsonl line through a template."""
import numpy as np

from .common import EOD, DataError
from .text import iter_jsonl

SFT_TEMPLATE = "User: {prompt}\n\nAssistant: {response}"


def sft_parts(template):
    """Split a template into the prompt part and the response part. Whitespace just before
    {response} goes with the response, so ' Hello' stays one token, as at generation time
    when the prompt ends with 'Assistant:'."""
    head, sep, tail = template.partition("{response}")
    if not sep or head.count("{prompt}") != 1 or "{prompt}" in tail or "{response}" in tail:
        raise DataError("the SFT template must contain {prompt} once, followed by {response} once.")
    prompt = head.rstrip()
    return prompt, head[len(prompt):] + "{response}" + tail


def read_sft(path, tokenizer, prompt_field, response_field, template):
    """Per document: ids (prompt part, response part, EOD) and mask (1 on response and EOD)."""
    prompt_part, response_part = sft_parts(template)
    docs, masks = [], []
    for n, (prompt, response), _ in iter_jsonl(path, (prompt_field, response_field), ("--prompt_field", "--response_field")):
        if not response.strip():
            raise DataError(f'{path} line {n} has an empty "{response_field}": nothing to learn.')
        p = tokenizer.encode(prompt_part.replace("{prompt}", prompt))
        r = tokenizer.encode(response_part.replace("{response}", response)) + [EOD]
        docs.append(np.array(p + r, np.int32))
        masks.append(np.array([0] * len(p) + [1] * len(r), np.uint8))
    return docs, masks


