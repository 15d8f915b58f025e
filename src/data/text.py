"""jsonl files: one JSON object per line, a field read from each."""
import json
import os

from .common import DataError


def iter_json_lines(path):
    """(line number, JSON value, bytes read so far) for each non-blank line of a jsonl file; a file
    without one is refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist.")
    done = found = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            done += len(line)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n} is not UTF-8 text (byte {e.start + 1} of the line).") from None
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as e:
                reason = getattr(e, "msg", None) or "nested too deeply"
                raise DataError(f"{path} line {n} is not valid JSON ({reason}).") from None
            found += 1
            yield n, record, done
    if not found:
        raise DataError(f"{path} contains no documents.")


def iter_jsonl(path, fields, flags=()):
    """(line number, values of `fields`, bytes read so far) for each non-blank line of a jsonl
    file. flags: the option that names each field, which a line without it points to."""
    path, hint = os.fspath(path), dict(zip(fields, flags))
    for n, record, done in iter_json_lines(path):
        if not isinstance(record, dict):
            raise DataError(f'{path} line {n} has no "{fields[0]}" field (it is a JSON {type(record).__name__}, '
                            "not an object).")
        values = []
        for field in fields:
            if field not in record:
                raise DataError(f'{path} line {n} has no "{field}" field'
                                + (f" (to read another field, give its name with {hint[field]})." if field in hint else "."))
            if not isinstance(record[field], str):
                raise DataError(f'{path} line {n}: "{field}" is not a string.')
            try:
                record[field].encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f'{path} line {n}: "{field}" holds an unpaired surrogate escape, '
                                "not Unicode text.") from None
            values.append(record[field])
        yield n, values, done
