"""Synthetic recall tasks (jaxmix.data.synthetic) at the papers' model sizes, for a CPU.

  python train.py --config configs/synthetic.py:TASK[-MIXER] [--config.a.b=value ...]

TASK is `induction`, `selective_copy`, `mqar` or `passkey`; MIXER is `mamba` (the
default), `attention`, `gdn` (Gated DeltaNet) or `mom` (mixture-of-memories).
Constant learning rate after a 100-step warm-up, fresh examples every step, accuracy on
the scored targets at every evaluation.
`data.synthetic.warmup_len` / `warmup_steps` make the first steps' examples shorter
(a length warm-up; validation stays at train.seq_len).
- induction (Mamba paper): vocab 16, trained at length 256, no MLPs; Mamba 2 layers
  d_model 64; attention 2 layers d_model 128, 8 heads, RoPE (the paper's sizes).
  Adam without weight decay, 7,500 steps of 32 (16 minutes on 2 cores). Learning rate
  6e-3, not the paper's 1e-3 for Mamba: a larger rate learns the slow state decay that
  carries the copied symbol over long noise sooner (after 7,500 steps the Mamba model
  holds 100% to 65536 tokens with 6e-3, to 8192 with 3e-3; after 3,000 steps, 68.8%
  at 4096 with 1e-3). The attention preset trains with a length warm-up (500 steps
  at 64 tokens, then 2,000 at 256, learning rate 1e-3 with a cosine decay): trained at
  256 from the start it stayed at chance for 7,000 steps.
- selective_copy (Mamba paper): vocab 16, 16 tokens to copy, length 1024, 2 layers
  d_model 64 (attention d_model 128, 8 heads).
- mqar (Zoology): 2 layers without MLPs, d_model 64 (--config.model.d_model=128 for
  the other column), L 256 with 16 pairs; --config.train.seq_len=512
  --config.data.synthetic.n_pairs=64 for the harder setting; attention with 2 heads,
  gdn and mom with 2 delta-rule heads of d_model / 2 (mom: 4 memories, top 2, shared).
  Zoology's vocabulary is 8,192; 256 here keeps the output layer cheap on a CPU
  (keys from [1, 128), values from [128, 256), so they never collide).
- passkey (DuoAttention's generator at byte level): 2 passkeys of 3 NATO words in
  1,024 bytes of stdlib filler; a Llama-style byte model (RoPE, SwiGLU MLP), 4 layers
  d_model 128. Trained in three stages, each from the previous one's workdir
  (--config.init_from=<workdir>): `passkey_warmup` (one key of one word in 160 bytes),
  `passkey_short` (2 keys of 3 words in 320 bytes), then `passkey`.

`--config.model.mixer_pattern='("attention",)'` (or '("mamba",)') switches the mixer
of any preset and keeps its sizes; the MIXER suffix also sets the paper's sizes.
`python -m jaxmix.evaluate --workdir W --lengths 256,512,...` measures the accuracy
across lengths.
"""
import ml_collections

from jaxmix import config_files
from jaxmix.data import synthetic

TASKS = ("induction", "selective_copy", "mqar", "passkey")
MIXERS = ("mamba", "attention", "gdn", "mom")


def _transformer_lm():
    return config_files.sibling(__file__, "transformer_lm.py")


def set_heads(c, **fields):
    _transformer_lm().set_heads(c, **fields)


def set_memory_heads(c, **fields):
    config_files.sibling(__file__, "mom_lm.py").set_memory_heads(c, **fields)


def base_config():
    c = _transformer_lm().base_config()
    c.model.update(mixer_pattern=("mamba",), n_layers=2, d_model=64, d_ff=0, vocab_size=16)
    set_heads(c, n_heads=8, n_kv_heads=8)
    c.train.update(steps=7500, decay_steps=0, batch_size=32, seq_len=256,
                   learning_rate=3e-3, warmup_steps=100, min_lr_ratio=1.0, weight_decay=0.0,
                   log_every=50, eval_every=500, eval_batches=4, checkpoint_every=500)
    c.data.source = "synthetic:induction"
    c.data.synthetic = ml_collections.ConfigDict(synthetic.DEFAULTS)
    # Delta-rule memories (gdn, mom): 2 heads of d_model / 2, chunks of 32; MoM keeps the
    # paper's 4 memories, top 2 and a shared memory.
    set_memory_heads(c, n_heads=2, chunk_size=32)
    c.sample_at_end = False
    return c


def set_task(c, task):
    c.data.source = f"synthetic:{task}"
    if task == "induction":
        c.train.learning_rate = 6e-3
    elif task == "selective_copy":
        c.train.update(seq_len=1024, batch_size=16)
    elif task == "mqar":
        c.model.vocab_size = 256
        set_heads(c, n_heads=2, n_kv_heads=2)
        c.train.update(batch_size=32, learning_rate=2e-3, weight_decay=0.1)
    elif task == "passkey":
        c.model.update(vocab_size=256, n_layers=4, d_model=128, d_ff=256)
        set_heads(c, n_heads=4, n_kv_heads=4)
        c.train.update(seq_len=1024, batch_size=16, learning_rate=2e-3, weight_decay=0.1,
                       steps=200, eval_every=50, checkpoint_every=100)


def set_mixer(c, mixer, task):
    c.model.mixer_pattern = (mixer,)
    if mixer == "attention" and task in ("induction", "selective_copy"):
        c.model.d_model = 128
        set_heads(c, n_heads=8, n_kv_heads=8)
    if mixer == "attention" and task == "induction":
        # A length warm-up: 500 steps at 64 tokens form the induction head (its
        # gradient at 256 tokens is too diluted over the context to start in minutes),
        # then 2,000 steps at 256 with a cosine decay to 1e-4.
        c.data.synthetic.update(warmup_len=64, warmup_steps=500)
        c.train.update(steps=2500, learning_rate=1e-3, decay_steps=2500, min_lr_ratio=0.1)


# The passkey curriculum's first stages: (data.synthetic fields, seq_len), 1,000 steps
# each. At 1,024 bytes from scratch the retrieval is too diluted to start learning in an
# hour here; each stage starts from the previous one's workdir (--config.init_from).
PASSKEY_STAGES = {
    "passkey_warmup": (dict(n_keys=1, n_words=1), 160),   # one key of one word
    "passkey_short": ({}, 320),                           # the full task, in 320 bytes
}


def passkey_stage(c, stage):
    fields, seq_len = PASSKEY_STAGES[stage]
    c.data.synthetic.update(fields)
    c.train.update(seq_len=seq_len, steps=1000, eval_every=100, checkpoint_every=500)


def get_config(preset="induction"):
    task, _, mixer = (preset or "induction").partition("-")
    mixer = mixer or "mamba"
    if task not in TASKS + tuple(PASSKEY_STAGES) or mixer not in MIXERS:
        raise ValueError(f"unknown preset {preset!r}; use TASK or TASK-MIXER with TASK in "
                         f"{', '.join(TASKS + tuple(PASSKEY_STAGES))} and MIXER in "
                         f"{', '.join(MIXERS)}")
    c = base_config()
    set_task(c, "passkey" if task in PASSKEY_STAGES else task)
    set_mixer(c, mixer, task)
    if task in PASSKEY_STAGES:
        passkey_stage(c, task)
    return c
