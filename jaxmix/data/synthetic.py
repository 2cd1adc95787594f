"""Synthetic recall tasks: selective copying, induction heads, MQAR, passkey retrieval.

Every example is a token row of `seq_len + 1` tokens (model inputs plus the shifted
targets) and a loss mask of `seq_len` entries over the targets: 1 where the target is
an answer the model must produce, 0 elsewhere. Example `row` of batch `step` comes from
a NumPy generator seeded with (seed, split, step, row) alone, so a run is
deterministic, resumes exactly, and each process makes only its own rows.

Tasks (the vocabulary is the model's `vocab_size`, V):
- `induction` (Mamba paper, H3 layout): random symbols 1..V-1; the trigger 0 appears
  once at a random position followed by the symbol to recall; the sequence ends with
  the trigger, and the only scored target is that symbol.
- `selective_copy` (Mamba paper): `n_copy` symbols 1..V-2 at random positions in a
  context of noise tokens 0, then the marker V-1 and the symbols again in order; the
  `n_copy` targets after the marker are scored.
- `mqar` (Zoology): `n_pairs` key-value pairs (keys from [1, V/2), values from
  [V/2, V), each key once), then every key again at even offsets of a zero-filled
  query region, with power-law gaps (exponent `power_a`), each followed by its value;
  the targets after the query keys are scored. Needs 4 * n_pairs <= seq_len.
- `passkey` (DuoAttention's multi-passkey, byte level, V = 256): `n_keys` passkeys of
  `n_words` NATO-alphabet words, hidden as sentences at random depths (5% to 95%) of
  filler text cut from the Python standard library's source; the text ends by asking
  for every key, and the bytes of the answer words are scored.
"""
import functools

import numpy as np

from jaxmix.errors import ConfigError

SPLITS = {"train": 0, "val": 1, "eval": 2}
NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
        "india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa",
        "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
        "yankee", "zulu")
DEPTH_RANGE = (0.05, 0.95)  # passkey needles' depths, as fractions of the filler
# The tasks' settings (config.data.synthetic), as configs/synthetic.py starts them.
# warmup_len / warmup_steps: a length warm-up, the first `warmup_steps` training batches
# made at `warmup_len` tokens instead of train.seq_len (0 = off).
DEFAULTS = dict(n_copy=16, n_pairs=16, power_a=0.01, n_keys=2, n_words=3, warmup_len=0,
                warmup_steps=0)


def warmup(settings):
    """(warmup_len, warmup_steps) of data.synthetic settings (0, 0 when absent: configs
    written before the warm-up existed)."""
    return (int(settings.get("warmup_len", 0) or 0),
            int(settings.get("warmup_steps", 0) or 0))


def rng_for(seed, split, step, row):
    return np.random.default_rng([int(seed) % 2**32, SPLITS[split], int(step), int(row)])


# ----------------------------------------------------------------------------- tasks

def induction(rng, seq_len, args):
    vocab = args.vocab_size
    tokens = rng.integers(1, vocab, seq_len + 1)
    trigger_at = rng.integers(0, seq_len - 2)   # its symbol sits before the final trigger
    tokens[trigger_at] = 0
    tokens[seq_len - 1] = 0
    tokens[seq_len] = tokens[trigger_at + 1]
    mask = np.zeros(seq_len, np.float32)
    mask[seq_len - 1] = 1
    return tokens, mask


def selective_copy(rng, seq_len, args):
    vocab, n_copy = args.vocab_size, args.n_copy
    n_context = seq_len - n_copy
    tokens = np.zeros(seq_len + 1, np.int64)
    symbols = rng.integers(1, vocab - 1, n_copy)
    tokens[np.sort(rng.choice(n_context, n_copy, replace=False))] = symbols
    tokens[n_context] = vocab - 1
    tokens[n_context + 1:] = symbols
    mask = np.zeros(seq_len, np.float32)
    mask[n_context:] = 1
    return tokens, mask


@functools.lru_cache(maxsize=64)
def _gap_probs(space, power_a):
    """p(gap) proportional to gap^(a-1), gap = 1..space (Zoology's query placement)."""
    p = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def mqar(rng, seq_len, args):
    vocab, n_pairs = args.vocab_size, args.n_pairs
    half = vocab // 2
    keys = rng.choice(np.arange(1, half), n_pairs, replace=False)
    values = rng.choice(np.arange(half, vocab), n_pairs, replace=n_pairs > vocab - half)
    tokens = np.zeros(seq_len + 1, np.int64)
    tokens[0:2 * n_pairs:2], tokens[1:2 * n_pairs:2] = keys, values
    space = (seq_len + 1 - 2 * n_pairs) // 2
    slots = rng.choice(space, n_pairs, replace=False, p=_gap_probs(space, args.power_a))
    at = 2 * n_pairs + 2 * slots
    order = rng.permutation(n_pairs)
    tokens[at], tokens[at + 1] = keys[order], values[order]
    mask = np.zeros(seq_len, np.float32)
    mask[at] = 1
    return tokens, mask


def _passkey_parts(words):
    """(needle byte strings, question bytes, answer spans within the question) for
    passkeys given as NATO word indices, one row per key."""
    phrases = [" ".join(NATO[w] for w in ws) for ws in words]
    needles = [f" The pass key {i + 1} is {p}. ".encode() for i, p in enumerate(phrases)]
    question, spans = b"\nWhat are the pass keys?", []
    for i, phrase in enumerate(phrases):
        question += f"\nPass key {i + 1}: ".encode()
        spans.append((len(question), len(question) + len(phrase)))
        question += phrase.encode() + b"."
    return needles, question, spans


def passkey_overhead(n_keys, n_words):
    """The most bytes the needles and the question can take (the longest words)."""
    longest = NATO.index(max(NATO, key=len))
    needles, question, _ = _passkey_parts(np.full((n_keys, n_words), longest))
    return sum(map(len, needles)) + len(question)


def passkey(rng, seq_len, args):
    needles, question, spans = _passkey_parts(rng.choice(len(NATO), (args.n_keys,
                                                                     args.n_words)))
    n_filler = seq_len + 1 - sum(map(len, needles)) - len(question)
    filler_u8 = args.filler_u8
    start = rng.integers(0, len(filler_u8) - n_filler)
    filler = filler_u8[start:start + n_filler].tobytes()
    cuts = np.sort((rng.uniform(*DEPTH_RANGE, args.n_keys) * n_filler).astype(int))
    order = rng.permutation(args.n_keys)   # which key hides at which depth
    text, prev = b"", 0
    for cut, key in zip(cuts, order):
        text += filler[prev:cut] + needles[key]
        prev = cut
    text += filler[prev:]
    offset = len(text)
    text += question
    tokens = np.frombuffer(text, np.uint8).astype(np.int64)
    mask = np.zeros(seq_len, np.float32)
    for begin, end in spans:  # target index t predicts token t + 1
        mask[offset + begin - 1:offset + end - 1] = 1
    return tokens, mask


TASKS = {"induction": induction, "selective_copy": selective_copy, "mqar": mqar,
         "passkey": passkey}


# ----------------------------------------------------------------------------- checks

def min_seq_len(name, args):
    """The shortest seq_len the task can be laid out in."""
    if name == "induction":
        return 3
    if name == "selective_copy":
        return 2 * args.n_copy
    if name == "mqar":
        return 4 * args.n_pairs
    return passkey_overhead(args.n_keys, args.n_words) + 64


def check(name, args, seq_len, what="train.seq_len"):
    """One-line ConfigError for a task name, vocabulary or length that cannot work."""
    if name not in TASKS:
        raise ConfigError(f"data.source: unknown synthetic task {name!r}; use "
                          f"synthetic:NAME with NAME one of {', '.join(TASKS)}")
    vocab = args.vocab_size
    for field in ("n_copy", "n_pairs", "n_keys", "n_words"):
        if int(args[field]) < 1:
            raise ConfigError(f"data.synthetic.{field}={args[field]} must be positive")
    need = {"induction": 3, "selective_copy": 3, "mqar": 2 * args.n_pairs + 2,
            "passkey": 256}[name]
    if (vocab != 256) if name == "passkey" else (vocab < need):
        rule = "exactly 256 (bytes)" if name == "passkey" else f"at least {need}"
        raise ConfigError(f"model.vocab_size={vocab}: the {name} task needs {rule}")
    shortest = min_seq_len(name, args)
    if seq_len < shortest:
        raise ConfigError(f"{what}={seq_len} is too short for {name} with these "
                          f"data.synthetic settings: it needs at least {shortest}")
    warm, warm_steps = warmup(args)
    if warm < 0 or warm_steps < 0:
        raise ConfigError(f"data.synthetic.warmup_len={warm} and warmup_steps={warm_steps} "
                          f"must be >= 0")
    if warm and not shortest <= warm <= seq_len:
        raise ConfigError(f"data.synthetic.warmup_len={warm} must lie between {shortest} "
                          f"(the shortest {name} example) and {what}={seq_len}")


# ----------------------------------------------------------------------------- batches

class TaskArgs(dict):
    """The task's settings (attribute access): data.synthetic plus the vocabulary and,
    for passkey, the filler bytes of the split."""
    __getattr__ = dict.__getitem__


def task_config(config, task):
    """A run config's view as a `task` run: its data.synthetic settings over the
    defaults (DEFAULTS; all of them for a model trained on something else) and its
    vocabulary, for evaluating or probing a trained model on the task."""
    from ml_collections import ConfigDict
    settings = {**DEFAULTS, **config.data.get("synthetic", ConfigDict()).to_dict()}
    return ConfigDict({"data": {"source": f"synthetic:{task}", "synthetic": settings},
                       "model": {"vocab_size": config.model.vocab_size}})


def task_args(config, split=None):
    """TaskArgs of a run config; with a split, passkey's filler bytes of that split."""
    args = TaskArgs(config.data.synthetic.to_dict(), vocab_size=int(config.model.vocab_size))
    if split is not None and task_name(config) == "passkey":
        args["filler_u8"] = filler_bytes(split)
    return args


@functools.lru_cache(maxsize=2)
def filler_bytes(split):
    """Filler text for passkey: the stdlib corpus's train split, or its val split."""
    from jaxmix.data.corpus import load_corpus
    corpus = load_corpus("stdlib", 0.02)
    return corpus.train_u8 if split == "train" else corpus.val_u8


def task_name(config):
    return config.data.source[len("synthetic:"):]


def step_len(args, seq_len, index):
    """The example length of training batch `index` (0-based): `warmup_len` for the
    first `warmup_steps` batches when set, else seq_len."""
    warm, warm_steps = warmup(args)
    return warm if warm and index < warm_steps else seq_len


def make_batch(name, args, seq_len, seed, split, step, rows):
    """{"tokens": int32 [len(rows), seq_len + 1], "loss_mask": float32 [len(rows), seq_len]}."""
    fn = TASKS[name]
    made = [fn(rng_for(seed, split, step, r), seq_len, args) for r in rows]
    return {"tokens": np.stack([t for t, _ in made]).astype(np.int32),
            "loss_mask": np.stack([m for _, m in made])}
