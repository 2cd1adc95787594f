"""A small byte-level BPE tokenizer trained on the Python standard library, for tests.

    from bpe import train_bpe            # or: from tests.bpe import train_bpe
    tok_dir = train_bpe(tmp_path / "tok")  # tokenizer.json + tokenizer_config.json

Byte-level pre-tokenizer and decoder, so decode(encode(text)) == text for any text;
"<|endoftext|>" is a special token and the config's eos_token. Trained once per process
for each (vocab_size, n_files) and written to every directory asked for.
"""
import functools
import json
import os

EOS_TOKEN = "<|endoftext|>"


@functools.lru_cache(maxsize=4)
def _trained_json(vocab_size, n_files):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxmix.data.corpus import stdlib_files
    _, paths = stdlib_files()
    step = max(1, len(paths) // n_files)
    texts = []
    for path in paths[::step][:n_files]:
        with open(path, "rb") as f:
            texts.append(f.read().decode("utf-8", "replace"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def train_bpe(out_dir, vocab_size=2048, n_files=150):
    """Writes tokenizer.json and tokenizer_config.json (eos_token "<|endoftext|>") of a
    BPE tokenizer trained on `n_files` stdlib .py files into `out_dir`; returns it."""
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(_trained_json(int(vocab_size), int(n_files)))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS_TOKEN, "model_max_length": 1 << 20}, f)
    return out_dir
