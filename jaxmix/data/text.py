"""Text sources as token streams: `stdlib` and `text:GLOB` read into memory and
tokenized with `data.tokenizer` ("bytes", or a Hugging Face tokenizer folder / file),
or `arrayrecord:DIR`, a corpus made by `python -m jaxmix.data.prepare`, streamed from
its shards with the tokenizer it was prepared with (kept in DIR/tokenizer).
"""
import dataclasses
import os

import numpy as np

from jaxmix.data.corpus import load_corpus
from jaxmix.data.tokenizer import load_tokenizer, token_dtype
from jaxmix.data.tokens import MemoryStream, open_corpus
from jaxmix.errors import ConfigError

ARRAYRECORD = "arrayrecord:"


@dataclasses.dataclass
class TextData:
    """The two token streams of a text source and how they were made."""
    source: str
    train: object          # a stream: n_tokens, doc_starts, read(start, stop), read_rows
    val: object
    tokenizer: object      # jaxmix.data.tokenizer.Tokenizer
    summary: str           # files / shards, documents and tokens, for the log
    bytes_per_token: float  # of the validation split (bits per byte from nats per token)
    corpus: object = None  # the in-memory Corpus (stdlib / text:GLOB)


def is_arrayrecord(source):
    return isinstance(source, str) and source.startswith(ARRAYRECORD)


def _split_counts(stream):
    return f"{len(stream.doc_starts) - 1:,} documents {stream.n_tokens:,} tokens"


def _prepared(config):
    directory = config.data.source[len(ARRAYRECORD):]
    if not directory:
        raise ConfigError("data.source: 'arrayrecord:' names no folder; use "
                          "'arrayrecord:DIR' with DIR made by python -m jaxmix.data.prepare")
    manifest, train, val = open_corpus(directory)
    info = manifest["tokenizer"]
    if info.get("kind") == "bytes":
        tokenizer = load_tokenizer("bytes")
    else:
        tokenizer = load_tokenizer(os.path.join(train.directory, "tokenizer"),
                                   field="data.source")
    spec = config.data.get("tokenizer", "bytes")
    if spec != "bytes" and load_tokenizer(spec).sha256 != info.get("sha256"):
        raise ConfigError(f"data.tokenizer: {spec!r} is not the tokenizer {directory!r} "
                          f"was prepared with; leave data.tokenizer unset (the corpus "
                          f"brings its own) or prepare the corpus with this tokenizer")
    summary = (f"{len(train.shards)}+{len(val.shards)} shards; train "
               f"{_split_counts(train)} / val {_split_counts(val)}")
    return TextData(config.data.source, train, val, tokenizer, summary,
                    val.n_bytes / max(val.n_tokens, 1))


def _tokenized(stream_u8, doc_starts, tokenizer):
    """A MemoryStream of the documents of a byte stream, each tokenized (+ eos)."""
    texts = [stream_u8[a:b].tobytes().decode("utf-8", errors="replace")
             for a, b in zip(doc_starts[:-1], doc_starts[1:], strict=True)]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    docs = [np.concatenate([ids, eos]) for ids in tokenizer.encode_batch(texts)]
    lengths = [len(d) for d in docs]
    tokens = np.concatenate(docs).astype(token_dtype(tokenizer.vocab_size))
    return MemoryStream(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def _in_memory(config):
    tokenizer = load_tokenizer(config.data.get("tokenizer", "bytes"))
    c = load_corpus(config.data.source, float(config.data.val_fraction))
    if tokenizer.kind == "bytes":
        train = MemoryStream(c.train_u8, c.train_doc_starts)
        val = MemoryStream(c.val_u8, c.val_doc_starts)
    else:
        train = _tokenized(c.train_u8, c.train_doc_starts, tokenizer)
        val = _tokenized(c.val_u8, c.val_doc_starts, tokenizer)
    n_files = len(set(c.train_files) | set(c.val_files))
    summary = (f"{n_files} files ({c.root}); train {len(c.train_files)} files "
               f"{len(c.train_u8):,} bytes {train.n_tokens:,} tokens / val "
               f"{len(c.val_files)} files {len(c.val_u8):,} bytes {val.n_tokens:,} tokens"
               + (f"; {c.note}" if c.note else ""))
    return TextData(config.data.source, train, val, tokenizer, summary,
                    len(c.val_u8) / max(val.n_tokens, 1), corpus=c)


def load_text(config):
    """The TextData of config.data (source, tokenizer, val_fraction)."""
    return _prepared(config) if is_arrayrecord(config.data.source) else _in_memory(config)
