"""The documents of `python -m jaxmix.data.prepare`'s input files.

A plain text file is one document; each line of a .jsonl / .jsonl.gz file and each row
of a .parquet file (read a batch of rows at a time) is one, its text field. Every
problem with an input is one ConfigError line naming the file (and the line).
"""
import glob
import gzip
import json
import os

from jaxmix.errors import ConfigError, first_line


def file_kind(path):
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def _json_record(path, n, line):
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ConfigError(f"--input: line {n + 1} of {path} is not JSON ({first_line(e)}); "
                          f"fix the file (one JSON object per line)") from None
    if not isinstance(record, dict):
        raise ConfigError(f"--input: line {n + 1} of {path} is not a JSON object; fix the "
                          f"file (one JSON object per line)")
    return record


def _no_field(path, field, names, where=""):
    return ConfigError(f"--text-field: {path}{where} has no field {field!r} (it has "
                       f"{', '.join(map(repr, names)) or 'none'}); pass --text-field with "
                       f"the one that holds the text")


def _jsonl_lines(path):
    """(line number, bytes) of the non-blank lines of a .jsonl or .jsonl.gz file."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            for n, line in enumerate(f):
                if line.strip():
                    yield n, line
    except (OSError, EOFError) as e:
        raise ConfigError(f"--input: {path} is unreadable ({first_line(e)}); fix or "
                          f"remove it") from None


def check_field(path, field):
    """ConfigError unless a JSONL (first record) / Parquet (schema) file has `field`."""
    kind = file_kind(path)
    if kind == "jsonl":
        for n, line in _jsonl_lines(path):
            record = _json_record(path, n, line)
            if field not in record:
                raise _no_field(path, field, list(record), f" (line {n + 1})")
            break
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            schema = pq.read_schema(path)
        except Exception as e:  # pyarrow's ArrowInvalid, OSError
            raise ConfigError(f"--input: {path} is not a readable Parquet file "
                              f"({first_line(e)}); fix or remove it") from None
        if field not in schema.names:
            raise _no_field(path, field, schema.names)
        kind_of = schema.field(field).type
        is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
        if not (pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of)
                or is_view(kind_of)):
            raise ConfigError(f"--text-field: column {field!r} of {path} is {kind_of}, not "
                              f"text; pass --text-field with a string column")


def find_inputs(patterns, out):
    """(common root, sorted absolute paths) of the files the globs match (not in out)."""
    paths = set()
    for pattern in patterns:
        found = {os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern),
                                                       recursive=True) if os.path.isfile(p)}
        found = {p for p in found if os.path.commonpath([p, out]) != out}
        if not found:
            raise ConfigError(f"--input: {pattern!r} matches no files; pass a glob of text, "
                              f".jsonl or .parquet files in quotes, e.g. "
                              f"--input 'corpus/**/*.txt'")
        paths |= found
    paths = sorted(paths)
    return os.path.commonpath([os.path.dirname(p) for p in paths]), paths


def documents(root, rel, field, raw_bytes):
    """(key, text, utf-8 bytes) of each non-empty document of one input file, in order;
    a text file's text is its bytes when `raw_bytes`."""
    path = os.path.join(root, rel)
    kind = file_kind(rel)
    if kind == "text":
        with open(path, "rb") as f:
            data = f.read()
        if data:
            text = data if raw_bytes else data.decode("utf-8", "replace")
            yield rel, text, _n_bytes(text)
    elif kind == "jsonl":
        for n, line in _jsonl_lines(path):
            record = _json_record(path, n, line)
            if field not in record:
                raise _no_field(path, field, list(record), f" (line {n + 1})")
            text = record[field]
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"--text-field: {field!r} on line {n + 1} of {path} is "
                                  f"not a string; pass --text-field with the text field")
            if text:
                yield f"{rel}:{n}", text, _n_bytes(text)
    else:
        import pyarrow.parquet as pq
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield f"{rel}:{row}", text, _n_bytes(text)
                row += 1


def _n_bytes(text):
    if isinstance(text, bytes) or text.isascii():
        return len(text)
    return len(text.encode("utf-8"))
