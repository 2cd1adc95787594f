"""jaxmix.data.tokenizer: the byte tokenizer, Hugging Face tokenizer.json files (a small
BPE trained by tests/bpe.py), and the one-line errors of bad tokenizer paths."""
import json
import os

import numpy as np
import pytest
from bpe import EOS_TOKEN, train_bpe

from jaxmix.data.tokenizer import load_tokenizer, token_dtype
from jaxmix.errors import ConfigError

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld ☃ — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\ttabs", " ", "a" * 300]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"))


def test_bytes_round_trip():
    tok = load_tokenizer("bytes")
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.bos_id, tok.sha256) == (
        "bytes", 256, None, None, "bytes")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, np.frombuffer(text.encode(), np.uint8))
        assert tok.decode(ids) == text
    raw = b"\xff\xfe not utf-8"
    np.testing.assert_array_equal(tok.encode(raw), np.frombuffer(raw, np.uint8))
    batch = tok.encode_batch(TEXTS)
    assert [b.tolist() for b in batch] == [tok.encode(t).tolist() for t in TEXTS]
    assert "256" in tok.describe()


def test_bytes_save_writes_nothing(tmp_path):
    load_tokenizer("bytes").save(str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists() or not os.listdir(tmp_path / "tok")


def test_bpe_round_trip_and_ids(bpe_dir):
    from tokenizers import Tokenizer
    tok = load_tokenizer(bpe_dir)
    rust = Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    assert tok.kind == "hf"
    assert tok.vocab_size == 2048 == rust.get_vocab_size(with_added_tokens=True)
    assert tok.eos_id == rust.token_to_id(EOS_TOKEN) is not None
    assert tok.bos_id is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
        assert tok.decode(ids) == text
    code = "import os\n\nclass A:\n    def __init__(self):\n        self.x = 1\n"
    assert len(tok.encode(code)) < len(code.encode()) / 2   # BPE merges something
    batch = tok.encode_batch(TEXTS)
    assert [b.tolist() for b in batch] == [tok.encode(t).tolist() for t in TEXTS]
    assert tok.decode(list(tok.encode("x")) + [tok.eos_id]) == "x" + EOS_TOKEN
    assert EOS_TOKEN in tok.describe() and "2,048" in tok.describe()


def test_bpe_file_path_and_save(bpe_dir, tmp_path):
    from_dir = load_tokenizer(bpe_dir)
    from_file = load_tokenizer(os.path.join(bpe_dir, "tokenizer.json"))
    assert from_file.sha256 == from_dir.sha256 and len(from_dir.sha256) == 64
    assert from_file.eos_id == from_dir.eos_id
    with open(os.path.join(bpe_dir, "tokenizer.json"), "rb") as f:
        import hashlib
        assert hashlib.sha256(f.read()).hexdigest() == from_dir.sha256
    from_dir.save(str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["tokenizer.json", "tokenizer_config.json"]
    copy = load_tokenizer(str(tmp_path / "copy"))
    assert (copy.sha256, copy.eos_id) == (from_dir.sha256, from_dir.eos_id)


def test_special_tokens_map_and_added_token_dict(bpe_dir, tmp_path):
    """eos / bos may come from special_tokens_map.json, as {"content": ...} dicts."""
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(open(os.path.join(bpe_dir, "tokenizer.json"), "rb").read())
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": EOS_TOKEN, "lstrip": False}, "bos_token": EOS_TOKEN}))
    tok = load_tokenizer(str(d))
    assert tok.eos_id == tok.bos_id == load_tokenizer(bpe_dir).eos_id
    tok.save(str(tmp_path / "copy"))
    assert "special_tokens_map.json" in os.listdir(tmp_path / "copy")


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


def _error(spec, field="data.tokenizer"):
    with pytest.raises(ConfigError) as e:
        load_tokenizer(spec, field=field)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(field)
    return msg


def test_errors_name_field_path_and_fix(bpe_dir, tmp_path):
    missing = str(tmp_path / "nope")
    msg = _error(missing)
    assert missing in msg and "'bytes'" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _error(str(empty), field="--tokenizer")
    assert str(empty) in msg and "no tokenizer.json" in msg
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text("{}")
    (slow / "merges.txt").write_text("")
    assert "save_pretrained" in _error(str(slow))
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text('{"not": "a tokenizer"}')
    msg = _error(str(bad.parent))
    assert str(bad) in msg and "not a readable tokenizer.json" in msg
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xff{")
    assert str(garbage) in _error(str(garbage))
    wrong_eos = tmp_path / "wrong_eos"
    train_bpe(wrong_eos)
    (wrong_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</nope>"}))
    msg = _error(str(wrong_eos))
    assert "'</nope>'" in msg and "eos_token" in msg
    (wrong_eos / "tokenizer_config.json").write_text("{broken")
    assert "tokenizer_config.json" in _error(str(wrong_eos))
