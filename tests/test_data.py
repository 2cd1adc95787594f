"""Tests for jaxmix.data: corpora, split, grain train iterator, checkpointing."""
import os

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxmix import data
from jaxmix.data import corpus as corpus_lib
from jaxmix.errors import ConfigError


def make_config(source, **train):
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(batch_size=4, seq_len=32, eval_batches=2,
                                             seed=0))
    c.train.update(train)
    c.data = ml_collections.ConfigDict(dict(source=source, val_fraction=0.02,
                                            shuffle=True))
    return c


def write_files(root, n_files, n_bytes, prefix="doc"):
    """Random-letter text files (so every window is distinct)."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz \n", dtype=np.uint8)
    for i in range(n_files):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        (sub / f"{prefix}{i:03d}.txt").write_bytes(letters[rng.integers(0, 28, n_bytes)].tobytes())


@pytest.fixture
def text_source(tmp_path):
    write_files(tmp_path / "corpus", 24, 1500)
    return f"text:{tmp_path / 'corpus'}/**/*.txt"


def take(it, n):
    return [next(it) for _ in range(n)]


def all_windows(stream, window):
    """[n_windows, window] int32: every window of a split's stream, in order."""
    n = stream.n_tokens // window
    return stream.read_rows(np.arange(n) * window, window).astype(np.int32)


def test_shapes_dtypes_and_determinism(text_source):
    p1, p2 = data.build(make_config(text_source)), data.build(make_config(text_source))
    b1, b2 = take(p1.train_iter, 5), take(p2.train_iter, 5)
    for x, y in zip(b1, b2, strict=True):
        assert x.shape == (4, 33) and x.dtype == np.int32
        assert np.isin(x, np.frombuffer(b"abcdefghijklmnopqrstuvwxyz \n", np.uint8)).all()
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(b1[0], b1[1])
    v1, v2 = p1.val_batches(), p2.val_batches()
    assert len(v1) == 2 and all(v.shape == (4, 33) and v.dtype == np.int32 for v in v1)
    for x, y, z in zip(v1, v2, p1.val_batches(), strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    line = p1.describe()
    assert "\n" not in line and "24 files" in line and line.startswith("text:")


def test_seed_changes_order(text_source):
    a = next(data.build(make_config(text_source, seed=0)).train_iter)
    b = next(data.build(make_config(text_source, seed=1)).train_iter)
    assert not np.array_equal(a, b)


def test_train_val_files_disjoint(text_source):
    c = data.build(make_config(text_source)).corpus
    assert c.train_files and c.val_files
    assert not set(c.train_files) & set(c.val_files)
    assert len(c.train_files) + len(c.val_files) == 24
    assert list(c.train_files) == sorted(c.train_files)
    with open(os.path.join(c.root, c.val_files[0]), "rb") as f:
        assert c.val_u8[:100].tobytes() == f.read(100)


def test_split_guarantees_both_sides():
    paths = [f"f{i}.py" for i in range(5)]
    train, val = corpus_lib.split_files(paths, 0.0)
    assert len(val) == 1 and len(train) == 4
    train, val = corpus_lib.split_files(paths, 0.9999)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == 5
    # by crc32 of the path (not hash()): f0..f4.py are in buckets 357, 584, 638, 635, 602
    assert corpus_lib.split_files(paths, 0.6) == (("f2.py", "f3.py", "f4.py"),
                                                  ("f0.py", "f1.py"))


def test_single_file_is_split_by_bytes(tmp_path):
    write_files(tmp_path, 1, 5000)
    pipe = data.build(make_config(f"text:{tmp_path}/**/*.txt"))
    assert len(pipe.corpus.train_u8) == 4500 and len(pipe.corpus.val_u8) == 500
    assert "single file" in pipe.describe()


def test_epoch_is_a_permutation_and_reshuffled(tmp_path):
    write_files(tmp_path, 6, 300)
    pipe = data.build(make_config(f"text:{tmp_path}/*/*.txt"))
    windows = {w.tobytes(): i for i, w in enumerate(all_windows(pipe.text.train, pipe.window))}
    n = len(windows)
    assert n == pipe.n_train_windows >= 8
    rows = np.concatenate(take(pipe.train_iter, 2 * n // 4 + 1))
    order = [windows[r.tobytes()] for r in rows]
    assert sorted(order[:n]) == list(range(n))
    assert sorted(order[n:2 * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]


def test_no_shuffle_is_in_order(text_source):
    config = make_config(text_source)
    config.data.shuffle = False
    pipe = data.build(config)
    np.testing.assert_array_equal(next(pipe.train_iter), all_windows(pipe.text.train, 33)[:4])


def test_resume_from_state(text_source):
    config = make_config(text_source)
    reference = take(data.build(config).train_iter, 12)
    it = data.build(config).train_iter
    take(it, 7)
    state = it.get_state()
    it2 = data.build(config).train_iter
    it2.set_state(state)
    for x, y in zip(take(it2, 5), reference[7:], strict=True):
        np.testing.assert_array_equal(x, y)


def test_seek_equals_consuming(text_source):
    config = make_config(text_source)
    it = data.build(config).train_iter
    take(it, 9)
    pipe = data.build(config)
    sought = pipe.seek(9)
    assert sought is pipe.train_iter
    assert sought.get_state() == it.get_state()
    np.testing.assert_array_equal(next(sought), next(it))


def test_two_processes_concatenate_to_one(text_source):
    config = make_config(text_source)
    one = data.build(config)
    two = [data.build(config, process_index=p, process_count=2) for p in range(2)]
    assert all(p.local_batch == 2 for p in two)
    for _ in range(4):
        parts = [next(p.train_iter) for p in two]
        assert parts[0].shape == (2, 33)
        np.testing.assert_array_equal(np.concatenate(parts), next(one.train_iter))
    # After a restart with a different process count: seek to the global step.
    sought = [p.seek(10) for p in two]
    one.seek(10)
    np.testing.assert_array_equal(np.concatenate([next(s) for s in sought]),
                                  next(one.train_iter))
    for k in range(2):
        np.testing.assert_array_equal(
            np.concatenate([p.val_batches()[k] for p in two]), one.val_batches()[k])


def test_val_batches_wrap_around(tmp_path):
    write_files(tmp_path, 1, 2000)  # val = 200 bytes = 6 windows of 33
    pipe = data.build(make_config(f"text:{tmp_path}/*/*.txt", eval_batches=5))
    val = pipe.val_batches()
    assert len(val) == 5 and len(pipe.val_windows()) == 6
    flat = np.concatenate(val)
    np.testing.assert_array_equal(flat[:6], flat[6:12])


def test_orbax_roundtrip(text_source, tmp_path):
    config = make_config(text_source)
    it = data.build(config).train_iter
    take(it, 5)
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as mgr:
        mgr.save(5, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.arange(3.0)}),
            data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    it2 = data.build(config).train_iter
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as mgr:
        restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(),
            data=grain.checkpoint.CheckpointRestore(it2)))
    assert restored.data is it2 and it2.get_state() == {"next_index": 5}
    np.testing.assert_array_equal(restored.state["w"], np.arange(3.0))
    np.testing.assert_array_equal(next(it2), next(it))


@pytest.mark.parametrize("source, train, field", [
    ("text:/nonexistent-jaxmix/*.md", {}, "data.source"),
    ("hf:wikitext", {}, "data.source"),
    ("FIXTURE", {"seq_len": 4096}, "train.seq_len"),
    ("FIXTURE", {"batch_size": 6}, "train.batch_size"),
])
def test_config_errors(text_source, source, train, field):
    config = make_config(text_source if source == "FIXTURE" else source, **train)
    with pytest.raises(ConfigError) as exc:
        data.build(config, process_index=0, process_count=4)
    message = str(exc.value)
    assert message.startswith(field) and "\n" not in message


def test_zero_validation_windows(tmp_path):
    write_files(tmp_path, 1, 600)  # val = 60 bytes < one window of 64
    with pytest.raises(ConfigError, match="^train.seq_len:.*validation"):
        data.build(make_config(f"text:{tmp_path}/*/*.txt", seq_len=63))


def test_stdlib_corpus():
    pipe = data.build(make_config("stdlib"))
    c = pipe.corpus
    parts = {part for f in c.train_files + c.val_files for part in f.split(os.sep)[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert "os.py" in c.train_files + c.val_files
    assert len(c.train_u8) > 1_000_000 and len(c.val_files) >= 1
    batch = next(pipe.train_iter)
    assert batch.shape == (4, 33) and batch.dtype == np.int32


def test_val_batches_span_the_whole_validation_split(tmp_path):
    """Validation reads windows from all of the split, not only its first files."""
    write_files(tmp_path / "corpus", 40, 4000)
    config = make_config(f"text:{tmp_path / 'corpus'}/**/*.txt", eval_batches=2)
    config.data.val_fraction = 0.3
    pipe = data.build(config)
    windows = {w.tobytes(): i for i, w in enumerate(all_windows(pipe.text.val, 33))}
    picked = [windows[row.tobytes()] for b in pipe.val_batches() for row in b]
    n_val, n_pick = len(windows), len(picked)
    assert n_val > 4 * n_pick
    assert len(set(picked)) == n_pick
    assert max(picked) >= n_val - 2 * (n_val // n_pick)  # reaches the end of the split


def test_stdlib_skips_generated_sysconfigdata():
    _, paths = corpus_lib.stdlib_files()
    assert paths and not any(os.path.basename(p).startswith("_sysconfigdata") for p in paths)
