"""Text sources as token streams: document segments, tokenizers, prepared ArrayRecord
corpora (jaxmix.data.text, packing, tokens)."""
import json
import shutil

import ml_collections
import numpy as np
import pytest

from bpe import train_bpe
from jaxmix import data
from jaxmix.data import packing
from jaxmix.data.prepare import main as prepare_main
from jaxmix.errors import ConfigError
from jaxmix.train import validate
from test_data import take


def make_config(source, packing_mode="segments", tokenizer="bytes", **train):
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(batch_size=4, seq_len=32, eval_batches=2,
                                             seed=0))
    c.train.update(train)
    c.data = ml_collections.ConfigDict(dict(source=source, val_fraction=0.1, shuffle=True,
                                            tokenizer=tokenizer, packing=packing_mode))
    c.model = ml_collections.ConfigDict(dict(family="lm", vocab_size=256))
    return c


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    for i in range(30):  # documents of very different lengths: 5 to 300 bytes
        n = int(rng.integers(5, 300))
        (root / f"doc{i:02d}.txt").write_bytes(bytes(rng.integers(97, 123, n).tolist()))
    return root


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    assert prepare_main(["--input", f"{corpus_dir}/*.txt", "--tokenizer", "bytes",
                         "--out", str(out), "--workers", "1", "--record-tokens", "64",
                         "--val-fraction", "0.1"]) == 0
    return out


def check_segments(batch, doc_starts, starts_b):
    """Segment ids change exactly at document starts, positions count from each
    document's start (or the window's), and the loss mask drops exactly the targets in
    another document."""
    w = batch["tokens"].shape[1]
    for row, start in enumerate(starts_b):
        pos = start + np.arange(w)
        doc = np.searchsorted(doc_starts, pos, side="right") - 1
        seg, p = batch["segment_ids"][row], batch["positions"][row]
        np.testing.assert_array_equal(np.diff(seg) != 0, np.diff(doc) != 0)
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
        np.testing.assert_array_equal(p, pos - np.maximum(doc_starts[doc], start))
        np.testing.assert_array_equal(batch["loss_mask"][row], np.diff(doc) == 0)


def test_segments_in_memory(corpus_dir):
    cat = data.build(make_config(f"text:{corpus_dir}/*.txt", "concat"))
    seg = data.build(make_config(f"text:{corpus_dir}/*.txt"))
    for x, y in zip(take(cat.train_iter, 3), take(seg.train_iter, 3), strict=True):
        np.testing.assert_array_equal(x, y["tokens"])  # the same windows, with segments
    batches = take(seg.seek(0), 40)
    stream = seg.text.train
    # Rows are whole windows: find each row's start, then check its segments.
    n = seg.n_train_windows
    windows = {stream.read(w * 33, w * 33 + 33).tobytes(): w * 33 for w in range(n)}
    for b in batches[:5]:
        starts_b = [windows[np.asarray(r, np.uint8).tobytes()] for r in b["tokens"]]
        check_segments(b, stream.doc_starts, starts_b)
    assert any(b["loss_mask"].min() == 0 for b in batches)  # some boundaries seen
    assert "segments" in seg.describe()


def test_per_document_validation(corpus_dir):
    pipe = data.build(make_config(f"text:{corpus_dir}/*.txt", eval_batches=50))
    val = pipe.text.val
    windows = pipe.val_windows()
    docs = [(a, b) for a, b in zip(val.doc_starts[:-1], val.doc_starts[1:], strict=True)]
    pieces = [p for w in windows for p in w]
    assert sum(n for _, n in pieces) == val.n_tokens  # every token once
    for w in windows:
        assert sum(n for _, n in w) <= 33
    for a, b in docs:  # a document is cut only into whole windows and a last piece
        # that is never cut again (a document shorter than a window: one piece)
        assert sum(a <= s < b for s, _ in pieces) == -(-(b - a) // 33), (a, b)
    batches = pipe.val_batches()
    row = batches[0]["tokens"][0]
    first = windows[0]
    np.testing.assert_array_equal(row[:first[0][1]], val.read(*first[0][:1],
                                                             first[0][0] + first[0][1]))
    pads = [b["segment_ids"] == 0 for b in batches]
    assert any(pad.any() for pad in pads)
    for batch, pad in zip(batches, pads, strict=True):
        assert not np.any(batch["loss_mask"][pad[:, 1:]])


def test_bpe_tokenizer_in_memory(corpus_dir, tmp_path):
    tok_dir = train_bpe(tmp_path / "tok")
    config = make_config(f"text:{corpus_dir}/*.txt", tokenizer=tok_dir)
    pipe = data.build(config)
    assert pipe.tokenizer.vocab_size == 2048 and pipe.tokenizer.eos_id is not None
    eos = pipe.tokenizer.eos_id
    stream = pipe.text.train
    ends = stream.doc_starts[1:] - 1
    assert np.all(stream.read(0, stream.n_tokens)[ends] == eos)
    assert pipe.bytes_per_token > 1.0
    with pytest.raises(ConfigError, match=r"^model.vocab_size=256 is smaller.*2,048"):
        validate.check_vocab(config, pipe)


def test_prepared_corpus_streams_its_documents(prepared, corpus_dir):
    manifest = json.loads((prepared / "manifest.json").read_text())
    pipe = data.build(make_config(f"arrayrecord:{prepared}"))
    train = pipe.text.train
    assert train.n_tokens == manifest["splits"]["train"]["tokens"]
    # The stream is the train documents' bytes, in order, across record boundaries.
    texts = {p.name: p.read_bytes() for p in sorted(corpus_dir.glob("*.txt"))}
    docs = [train.read(a, b).astype(np.uint8).tobytes() for a, b in
            zip(train.doc_starts[:-1], train.doc_starts[1:], strict=True)]
    assert set(docs) <= set(texts.values()) and len(docs) == len(set(docs))
    for a in (0, 17, 63, 64, 100):
        np.testing.assert_array_equal(train.read(a, a + 70),
                                      np.frombuffer(b"".join(docs), np.uint8)[a:a + 70])
    b = next(pipe.train_iter)
    assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert b["tokens"].shape == (4, 33) and b["loss_mask"].shape == (4, 32)


def test_prepared_corpus_processes_and_resume(prepared):
    config = make_config(f"arrayrecord:{prepared}")
    one = data.build(config)
    two = [data.build(config, process_index=p, process_count=2) for p in range(2)]
    ref = take(one.train_iter, 6)
    for k in range(3):
        parts = [next(p.train_iter) for p in two]
        for key in ref[k]:
            np.testing.assert_array_equal(np.concatenate([q[key] for q in parts]), ref[k][key])
    again = next(data.build(config).seek(4))  # a restart under another process count
    for key in ref[4]:
        np.testing.assert_array_equal(again[key], ref[4][key])
    for k in range(2):
        for key in one.val_batches()[k]:
            np.testing.assert_array_equal(
                np.concatenate([p.val_batches()[k][key] for p in two]),
                one.val_batches()[k][key])


def one_line(fn, match):
    with pytest.raises(ConfigError) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)
    assert match in str(e.value), str(e.value)


def test_prepared_corpus_errors(prepared, tmp_path):
    one_line(lambda: data.build(make_config(f"arrayrecord:{tmp_path}")), "manifest.json")
    one_line(lambda: data.build(make_config("arrayrecord:")), "names no folder")
    one_line(lambda: data.build(make_config(f"arrayrecord:{prepared}", "stack")),
             "data.packing='stack'")
    # No shards.
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((prepared / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps(
        {**manifest, "splits": {**manifest["splits"], "train": {"shards": []}}}))
    one_line(lambda: data.build(make_config(f"arrayrecord:{empty}")), "no train shards")
    # A damaged shard, truncated or overwritten: named.
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    shard = bad / manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(raw[:-10]))
    one_line(lambda: data.build(make_config(f"arrayrecord:{bad}")), str(shard))
    raw[len(raw) // 2:len(raw) // 2 + 40] = b"\xff" * 40
    shard.write_bytes(bytes(raw))

    def read_all():
        pipe = data.build(make_config(f"arrayrecord:{bad}"))
        pipe.text.train.read(0, pipe.text.train.n_tokens)
    one_line(read_all, str(shard))


def test_prepared_with_another_tokenizer(corpus_dir, tmp_path):
    tok_dir = train_bpe(tmp_path / "tok")
    bpe_corpus = tmp_path / "bpe"
    assert prepare_main(["--input", f"{corpus_dir}/*.txt", "--tokenizer",
                         tok_dir, "--out", str(bpe_corpus), "--workers", "1"]) == 0
    config = make_config(f"arrayrecord:{bpe_corpus}", "concat", seq_len=8)
    pipe = data.build(config)
    assert pipe.tokenizer.sha256 == json.loads(
        (bpe_corpus / "manifest.json").read_text())["tokenizer"]["sha256"]
    one_line(lambda: validate.check_vocab(config, pipe), "was prepared with a tokenizer "
             "of 2,048 tokens")
    other = train_bpe(tmp_path / "tok2", vocab_size=1024)
    config.data.tokenizer = other
    one_line(lambda: data.build(config), "is not the tokenizer")


def test_packing_helpers():
    doc_starts = np.array([0, 3, 4, 10])
    seg, pos = packing.segment_fields(doc_starts, np.array([2]), 6)
    np.testing.assert_array_equal(seg[0], [1, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(pos[0], [0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(packing.loss_mask(seg)[0], [0, 0, 1, 1, 1])
    assert packing.val_windows(doc_starts, 4) == [[(0, 3), (3, 1)], [(4, 4)], [(8, 2)]]
