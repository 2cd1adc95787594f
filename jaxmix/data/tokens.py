"""Token streams: a split of a prepared corpus (`data.source = "arrayrecord:DIR"`, made
by `python -m jaxmix.data.prepare`) or of an in-memory corpus, read by token range.

A prepared split is a list of ArrayRecord shards. Each record holds the raw
little-endian token ids of one chunk of the split's token stream (its documents
concatenated, each followed by the tokenizer's end-of-text id when it has one); every
record has `record_tokens` tokens but the last of each shard. `*.docs.npy` beside each
shard holds its document lengths in tokens. `TokenSplit` keeps only the record and
document offsets in memory (8 bytes per record and per document) and reads the records
a token range overlaps, so the corpus itself is never loaded.

Both stream kinds give `n_tokens`, `doc_starts` (int64 [n_docs + 1], the last entry
n_tokens), `read(start, stop)` -> the tokens [start, stop), and `read_rows(starts_b,
width)` -> [b, width].
"""
import os

import numpy as np

from jaxmix.errors import ConfigError, first_line, read_json

MANIFEST = "manifest.json"
FORMAT = "jaxmix-tokens"
REDO = "delete it and its shard-*.json marker and rerun prepare"
PREPARE_HINT = ("make one with: python -m jaxmix.data.prepare --input 'GLOB' "
                "--tokenizer DIR --out DIR")


class MemoryStream:
    """A split held in memory: a flat token array and its documents' starts."""

    def __init__(self, tokens, doc_starts):
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, np.int64)
        self.n_tokens = len(tokens)

    def read(self, start, stop):
        return self.tokens[start:stop]

    def read_rows(self, starts_b, width):
        """[b, width] tokens from each start (one fancy index, no Python loop)."""
        return self.tokens[np.asarray(starts_b)[:, None] + np.arange(width)]


def read_manifest(directory, field="data.source"):
    """The manifest dict of a prepared corpus folder, with one-line errors."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ConfigError(f"{field}: {directory!r} is not a folder; {PREPARE_HINT}")
    if not os.path.isfile(path):
        raise ConfigError(f"{field}: {directory!r} has no {MANIFEST} (no prepared corpus, "
                          f"or its preparation did not finish); {PREPARE_HINT}")
    manifest = read_json(path, field, "prepare the corpus again")
    if manifest.get("format") != FORMAT or "splits" not in manifest:
        raise ConfigError(f"{field}: {path} is not a jaxmix token corpus manifest; "
                          f"{PREPARE_HINT}")
    return manifest


def _record_lengths(shard, record_tokens):
    n = int(shard["records"])
    lengths = np.full(n, record_tokens, np.int64)
    if n:
        lengths[-1] = int(shard["tokens"]) - record_tokens * (n - 1)
    return lengths


class TokenSplit:
    """One split ("train" or "val") of a prepared corpus, read from its shards."""

    def __init__(self, directory, manifest, split, field="data.source"):
        from grain.sources import ArrayRecordDataSource
        self.directory, self.split = directory, split
        info = manifest["splits"].get(split) or {"shards": []}
        self.shards = [s for s in info["shards"] if int(s["tokens"]) > 0]
        if not self.shards:
            raise ConfigError(f"{field}: the prepared corpus {directory!r} has no {split} "
                              f"shards; prepare it again with more input (or a larger "
                              f"--val-fraction for the validation split)")
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        record_tokens = int(manifest["record_tokens"])
        self.paths = [os.path.join(directory, s["file"]) for s in self.shards]
        for shard, path in zip(self.shards, self.paths, strict=True):
            self._check_shard(shard, path, field)
        lengths = np.concatenate([_record_lengths(s, record_tokens) for s in self.shards])
        self.record_starts = np.concatenate([[0], np.cumsum(lengths)])
        counts = [int(s["records"]) for s in self.shards]
        self.shard_record_starts = np.concatenate([[0], np.cumsum(counts)])
        docs = [self._doc_lengths(s, field) for s in self.shards]
        self.doc_starts = np.concatenate([[0], np.cumsum(np.concatenate(docs))])
        self.n_tokens = int(self.record_starts[-1])
        self.n_bytes = int(info.get("bytes", 0))
        if self.doc_starts[-1] != self.n_tokens:
            raise ConfigError(f"{field}: the document lengths of {directory!r} ({split}) "
                              f"do not add up to its tokens; prepare the corpus again")
        self.source = ArrayRecordDataSource(self.paths)
        # The first and last record of every shard decode (cheap; a damaged record
        # elsewhere is named when it is read).
        for k in range(len(self.shards)):
            self._records([int(self.shard_record_starts[k]),
                           int(self.shard_record_starts[k + 1]) - 1])

    def _check_shard(self, shard, path, field):
        if not os.path.isfile(path):
            raise ConfigError(f"{field}: shard {path} is missing; prepare the corpus "
                              f"again (rerunning prepare redoes only what is missing)")
        size = os.path.getsize(path)
        if "size" in shard and size != int(shard["size"]):
            raise ConfigError(f"{field}: shard {path} is damaged ({size:,} bytes, the "
                              f"manifest says {int(shard['size']):,}); {REDO}")
        from array_record.python.array_record_module import ArrayRecordReader
        try:
            reader = ArrayRecordReader(path)
            n_records = reader.num_records()
            reader.close()
        except Exception as e:  # whatever array_record raises for a damaged file
            raise ConfigError(f"{field}: shard {path} is damaged ({first_line(e)}); "
                              f"{REDO}") from None
        if n_records != int(shard["records"]):
            raise ConfigError(f"{field}: shard {path} holds {n_records} records, the "
                              f"manifest says {shard['records']}; {REDO}")

    def _doc_lengths(self, shard, field):
        path = os.path.join(self.directory, shard["docs"])
        try:
            lengths = np.load(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}: document index {path} is unreadable "
                              f"({first_line(e)}); prepare the corpus again") from None
        if lengths.ndim != 1 or int(lengths.sum()) != int(shard["tokens"]):
            raise ConfigError(f"{field}: document index {path} does not match its shard; "
                              f"prepare the corpus again")
        return lengths.astype(np.int64)

    def _shard_of(self, record):
        return self.paths[int(np.searchsorted(self.shard_record_starts, record, "right")) - 1]

    def _records(self, indices):
        indices = [int(i) for i in indices]
        try:
            raw = self.source.__getitems__(indices)
        except Exception as e:  # a damaged shard: name it, whatever array_record raised
            bad = self._shard_of(indices[0])
            for i in indices:
                try:
                    self.source[i]
                except Exception:
                    bad = self._shard_of(i)
                    break
            raise ConfigError(f"data.source: shard {bad} is damaged ({first_line(e)}); "
                              f"{REDO}") from None
        return [np.frombuffer(r, self.dtype) for r in raw]

    def _record_span(self, start, stop):
        """(first, last) record indices holding tokens [start, stop); arrays work too."""
        first = np.searchsorted(self.record_starts, start, "right") - 1
        last = np.searchsorted(self.record_starts, np.asarray(stop) - 1, "right") - 1
        return first, last

    def _cut(self, chunks, first, start, stop):
        joined = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        offset = start - int(self.record_starts[first])
        return joined[offset:offset + (stop - start)]

    def read(self, start, stop):
        """Tokens [start, stop) of the split's stream (native dtype)."""
        first, last = (int(i) for i in self._record_span(start, stop))
        return self._cut(self._records(range(first, last + 1)), first, start, stop)

    def read_rows(self, starts_b, width):
        """[b, width] tokens from each start: every record the rows need is read in one
        call (array_record fetches them in parallel)."""
        starts_b = np.asarray(starts_b, np.int64)
        first_b, last_b = self._record_span(starts_b, starts_b + width)
        needed = sorted({r for f, l in zip(first_b.tolist(), last_b.tolist(), strict=True)
                         for r in range(f, l + 1)})
        by_index = dict(zip(needed, self._records(needed), strict=True))
        return np.stack([
            self._cut([by_index[r] for r in range(f, l + 1)], f, s, s + width)
            for s, f, l in zip(starts_b.tolist(), first_b.tolist(), last_b.tolist(),
                               strict=True)])


def open_corpus(directory, field="data.source"):
    """(manifest, train TokenSplit, val TokenSplit) of a prepared corpus folder."""
    directory = os.path.abspath(os.path.expanduser(directory))
    manifest = read_manifest(directory, field)
    return (manifest, TokenSplit(directory, manifest, "train", field),
            TokenSplit(directory, manifest, "val", field))
