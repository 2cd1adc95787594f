"""Sampling from a jaxmix LM on the command line; the sampling itself (one jit'd
prefill, then a jit'd `lax.scan` over new tokens) is jaxmix.sampling, re-exported here.

The cache is the LM's decode cache (one entry per layer): Mamba layers carry their
conv window and [B, D, N] SSM state (constant memory per token), attention layers a
KV cache preallocated for prompt + new tokens (a ring of sink + window slots for
sliding-window layers and DuoAttention's streaming heads). A full KV cache that the
prompt and the new tokens would overflow (more than the layer's max_cache_len) is an
error before anything runs. The prompt can be prefilled in chunks (`prefill_chunk`).

  python -m jaxmix.generate --workdir runs/mamba_lm --prompt "def "
  python -m jaxmix.generate --workdir runs/passkey --duo runs/passkey/duo_heads.json \
      --sparsity 0.5 --prompt "..."
"""
import os
import sys

import jax
import numpy as np

from jaxmix import cli, models, workdir
from jaxmix.errors import ConfigError
from jaxmix.sampling import (  # noqa: F401  (the library, re-exported)
    check_decode_length, check_sampling, decode_bytes, encode_bytes, encode_prompt,
    generate, init_cache, make_decode, make_prefill, sample_logits, sample_text)


# ----------------------------------------------------------------------------- CLI

def _tokenizer(workdir):
    """The tokenizer in WORKDIR/tokenizer (copied there from a converted Hugging Face
    checkpoint or a prepared corpus), or None when there is no such folder."""
    from jaxmix.data.tokenizer import load_tokenizer
    path = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(path):
        return None
    return load_tokenizer(path, field=f"--workdir {workdir}")


def set_max_cache_len(model_cfg, n):
    """Sets max_cache_len of every model.mixers entry that has one (in place)."""
    for entry in model_cfg.mixers.values():
        if "max_cache_len" in entry:
            entry.max_cache_len = n


def load_for_decoding(a):
    """(model, params, config) of the CLI's workdir, with its --max_cache_len and --duo
    settings applied."""
    model, params, config = workdir.load_workdir(a.workdir)
    model_cfg = models.normalize_config(config.model)
    if a.max_cache_len is not None:
        set_max_cache_len(model_cfg, a.max_cache_len)
    model_cfg, params, _ = cli.duo_deploy(a, model_cfg, params, config.train.get("seq_len"))
    config.model = model_cfg
    return models.build(model_cfg), params, config


def build_parser():
    p = cli.Parser("python -m jaxmix.generate", "Sample text from a jaxmix workdir's "
                   "language model (its tokenizer, or bytes).")
    p.add_argument("--workdir", type=cli.path, required=True,
                   help="a train.py workdir, or one made by `python -m jaxmix.convert`")
    p.add_argument("--prompt", default="",
                   help="the text to continue; an empty prompt starts from a newline")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=200,
                   help="tokens to generate")
    p.add_argument("--temperature", type=cli.nonneg_float, default=1.0,
                   help="sampling temperature; 0 is greedy decoding")
    p.add_argument("--top_k", type=cli.nonneg_int, default=0,
                   help="sample from the k most likely tokens only; 0 = all")
    p.add_argument("--top_p", type=cli.probability, default=1.0,
                   help="nucleus sampling: the smallest set of tokens holding this much "
                   "probability; 1 = all")
    p.add_argument("--seed", type=cli.integer, default=0, help="sampling seed")
    p.add_argument("--max_cache_len", type=cli.positive_int, default=None,
                   help="tokens a full KV cache may hold (default: the model's own)")
    p.add_argument("--prefill_chunk", type=cli.positive_int, default=None,
                   help="prefill the prompt in chunks of this many tokens (default: in "
                   "one piece)")
    cli.add_duo_args(p)
    return p


def check_args(a):
    """Everything about the arguments that can be checked before loading the model:
    the workdir, the DuoAttention flags, a tokenizer for a non-byte vocabulary."""
    config = workdir.open_workdir(a.workdir)
    cli.check_duo_args(a)
    vocab = int(config.model.vocab_size)
    if vocab != 256 and _tokenizer(a.workdir) is None:
        raise ConfigError(f"--workdir {a.workdir}: vocab_size={vocab} needs a tokenizer in "
                          f"{os.path.join(a.workdir, 'tokenizer')}; convert from a Hugging "
                          f"Face directory that holds tokenizer.json, or put the tokenizer "
                          f"the model was trained with (its tokenizer.json) there")
    if a.top_k > vocab:
        cli.warn(f"--top_k={a.top_k} is more than the model's {vocab} tokens; sampling "
                 f"from all of them")


def run(a):
    check_args(a)
    model, params, config = load_for_decoding(a)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
              top_k=a.top_k or None, top_p=a.top_p, rng=jax.random.PRNGKey(a.seed),
              prefill_chunk=a.prefill_chunk)
    tok = _tokenizer(a.workdir)
    if tok is None:
        text = sample_text(model, params, a.prompt, **kw)
    else:
        ids = encode_prompt(tok, a.prompt, config.model.vocab_size)
        text = tok.decode(np.asarray(generate(model, params, ids, **kw))[0])
    print(a.prompt + text)


def main(argv=None):
    return cli.main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
