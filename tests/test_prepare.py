"""python -m jaxmix.data.prepare: text, JSONL(.gz) and Parquet inputs into ArrayRecord
token shards. The shards read back give every document's tokens (+ eos) in order, the
split follows crc32 of the document keys, a rerun after an interruption redoes only the
unfinished groups, and every bad input is one `error:` line with nothing written."""
import gzip
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from bpe import train_bpe
from conftest import ROOT, subprocess_env

from jaxmix.data import prepare
from jaxmix.data.tokenizer import load_tokenizer

RECORD_TOKENS = 50
VAL_FRACTION = 0.3


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(root, [(key, text or bytes)]): the documents of the input files in prepare's
    order (sorted files, then rows), text files' texts as their raw bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxmix.data.corpus import stdlib_files
    root = tmp_path_factory.mktemp("inputs")
    docs = []

    def put(rel, data):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    _, paths = stdlib_files()
    for i, path in enumerate(paths[:: len(paths) // 12][:12]):
        with open(path, "rb") as f:
            put(f"src/m{i:02d}.py", f.read()[:3000])
    put("a/empty.txt", b"")
    put("a/latin1.txt", b"caf\xe9 cr\xe8me\n")
    put("a/one.txt", "héllo ☃\n".encode())
    rows = [{"text": "first row\n", "id": 1}, {"text": ""}, {"text": None},
            {"text": "üñî\ncode = 1\n", "x": [1]}]
    rows += [{"text": f"row {i} " * i} for i in range(1, 9)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "   ")
    put("b/rows.jsonl", ("\n".join(lines) + "\n").encode())
    put("b/rows.jsonl.gz", gzip.compress(("\n".join(lines[:5]) + "\n").encode()))
    texts = [f"parquet row {i}\n" * (i % 4) for i in range(11)]
    (root / "c").mkdir()
    pq.write_table(pa.table({"id": list(range(11)), "text": texts}),
                   str(root / "c" / "table.parquet"), row_group_size=3)
    for rel in sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                      for d, _, fs in os.walk(root) for f in fs):
        if rel.endswith(".parquet"):
            docs += [(f"{rel}:{i}", t) for i, t in enumerate(texts) if t]
        elif rel.endswith((".jsonl", ".jsonl.gz")):
            n_lines = len(lines) if rel.endswith(".jsonl") else 5
            docs += [(f"{rel}:{n}", json.loads(line)["text"])
                     for n, line in enumerate(lines[:n_lines])
                     if line.strip() and json.loads(line)["text"]]
        elif (root / rel).stat().st_size:
            docs.append((rel, (root / rel).read_bytes()))
    return root, docs


def run(capsys, root, out, tokenizer, *extra):
    argv = ["--input", str(root / "**" / "*"), "--input", str(root / "a" / "*.txt"),
            "--tokenizer", str(tokenizer), "--out", str(out), "--val-fraction",
            str(VAL_FRACTION), "--record-tokens", str(RECORD_TOKENS), "--shard-bytes", "4k",
            *extra]
    rc = prepare.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_split(out, manifest, split):
    """(token stream, document lengths) of a split, checking each shard's records."""
    from array_record.python.array_record_module import ArrayRecordReader
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    tokens, lengths = [], []
    for shard in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(out / shard["file"]))
        records = [np.frombuffer(r, dtype) for r in reader.read_all()]
        reader.close()
        assert len(records) == shard["records"] > 0
        assert all(len(r) == RECORD_TOKENS for r in records[:-1])
        assert 0 < len(records[-1]) <= RECORD_TOKENS
        assert os.path.getsize(out / shard["file"]) == shard["size"]
        docs = np.load(out / shard["docs"])
        assert docs.dtype == np.int64 and len(docs) == shard["documents"]
        assert int(docs.sum()) == shard["tokens"] == sum(len(r) for r in records)
        tokens += records
        lengths.append(docs)
    return np.concatenate(tokens), np.concatenate(lengths)


def expected_split(docs, tok, split):
    """The (key, text) documents of `split` by crc32 of their keys (text files' bytes
    decoded for a Hugging Face tokenizer), and their token ids + eos."""
    mine = [(k, t.decode("utf-8", "replace") if isinstance(t, bytes) and tok.kind == "hf"
             else t) for k, t in docs
            if (zlib.crc32(k.encode()) % 1000 < 1000 * VAL_FRACTION) == (split == "val")]
    eos = [] if tok.eos_id is None else [tok.eos_id]
    return mine, [np.concatenate([tok.encode(t), eos]) for _, t in mine]


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_shards_hold_every_document_in_order(kind, inputs, bpe_dir, tmp_path, capsys):
    root, docs = inputs
    tok_spec = bpe_dir if kind == "bpe" else "bytes"
    tok = load_tokenizer(tok_spec)
    out = tmp_path / "corpus"
    rc, stdout, err = run(capsys, root, out, tok_spec, "--workers", "1")
    assert rc == 0, err
    assert stdout.count("\n") == 1 and "tokens/s" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "jaxmix-tokens" and manifest["version"] == 1
    assert manifest["tokenizer"] == {"kind": tok.kind, "sha256": tok.sha256,
                                     "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    assert manifest["dtype"] == "uint16" and manifest["record_tokens"] == RECORD_TOKENS
    assert manifest["root"] == str(root) and manifest["n_input_files"] == 18
    assert manifest["text_field"] == "text" and manifest["val_fraction"] == VAL_FRACTION
    for split in ("train", "val"):
        mine, ids = expected_split(docs, tok, split)
        assert mine, f"the test inputs give no {split} document"
        tokens, lengths = read_split(out, manifest, split)
        info = manifest["splits"][split]
        assert info["documents"] == len(mine) and info["tokens"] == len(tokens)
        assert info["bytes"] == sum(len(t if isinstance(t, bytes) else t.encode())
                                    for _, t in mine)
        assert lengths.tolist() == [len(i) for i in ids]
        np.testing.assert_array_equal(tokens, np.concatenate(ids))
    if kind == "bpe":
        assert sorted(os.listdir(out / "tokenizer")) == ["tokenizer.json",
                                                         "tokenizer_config.json"]
        assert load_tokenizer(str(out / "tokenizer")).sha256 == tok.sha256
        assert len(manifest["splits"]["train"]["shards"]) >= 3
    else:
        assert not (out / "tokenizer").exists()
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def _snapshot(out):
    return {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns)
            for n in sorted(os.listdir(out)) if (out / n).is_file()}


def test_resume_redoes_only_unfinished_groups(inputs, bpe_dir, tmp_path, capsys):
    root, _ = inputs
    out = tmp_path / "corpus"
    assert run(capsys, root, out, bpe_dir, "--workers", "2")[0] == 0   # a worker pool
    for name in os.listdir(out):   # an old mtime: whatever is rewritten gets a new one
        os.utime(out / name, ns=(10**18, 10**18))
    before = _snapshot(out)
    markers = sorted(n for n in before if n.startswith("shard-"))
    assert len(markers) >= 4
    redo = markers[1][len("shard-"):-len(".json")]
    (out / markers[1]).unlink()
    (out / f".tmp-12345-train-{redo}.array_record").write_bytes(b"half written")
    rc, stdout, err = run(capsys, root, out, bpe_dir, "--workers", "1")
    assert rc == 0, err
    assert f"({len(markers) - 1} of {len(markers)} groups already done)" in stdout
    after = _snapshot(out)
    assert sorted(after) == sorted(before)           # the temporary file is gone
    for name, (data, mtime) in before.items():
        assert after[name][0] == data, name           # identical bytes, manifest included
        rewritten = redo in name or name == "manifest.json"
        assert (after[name][1] != mtime) == rewritten, name
    rc, stdout, _ = run(capsys, root, out, bpe_dir, "--workers", "1")   # all done
    assert rc == 0 and f"({len(markers)} of {len(markers)} groups" in stdout


def test_neither_split_stays_empty(tmp_path, capsys):
    for name in ("x.txt", "y.txt", "z.txt"):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(name * 3)
    buckets = {n: zlib.crc32(n.encode()) % 1000 for n in ("x.txt", "y.txt", "z.txt")}
    for fraction, split, pick in (("0", "val", min), ("0.9999", "train", max)):
        out = tmp_path / f"out{fraction}"
        rc = prepare.main(["--input", str(tmp_path / "in" / "*"), "--tokenizer", "bytes",
                           "--out", str(out), "--val-fraction", fraction, "--workers", "1"])
        assert rc == 0, capsys.readouterr().err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["splits"][split]["documents"] == 1
        tokens, _ = read_split(out, manifest, split)
        assert tokens.tobytes()[::2].decode() == pick(buckets, key=buckets.get) * 3


def _bad_inputs(root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"content": ["a"]}), str(tmp_path / "p" / "t.parquet"))
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "t.jsonl").write_text('\n{"body": "a"}\n')
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "notok").mkdir()
    good = ["--input", str(root / "a" / "*.txt")]
    return {
        "no match": (["--input", str(tmp_path / "none" / "*.txt")], "matches no files"),
        "no tokenizer": (good + ["--tokenizer", str(tmp_path / "notok")], "no tokenizer.json"),
        "out is a file": (good + ["--out", str(tmp_path / "afile")], "is a file"),
        "foreign out": (good + ["--out", str(tmp_path / "foreign")], "not a corpus"),
        "val fraction": (good + ["--val-fraction", "1"], "[0, 1)"),
        "negative val": (good + ["--val-fraction", "-0.1"], "[0, 1)"),
        "workers": (good + ["--workers", "0"], "--workers: 0"),
        "record tokens": (good + ["--record-tokens", "0"], "--record-tokens: 0"),
        "shard bytes": (good + ["--shard-bytes", "lots"], "--shard-bytes"),
        "parquet field": (["--input", str(tmp_path / "p" / "*")], "'content'"),
        "jsonl field": (["--input", str(tmp_path / "j" / "*")], "'body'"),
    }


def test_bad_inputs_are_one_error_line(inputs, tmp_path, capsys):
    root, _ = inputs
    for name, (args, needle) in _bad_inputs(root, tmp_path).items():
        out = tmp_path / "out"
        argv = ["--tokenizer", "bytes", "--out", str(out), "--workers", "1"] + args
        before = sorted(os.listdir(tmp_path))
        rc = prepare.main(argv)
        err = capsys.readouterr().err
        assert rc == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, err)
        assert needle in err, (name, err)
        assert sorted(os.listdir(tmp_path)) == before, name   # nothing written


def test_other_arguments_on_an_existing_corpus(inputs, bpe_dir, tmp_path, capsys):
    root, _ = inputs
    out = tmp_path / "corpus"
    assert run(capsys, root, out, "bytes", "--workers", "1")[0] == 0
    before = _snapshot(out)
    for extra, needle in (((), "tokenizer"), (("--record-tokens", "64"), "record_tokens")):
        rc, _, err = run(capsys, root, out, bpe_dir if not extra else "bytes", *extra,
                         "--workers", "1")
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
        assert needle in err and "another --out" in err
        assert _snapshot(out) == before


def test_bad_line_inside_a_jsonl_file(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    rc = prepare.main(["--input", str(tmp_path / "in" / "*"), "--tokenizer", "bytes",
                       "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "line 3 of" in err and "a.jsonl" in err
    assert not [n for n in os.listdir(tmp_path / "out") if n != "tokenizer"]


def test_module_cli_with_a_worker_pool(inputs, bpe_dir, tmp_path):
    """`python -m jaxmix.data.prepare` (workers pickled by module name): one summary
    line, nothing on stderr (no warnings, no progress bar off a terminal)."""
    root, _ = inputs
    out = tmp_path / "corpus"
    cmd = [sys.executable, "-m", "jaxmix.data.prepare", "--input", str(root / "src" / "*"),
           "--tokenizer", bpe_dir, "--out", str(out), "--workers", "2", "--shard-bytes", "8k"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"prepared {out}: train ") and proc.stdout.count("\n") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_input_files"] == 12
    assert len(manifest["splits"]["train"]["shards"]) >= 2
