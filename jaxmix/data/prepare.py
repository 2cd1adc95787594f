"""Tokenize text, JSONL or Parquet files into ArrayRecord token shards, the corpus of
`data.source = "arrayrecord:DIR"`.

  python -m jaxmix.data.prepare --input 'corpus/**/*.txt' --tokenizer TOKENIZER_DIR \
      --out DIR [--input 'more/*.jsonl' ...] [--text-field text] [--val-fraction 0.02]
      [--workers N] [--record-tokens 8192] [--shard-bytes 64MiB]

Documents: a text file is one document; each line of a .jsonl / .jsonl.gz file and each
row of a .parquet file is one (its --text-field). Empty documents are skipped. A
document's key is its file's path relative to the inputs' common root ("/"-separated),
"PATH:ROW" for a JSONL line (0-based line number) or a Parquet row; it goes to val when
crc32(key) % 1000 < 1000 * val_fraction (with >= 2 documents neither split stays empty:
the smallest bucket moves to val, or the largest to train).

The sorted input files form groups of about --shard-bytes (a file is never split), one
per worker task. Group k writes, into DIR:
  {train,val}-0000k.array_record  its split's token stream (documents in order, each
      followed by the tokenizer's eos id if it has one) in records of exactly
      --record-tokens little-endian uint16 (vocab <= 65536) or uint32 ids, the last
      record shorter; options "group_size:1,uncompressed" (cheap random reads)
  {train,val}-0000k.docs.npy      int64 [n_docs] document lengths (eos included)
  shard-0000k.json                the group's done marker, written last
(a split with no documents in the group writes no files). Every file is written under a
temporary name and renamed when complete, so rerunning the same command after an
interruption redoes only the groups without a marker. Last come DIR/tokenizer/ (the
tokenizer's files) and DIR/manifest.json (counts and shards per split).
"""
import json
import multiprocessing
import os
import re
import sys
import time

import numpy as np

from jaxmix.data.corpus import path_bucket, thin_train_warning
from jaxmix.data.documents import check_field, documents, find_inputs
from jaxmix.data.tokenizer import load_tokenizer, token_dtype
from jaxmix.errors import ConfigError
from jaxmix.paths import check_output_folder

FORMAT, VERSION, MANIFEST = "jaxmix-tokens", 1, "manifest.json"
SPLITS = ("train", "val")
RECORD_OPTIONS = "group_size:1,uncompressed"
TMP = ".tmp-"
# What this command writes into --out (anything else there: not one of its corpora).
OWN_NAMES = re.compile(r"(train|val)-\d{5}\.(array_record|docs\.npy)|shard-\d{5}\.json|"
                       r"manifest\.json|tokenizer|\.tmp-.*")
MARKER = re.compile(r"shard-(\d{5})\.json")
BATCH_BYTES, BATCH_DOCS = 4 << 20, 4096   # documents per encode_batch call
SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_TOKENIZERS = {}                          # spec -> Tokenizer, per process


def make_groups(files, shard_bytes):
    """Consecutive runs of the sorted (rel, size) files of about shard_bytes each."""
    groups, size = [[]], 0
    for rel, n in files:
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append([rel, n])
        size += n
    return groups if groups[0] else []


# ----------------------------------------------------------------------------- one group

class SplitPart:
    """One split of one group: an ArrayRecord file of fixed-size token records and its
    documents' lengths, written under temporary names until `commit`."""

    def __init__(self, out, name, dtype, record_tokens, eos_id):
        self.out, self.name, self.dtype, self.record_tokens = out, name, dtype, record_tokens
        self.eos_T = np.asarray([] if eos_id is None else [eos_id], dtype)
        self.writer, self.pending, self.n_pending = None, [], 0
        self.lengths, self.records, self.tokens, self.bytes = [], 0, 0, 0

    def _tmp(self, suffix):
        return os.path.join(self.out, f"{TMP}{os.getpid()}-{self.name}{suffix}")

    def add(self, docs):
        """Appends documents [(int32 ids, utf-8 bytes)] to the stream."""
        pieces = []
        for ids_T, n_bytes in docs:
            if len(ids_T) == 0:
                continue  # nothing left after normalisation: an empty document
            pieces += [ids_T.astype(self.dtype), self.eos_T]
            self.lengths.append(len(ids_T) + len(self.eos_T))
            self.bytes += n_bytes
        if not pieces:
            return
        if self.writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter
            self.writer = ArrayRecordWriter(self._tmp(".array_record"), RECORD_OPTIONS)
        self.pending += pieces
        self.n_pending += sum(len(p) for p in pieces)
        if self.n_pending >= self.record_tokens:
            self._write(final=False)

    def _write(self, final):
        stream_T, rt = np.concatenate(self.pending), self.record_tokens
        n_records = len(stream_T) // rt + (final and len(stream_T) % rt > 0)
        for i in range(n_records):
            self.writer.write(stream_T[i * rt:(i + 1) * rt].tobytes())
        self.records += n_records
        self.tokens += min(len(stream_T), n_records * rt)
        rest_T = stream_T[n_records * rt:]
        self.pending, self.n_pending = ([rest_T] if len(rest_T) else []), len(rest_T)

    def close(self):
        """Finishes the temporary files; the shard's manifest entry, or None if empty."""
        if self.writer is None:
            return None
        if self.n_pending:
            self._write(final=True)
        self.writer.close()
        self.writer = None
        with open(self._tmp(".docs.npy"), "wb") as f:
            np.save(f, np.asarray(self.lengths, np.int64))
        return {"file": f"{self.name}.array_record", "docs": f"{self.name}.docs.npy",
                "records": self.records, "tokens": self.tokens,
                "documents": len(self.lengths), "bytes": self.bytes,
                "size": os.path.getsize(self._tmp(".array_record"))}

    def commit(self, written):
        """Renames the finished files into place (removes stale ones if nothing)."""
        for suffix in (".array_record", ".docs.npy"):
            final = os.path.join(self.out, self.name + suffix)
            if written:
                os.replace(self._tmp(suffix), final)
            elif os.path.exists(final):
                os.remove(final)

    def abort(self):
        if self.writer is not None:
            self.writer.close()
        for suffix in (".array_record", ".docs.npy"):
            if os.path.exists(self._tmp(suffix)):
                os.remove(self._tmp(suffix))


def write_json(path, data, indent=None):
    """Writes `data` to path atomically (a temporary file renamed over it)."""
    tmp = os.path.join(os.path.dirname(path), f"{TMP}{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)
    os.replace(tmp, path)


def _tokenizer(spec):
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = load_tokenizer(spec, field="--tokenizer")
    return _TOKENIZERS[spec]


def run_group(task):
    """Tokenizes and writes group k's split parts, then its marker; returns the marker.
    `overrides` maps document keys to the split they must go to."""
    k, files, job, overrides = task
    tok, out = _tokenizer(job["tokenizer_spec"]), job["out"]
    marker_path = os.path.join(out, f"shard-{k:05d}.json")
    if os.path.exists(marker_path):
        os.remove(marker_path)  # redone: the old files are not valid until the new marker
    dtype = np.dtype(job["args"]["dtype"]).newbyteorder("<")
    parts = {s: SplitPart(out, f"{s}-{k:05d}", dtype, job["args"]["record_tokens"],
                          tok.eos_id) for s in SPLITS}
    threshold = 1000 * job["args"]["val_fraction"]
    extremes = {"train": None, "val": None}   # (bucket, key): smallest train, largest val

    def flush(batch):
        ids = tok.encode_batch([text for _, _, text, _ in batch])
        for split in SPLITS:
            parts[split].add([(ids_T, n) for (s, _, _, n), ids_T in zip(batch, ids) if s == split])
        for (split, bucket_key, _, _), ids_T in zip(batch, ids):
            if len(ids_T):
                old = extremes[split]
                pick = min if split == "train" else max
                extremes[split] = bucket_key if old is None else pick(old, bucket_key)
        batch.clear()

    try:
        batch, batch_bytes = [], 0
        for rel, _ in files:
            for key, text, n_bytes in documents(job["root"], rel, job["args"]["text_field"],
                                                tok.kind == "bytes"):
                bucket = path_bucket(key)
                split = overrides.get(key) or ("val" if bucket < threshold else "train")
                batch.append((split, (bucket, key), text, n_bytes))
                batch_bytes += n_bytes
                if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                    flush(batch)
                    batch_bytes = 0
        if batch:
            flush(batch)
        shards = {s: parts[s].close() for s in SPLITS}
    except BaseException:
        for part in parts.values():
            part.abort()
        raise
    for s in SPLITS:
        parts[s].commit(shards[s] is not None)
    marker = {"group": k, "args": job["args"], "files": files, "overrides": overrides,
              "splits": shards, "min_train": extremes["train"], "max_val": extremes["val"]}
    write_json(marker_path, marker)
    return marker


def _init_worker(threads):
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # tokenizers' thread pool


def run_groups(tasks, workers):
    """Yields each task's marker as it finishes: in this process for one worker or one
    task, else in a pool of fresh (forkserver) worker processes."""
    if workers == 1 or len(tasks) <= 1:
        yield from map(run_group, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if "forkserver" in methods and getattr(main_spec, "name", None) != __name__:
        ctx.set_forkserver_preload([__name__])  # imported once (not under -m: runpy warns)
    workers = min(workers, len(tasks))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        yield from pool.imap_unordered(run_group, tasks)


# ----------------------------------------------------------------------------- the corpus

def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check_same(out, old, args, keys):
    for key in keys:
        if old.get(key) != args.get(key):
            show = {k: (v["sha256"][:12] if k == "tokenizer" and isinstance(v, dict) else v)
                    for k, v in (("old", old.get(key)), ("new", args.get(key)))}
            raise ConfigError(f"--out {out} holds a corpus prepared with other arguments "
                              f"({key} {show['old']!r}, now {show['new']!r}); use another "
                              f"--out or delete it")


def finished_groups(out, args, groups):
    """{k: marker} of the groups an earlier run of the same command finished in `out`
    (their files intact); ConfigError if `out` holds anything else."""
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    foreign = [e for e in entries if not OWN_NAMES.fullmatch(e)]
    if foreign:
        raise ConfigError(f"--out {out} is a non-empty folder that is not a corpus of this "
                          f"command (it holds {foreign[0]!r}); use another --out or delete it")
    if MANIFEST in entries:
        _check_same(out, _read_json(os.path.join(out, MANIFEST)) or {}, args,
                    [k for k in args if k != "shard_bytes"])
    done = {}
    for name in entries:
        match = MARKER.fullmatch(name)
        marker = match and _read_json(os.path.join(out, name))
        if not isinstance(marker, dict) or "args" not in marker:
            continue  # written atomically: an unreadable marker was tampered with; redo
        _check_same(out, marker["args"], args, sorted(set(args) | set(marker["args"])))
        k = int(match.group(1))
        if k >= len(groups) or marker["files"] != groups[k]:
            raise ConfigError(f"--out {out} holds a corpus prepared from other input files "
                              f"(group {k}: files added, removed or resized); use another "
                              f"--out or delete it")
        paths = [(os.path.join(out, s["file"]), os.path.join(out, s["docs"]), s["size"])
                 for s in marker["splits"].values() if s]
        if all(os.path.isfile(d) and os.path.isfile(f) and os.path.getsize(f) == n
               for f, d, n in paths):
            done[k] = marker
    return done


def balance_splits(markers):
    """(group, key, split) of the document to move so that neither split is empty (the
    smallest-bucket train document to val, or the largest-bucket val one to train), or
    None."""
    counts = {s: sum((m["splits"][s] or {}).get("documents", 0) for m in markers.values())
              for s in SPLITS}
    if counts["train"] + counts["val"] < 2 or (counts["train"] and counts["val"]):
        return None
    src, dst, key, pick = (("train", "val", "min_train", min) if not counts["val"]
                           else ("val", "train", "max_val", max))
    bucket_key, k = pick((tuple(m[key]), k) for k, m in markers.items() if m[key])
    return k, bucket_key[1], dst


def manifest_of(args, n_files, markers):
    splits = {}
    for s in SPLITS:
        shards = [markers[k]["splits"][s] for k in sorted(markers) if markers[k]["splits"][s]]
        splits[s] = {f: sum(sh[f] for sh in shards) for f in ("tokens", "documents", "bytes")}
        splits[s]["shards"] = shards
    return {"format": FORMAT, "version": VERSION, "tokenizer": args["tokenizer"],
            "dtype": args["dtype"], "record_tokens": args["record_tokens"],
            "text_field": args["text_field"], "val_fraction": args["val_fraction"],
            "inputs": args["inputs"], "root": args["root"], "n_input_files": n_files,
            "splits": splits}


def _count(n, noun):
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
    size = int(float(m.group(1)) * 1024 ** SIZE_UNITS[m.group(2).lower()]) if m else 0
    if size < 1:
        raise ConfigError(f"--shard-bytes: {text!r} is not a size; use a number of bytes "
                          f"or one like 64MiB")
    return size


def prepare(a):
    """Runs the command of arguments `a` parsed by `build_parser`; returns the manifest."""
    start = time.time()  # the value ranges are checked by the parser's types
    shard_bytes = parse_size(a.shard_bytes)
    out = os.path.abspath(os.path.expanduser(a.out))
    check_output_folder(out, "--out", "give a new folder (or one this command wrote)")
    tok = load_tokenizer(a.tokenizer, field="--tokenizer")
    root, paths = find_inputs(a.input, out)
    for path in paths:
        check_field(path, a.text_field)
    files = [[os.path.relpath(p, root).replace(os.sep, "/"), os.path.getsize(p)]
             for p in paths]
    groups = make_groups(files, shard_bytes)
    args = {"format": FORMAT, "version": VERSION,
            "tokenizer": {"kind": tok.kind, "sha256": tok.sha256,
                          "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
            "record_tokens": a.record_tokens, "text_field": a.text_field,
            "val_fraction": a.val_fraction, "inputs": list(a.input), "root": root,
            "shard_bytes": shard_bytes}
    markers = finished_groups(out, args, groups)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith(TMP):  # a run's unfinished files (it was killed)
            os.remove(os.path.join(out, name))
    spec = tok.path or "bytes"
    _TOKENIZERS[spec] = tok
    job = {"out": out, "root": root, "tokenizer_spec": spec, "args": args}
    todo = sorted((k for k in range(len(groups)) if k not in markers),
                  key=lambda k: -sum(n for _, n in groups[k]))
    reused = len(markers)
    from tqdm import tqdm
    with tqdm(total=sum(n for _, n in files), unit="B", unit_scale=True, unit_divisor=1024,
              initial=sum(n for k in markers for _, n in groups[k]), desc="prepare",
              disable=None, file=sys.stderr) as bar:
        for marker in run_groups([(k, groups[k], job, {}) for k in todo], a.workers):
            markers[marker["group"]] = marker
            bar.update(sum(n for _, n in marker["files"]))
    move = balance_splits(markers)
    if move:
        k, key, split = move
        markers[k] = run_group((k, groups[k], job, {key: split}))
    manifest = manifest_of(args, len(paths), markers)
    if not any(manifest["splits"][s]["documents"] for s in SPLITS):
        raise ConfigError(f"--input: the {len(paths)} input files hold no non-empty "
                          f"documents; check the globs and --text-field")
    tok.save(os.path.join(out, "tokenizer"))
    write_json(os.path.join(out, MANIFEST), manifest, indent=1)
    seconds = time.time() - start
    splits = manifest["splits"]
    counts = "; ".join(f"{s} {_count(splits[s]['documents'], 'document')}, "
                       f"{_count(splits[s]['tokens'], 'token')} in "
                       f"{_count(len(splits[s]['shards']), 'shard')}" for s in SPLITS)
    tokens = sum(splits[s]["tokens"] for s in SPLITS)
    print(f"prepared {a.out}: {counts}; {seconds:.{1 if seconds >= 10 else 2}f} s, "
          f"{tokens / max(seconds, 1e-9):,.0f} tokens/s"
          + (f" ({reused} of {len(groups)} groups already done)" if reused else ""))
    warning = thin_train_warning(f"--val-fraction {a.val_fraction}", splits["train"]["tokens"],
                                 splits["val"]["tokens"], "tokens")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return manifest


def build_parser():
    from jaxmix import cli
    from jaxmix.cpu import cores
    p = cli.Parser("python -m jaxmix.data.prepare", "Tokenize text / JSONL / Parquet files "
                   "into ArrayRecord token shards for data.source='arrayrecord:DIR'. Rerun "
                   "the same command to resume.")
    p.add_argument("--input", action="extend", nargs="+", required=True, metavar="GLOB",
                   help="files to read (quote globs; ** recurses); repeatable")
    p.add_argument("--tokenizer", required=True,
                   help="'bytes', a Hugging Face tokenizer folder or tokenizer.json, or a "
                   "jaxmix workdir or prepared corpus (its tokenizer/)")
    p.add_argument("--out", type=cli.path, required=True, help="the corpus folder to write")
    p.add_argument("--text-field", default="text", help="the text of a JSONL/Parquet row")
    p.add_argument("--val-fraction", type=cli.fraction, default=0.02,
                   help="the share of documents held out for validation (by path hash)")
    p.add_argument("--workers", type=cli.positive_int, default=cores(),
                   help="tokenizing processes (this machine's cores)")
    p.add_argument("--record-tokens", type=cli.positive_int, default=8192,
                   help="tokens per ArrayRecord record")
    p.add_argument("--shard-bytes", default="64MiB",
                   help="input bytes per shard group (e.g. 64MiB, 1GiB)")
    return p


def main(argv=None):
    from jaxmix import cli
    return cli.main(build_parser(), argv, prepare,
                    "interrupted; rerun the same command to resume")


if __name__ == "__main__":
    from jaxmix.data import prepare as _module  # workers pickle its functions by name
    sys.exit(_module.main())
