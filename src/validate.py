"""Checking values read from files (adapter metadata, run.json) by type and shape before they are
used: each check either passes or raises the caller's error class with one sentence that names
the file and the field. A schema is {field: (required, what it must be, test)}; the test gets the
value and returns True when it fits."""
import math

import torch


def show(value, limit=40):
    """A value as a sentence shows it: its kind, and a short repr for the simple ones."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, dict):
        return "a dict" if value else "an empty dict"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__}" if value else f"an empty {type(value).__name__}"
    if isinstance(value, str):
        text = repr(value)
        return "the string " + (text if len(text) <= limit else text[:limit - 4] + "...'")
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
        return text if len(text) <= limit else text[:limit - 3] + "..."
    return f"a {type(value).__name__}"


def is_int(v, least=None):
    return isinstance(v, int) and not isinstance(v, bool) and (least is None or v >= least)


def is_number(v, positive=False):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (not positive or v > 0))


def is_str_list(v, allowed=None, unique=False):
    return (isinstance(v, list) and all(isinstance(x, str) and (allowed is None or x in allowed) for x in v)
            and (not unique or len(set(v)) == len(v)))


def check_fields(record, schema, error, where, damaged="the file is damaged"):
    """record must be a dict holding every required field of schema and no other, each passing
    its test. where: how the sentence starts ("x.pth has adapter metadata"). Returns record."""
    if not isinstance(record, dict):
        raise error(f"{where} that is {show(record)}, not a dict of fields: {damaged}.")
    bad_keys = [k for k in record if not isinstance(k, str)]
    if bad_keys:
        raise error(f"{where} with a field named {show(bad_keys[0])}, not a string: {damaged}.")
    for name, (required, _, _) in schema.items():
        if required and name not in record:
            raise error(f"{where} without its {name} field: {damaged}.")
    extra = [k for k in record if k not in schema]
    if extra:
        raise error(f"{where} with an unknown field {extra[0]!r}: {damaged}.")
    for name, (_, wanted, test) in schema.items():
        if name in record and not test(record[name]):
            raise error(f"{where} with a field of the wrong type ({name} is {show(record[name])}, not {wanted}): "
                        f"{damaged}.")
    return record


def non_finite(tensor):
    """How many NaN/Inf values a floating-point tensor holds (0 for other dtypes)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())
