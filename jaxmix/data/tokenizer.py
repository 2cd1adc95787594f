"""Tokenizers: UTF-8 bytes, or a Hugging Face fast tokenizer (`tokenizer.json`).

    tok = load_tokenizer("bytes")                  # vocab 256, no end-of-text id
    tok = load_tokenizer("path/to/hf_tokenizer")   # a folder with tokenizer.json
    ids_T = tok.encode("def f(x):")                # int32 [n_tokens]
    tok.decode(ids_T)

Hugging Face tokenizers are read with the `tokenizers` library only (no transformers,
no torch, nothing downloaded). `eos_token` / `bos_token` of the folder's
tokenizer_config.json (or special_tokens_map.json) give `eos_id` / `bos_id`.
"""
import hashlib
import os
import shutil

import numpy as np

from jaxmix.errors import ConfigError, first_line, read_json

BYTES = "bytes"
TOKENIZER_JSON = "tokenizer.json"
# The files `save` copies: the tokenizer itself and the files naming its special tokens.
HF_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json")
FIX = ("set it to 'bytes' or to a Hugging Face tokenizer folder holding tokenizer.json "
       "(or to that file)")


def token_dtype(vocab_size):
    """The narrowest unsigned dtype that holds every id of `vocab_size` tokens."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


class Tokenizer:
    """UTF-8 bytes: token i is byte i (vocab 256, no special tokens)."""
    kind = BYTES
    vocab_size = 256
    eos_id = None
    bos_id = None
    sha256 = BYTES
    path = None

    def encode(self, text, add_special_tokens=False):
        """int32 [n_tokens]; `text` is a str or already-encoded bytes."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        ids = np.asarray(ids, np.int64).clip(0, 255).astype(np.uint8)
        return ids.tobytes().decode("utf-8", "replace")

    def save(self, out_dir):
        """Nothing to save: the byte tokenizer has no files."""

    def save_for_hf(self, out_dir):
        """Writes a Hugging Face tokenizer.json (and tokenizer_config.json) that encodes
        exactly as this one: token i is byte i. Byte-level BPE without merges: each
        byte is mapped to one printable character (the printable Latin-1 bytes to
        themselves, the rest to U+0100 onwards, in byte order) and each character is a
        token whose id is its byte."""
        from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers
        printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1),
                     *range(0xAE, 0xFF + 1)]
        extra = iter(range(0x100, 0x200))
        chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
        tok = RustTokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, TOKENIZER_JSON))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            f.write('{"tokenizer_class": "PreTrainedTokenizerFast"}\n')

    def describe(self):
        return "bytes (UTF-8, vocab 256, no eos)"


def _special_token(names, key):
    """The content of special token `key` in the first of the config dicts naming it."""
    for config in names:
        token = config.get(key)
        if isinstance(token, dict):  # {"content": "</s>", ...} (AddedToken as JSON)
            token = token.get("content")
        if token is not None:
            return token
    return None


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer read from its tokenizer.json."""
    kind = "hf"

    def __init__(self, json_path, field="data.tokenizer"):
        from tokenizers import Tokenizer as RustTokenizer
        self.path = json_path
        try:
            with open(json_path, "rb") as f:
                data = f.read()
            self._tok = RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # OSError, UnicodeDecodeError, the library's parse errors
            msg = first_line(e)
            raise ConfigError(f"{field}: {json_path} is not a readable tokenizer.json "
                              f"({msg}); {FIX}, saved by tokenizers' Tokenizer.save or "
                              f"transformers' save_pretrained") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        folder = os.path.dirname(os.path.abspath(json_path))
        # The config files describe this tokenizer only when it is the folder's own.
        self._extra = [] if os.path.basename(json_path) != TOKENIZER_JSON else [
            os.path.join(folder, n) for n in HF_FILES[1:]
            if os.path.isfile(os.path.join(folder, n))]
        configs = [read_json(p, field, "fix or delete it") for p in self._extra]
        self.eos_token = _special_token(configs, "eos_token")
        self.bos_token = _special_token(configs, "bos_token")
        self.eos_id = self._token_id(self.eos_token, "eos_token", field)
        self.bos_id = self._token_id(self.bos_token, "bos_token", field)

    def _token_id(self, token, key, field):
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{field}: {key} {token!r} of {os.path.dirname(self.path)} "
                              f"is not in its tokenizer.json vocabulary; set {key} in "
                              f"tokenizer_config.json to one of the tokenizer's tokens")
        return int(token_id)

    def encode(self, text, add_special_tokens=False):
        """int32 [n_tokens]; add_special_tokens runs the tokenizer's post-processor
        (e.g. a leading BOS)."""
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", "replace")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts):
        """[int32 [n_tokens]] per document (batched and multi-threaded in Rust), encoded
        as the model sees a document: with the tokenizer's post-processor (a leading BOS
        for Llama-style tokenizers, nothing for GPT-2-style ones), as `generate` encodes
        a prompt. The end-of-text id is appended by the callers."""
        texts = [t if isinstance(t, str) else bytes(t).decode("utf-8", "replace")
                 for t in texts]
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets nobody reads here.
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = fast(texts, add_special_tokens=True)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids):
        """The text of `ids` (special tokens included, as the tokenizer spells them)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, out_dir):
        """Copies tokenizer.json (and its tokenizer_config.json and
        special_tokens_map.json, if any) into `out_dir`."""
        os.makedirs(out_dir, exist_ok=True)
        copies = [(self.path, TOKENIZER_JSON)] + [(p, os.path.basename(p)) for p in self._extra]
        for src, name in copies:
            dst = os.path.join(out_dir, name)
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copyfile(src, dst)

    def describe(self):
        eos = "no eos" if self.eos_id is None else f"eos {self.eos_token!r}={self.eos_id}"
        return (f"hf {self.path} (vocab {self.vocab_size:,}, {eos}, sha256 "
                f"{self.sha256[:12]})")


def tokenizer_folder(path):
    """The folder holding the tokenizer of folder `path`: `path` itself (a Hugging Face
    model or tokenizer folder), or its `tokenizer/` (a jaxmix workdir or prepared
    corpus keeps its tokenizer there)."""
    inner = os.path.join(path, "tokenizer")
    if not os.path.isfile(os.path.join(path, TOKENIZER_JSON)) and \
            os.path.isfile(os.path.join(inner, TOKENIZER_JSON)):
        return inner
    return path


def load_tokenizer(spec, field="data.tokenizer"):
    """The Tokenizer named by `spec`: "bytes", a Hugging Face tokenizer folder (with
    tokenizer.json), a tokenizer.json file, or a jaxmix workdir or prepared corpus (its
    `tokenizer/`). `field` names the setting in errors."""
    if spec is None or spec == BYTES:
        return Tokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"{field}: {spec!r} is not a tokenizer; {FIX}")
    path = os.path.expanduser(os.fspath(spec))
    if not os.path.exists(path):
        raise ConfigError(f"{field}: {path!r} does not exist; {FIX}")
    if os.path.isdir(path):
        path = tokenizer_folder(path)
        json_path = os.path.join(path, TOKENIZER_JSON)
        if not os.path.isfile(json_path):
            slow = [n for n in ("tokenizer.model", "vocab.json", "merges.txt")
                    if os.path.exists(os.path.join(path, n))]
            hint = (f" (it has {', '.join(slow)}: write tokenizer.json with transformers' "
                    f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))" if slow else "")
            raise ConfigError(f"{field}: {path} holds no tokenizer.json{hint}; {FIX}")
        path = json_path
    return HFTokenizer(path, field)
