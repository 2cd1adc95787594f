"""Byte corpora: find the files, split them by file, read them into memory.

A corpus is two flat uint8 token streams (train and validation), each the
concatenation of its files separated by `SEPARATOR`. The split is by file and
depends only on each file's path relative to the corpus root, so it is stable
across machines, runs and process counts.
"""
import dataclasses
import glob
import logging
import os
import sysconfig
import zlib

import numpy as np

from jaxmix.errors import ConfigError, reason

SEPARATOR = b"\n\n"
# Directories never read from the standard library: installed packages and
# the test suites (large, repetitive and full of deliberately odd code).
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests",
                              "idle_test", "__pycache__"})
SINGLE_FILE_TRAIN_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The in-memory token streams of one corpus and where they came from."""
    source: str
    root: str
    train_files: tuple   # paths relative to root, sorted
    val_files: tuple
    train_u8: np.ndarray  # [n_train_bytes] uint8
    val_u8: np.ndarray    # [n_val_bytes] uint8
    note: str = ""        # e.g. how a single file was split
    # Document (file) starts in each stream, int64 [n_docs + 1] ending at its length;
    # the separator after a file belongs to that file's document.
    train_doc_starts: np.ndarray = None
    val_doc_starts: np.ndarray = None


def stdlib_files():
    """(root, sorted absolute paths) of the running Python's stdlib `.py` files."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        # _sysconfigdata*.py are generated build settings (compiler flags, paths), not code.
        paths.extend(os.path.join(dirpath, f) for f in filenames
                     if f.endswith(".py") and not f.startswith("_sysconfigdata"))
    return root, sorted(paths)


def text_files(pattern, source):
    """(root, sorted absolute paths) of the regular files matching `pattern`."""
    expanded = os.path.expanduser(pattern)
    paths = sorted(os.path.abspath(p) for p in glob.glob(expanded, recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise ConfigError(f"data.source: {source!r} matched no files; set "
                          f"data.source to 'text:GLOB' with a glob that matches your "
                          f"text files (e.g. 'text:~/notes/**/*.md'), or 'stdlib'")
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return root, paths


def find_files(source):
    """Resolve a `data.source` string to (root, sorted absolute file paths)."""
    if source == "stdlib":
        return stdlib_files()
    if isinstance(source, str) and source.startswith("text:"):
        pattern = source[len("text:"):]
        if not pattern:
            raise ConfigError("data.source: 'text:' has an empty glob; use "
                              "'text:GLOB', e.g. 'text:~/corpus/**/*.txt'")
        return text_files(pattern, source)
    raise ConfigError(f"data.source: unknown source {source!r}; use 'stdlib' or "
                      f"'text:GLOB' (e.g. 'text:~/corpus/**/*.txt')")


def path_bucket(rel_path):
    """A stable bucket in [0, 1000) for a relative path (crc32, not hash())."""
    return zlib.crc32(rel_path.replace(os.sep, "/").encode("utf-8")) % 1000


def split_files(rel_paths, val_fraction):
    """Split relative paths into (train, val) by path hash; both non-empty if >= 2."""
    threshold = 1000 * val_fraction
    buckets = {p: path_bucket(p) for p in rel_paths}
    val = [p for p in rel_paths if buckets[p] < threshold]
    train = [p for p in rel_paths if buckets[p] >= threshold]
    if len(rel_paths) >= 2:
        # Deterministic repair: move the file nearest the threshold across.
        by_bucket = sorted(rel_paths, key=lambda p: (buckets[p], p))
        if not val:
            val, train = [by_bucket[0]], [p for p in rel_paths if p != by_bucket[0]]
        elif not train:
            train, val = [by_bucket[-1]], [p for p in rel_paths if p != by_bucket[-1]]
    return tuple(train), tuple(val)


def _read_concat(root, rel_paths):
    """Read each file once and join with SEPARATOR: (uint8 array, document starts)."""
    chunks = read_documents(root, rel_paths)
    lengths = [len(c) + len(SEPARATOR) for c in chunks]
    lengths[-1] -= len(SEPARATOR)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.frombuffer(SEPARATOR.join(chunks), dtype=np.uint8), doc_starts


def read_documents(root, rel_paths):
    """The files' raw bytes, one per document, in order."""
    out = []
    for rel in rel_paths:
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                out.append(f.read())
        except OSError as e:
            raise ConfigError(f"data.source: cannot read {path} ({reason(e)}); fix its "
                              f"permissions or leave it out of the glob") from None
    return out


def thin_train_warning(what, train, val, unit, largest_val=None):
    """A line to report when a split by document left the train split with less than
    half of a corpus (`train` and `val` count `unit`s: bytes or tokens), else None."""
    if train >= val:
        return None
    share = val / max(train + val, 1)
    why = f" ({largest_val} among them)" if largest_val else ""
    return (f"{what}: the split by document put {share:.0%} of the corpus in validation"
            f"{why}, leaving {train:,} {unit} for training; lower the validation "
            f"fraction, add documents, or split the largest ones")


def _largest(root, rel_paths):
    return max(rel_paths, key=lambda p: os.path.getsize(os.path.join(root, p)))


def load_corpus(source, val_fraction):
    """Find, split and read the corpus named by `data.source`."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {val_fraction} is outside [0, 1); "
                          f"use a small fraction such as 0.02")
    root, paths = find_files(source)
    rel_paths = [os.path.relpath(p, root) for p in paths]
    if len(rel_paths) == 1:
        stream_u8, _ = _read_concat(root, rel_paths)
        cut = int(len(stream_u8) * SINGLE_FILE_TRAIN_FRACTION)
        return Corpus(source=source, root=root, train_files=tuple(rel_paths),
                      val_files=tuple(rel_paths), train_u8=stream_u8[:cut],
                      val_u8=stream_u8[cut:],
                      note="single file: bytes split 90% train / 10% val",
                      train_doc_starts=np.array([0, cut], np.int64),
                      val_doc_starts=np.array([0, len(stream_u8) - cut], np.int64))
    train, val = split_files(rel_paths, val_fraction)
    train_u8, train_starts = _read_concat(root, train)
    val_u8, val_starts = _read_concat(root, val)
    warning = thin_train_warning(f"data.source {source!r} (data.val_fraction="
                                 f"{val_fraction})", len(train_u8), len(val_u8),
                                 "bytes", _largest(root, val))
    if warning:
        logging.getLogger("jaxmix").warning(warning)
    return Corpus(source=source, root=root, train_files=train, val_files=val,
                  train_u8=train_u8, val_u8=val_u8, train_doc_starts=train_starts,
                  val_doc_starts=val_starts)
