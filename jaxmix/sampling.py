"""Sampling from a jaxmix LM: one jit'd prefill, then a jit'd `lax.scan` over new tokens
(the library under `python -m jaxmix.generate` and the training loop's samples).

The cache is the LM's decode cache (one entry per layer), preallocated for prompt +
new tokens; the prompt can be prefilled in chunks (`prefill_chunk`)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmix import models
from jaxmix.errors import ConfigError
from jaxmix.nn import compute_dtype


# ----------------------------------------------------------------------------- sampling

def sample_logits(logits_BV, key, temperature=1.0, top_k=None, top_p=None):
    """One token per row: argmax when temperature == 0, else a draw from the filtered
    softmax(logits / temperature) (top-k, then nucleus top-p)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly above each
        keep_B = jnp.maximum(jnp.sum(before_BV < top_p, axis=-1), 1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, keep_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- cache

def init_cache(model, batch, max_len):
    """The decode cache before the prompt, one entry per layer, each mixer's
    `init_cache(batch, max_len, dtype)`: KV caches are preallocated for `max_len` tokens,
    recurrent states have a fixed size."""
    return [cls(mixer_cfg).init_cache(batch, max_len, compute_dtype(mixer_cfg))
            for _, cls, mixer_cfg in models.layer_mixers(model.cfg)]


def check_decode_length(model, total):
    """ConfigError (one line) if `total` tokens overflow a layer's full KV cache."""
    for _, cls, mixer_cfg in models.layer_mixers(model.cfg):
        if hasattr(cls, "check_decode_length"):
            cls(mixer_cfg).check_decode_length(total)


# ----------------------------------------------------------------------------- jit'd parts

@functools.lru_cache(maxsize=32)
def make_prefill(model):
    """jit'd (params, prompt_BL, cache) -> (last logits [B, V], cache after the prompt)."""
    def prefill(params, prompt_BL, cache):
        logits, _, cache = model.apply({"params": params}, prompt_BL, decode=True, cache=cache)
        return logits[:, -1, :model.cfg.vocab_size], cache
    return jax.jit(prefill)


@functools.lru_cache(maxsize=32)
def make_decode(model, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
    """jit'd (params, logits_BV, cache, rng) -> new tokens [B, max_new_tokens].

    Samples the first token from the prefill's logits, then a `lax.scan` of
    max_new_tokens - 1 single-token steps carrying (cache, token)."""
    vocab = model.cfg.vocab_size
    pick = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def decode(params, logits_BV, cache, rng):
        keys = jax.random.split(rng, max_new_tokens)
        first_B = pick(logits_BV, keys[0])

        def step(carry, key):
            cache, tok_B = carry
            logits, _, cache = model.apply({"params": params}, tok_B[:, None], decode=True,
                                           cache=cache)
            nxt_B = pick(logits[:, -1, :vocab], key)
            return (cache, nxt_B), nxt_B

        _, rest_TB = jax.lax.scan(step, (cache, first_B), keys[1:])
        return jnp.concatenate([first_B[:, None], rest_TB.T], axis=1)
    return jax.jit(decode)


def check_sampling(temperature, top_k, top_p, max_new_tokens):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be positive (or None/0 for no top-k)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def generate(model, params, prompt_BL, *, max_new_tokens, temperature=1.0, top_k=None,
             top_p=None, rng=None, prefill_chunk=None):
    """New tokens int32 [B, max_new_tokens] continuing `prompt_BL` (int [B, L], L >= 1).

    temperature=0.0 is greedy decoding; top_k / top_p filter the sampled distribution.
    Tokens are drawn from the real vocabulary only (never the padding rows). The prompt
    is prefilled in chunks of `prefill_chunk` tokens (default: in one piece)."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be positive")
    prompt_BL = jnp.asarray(prompt_BL, jnp.int32)
    if prompt_BL.ndim != 2 or prompt_BL.shape[1] < 1:
        raise ValueError(f"prompt_BL has shape {prompt_BL.shape}; want [batch, length >= 1]")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    top_k = min(int(top_k), model.cfg.vocab_size) if top_k else None
    top_p = float(top_p) if top_p is not None and top_p < 1.0 else None
    batch, length = prompt_BL.shape
    check_decode_length(model, length + max_new_tokens)
    cache = init_cache(model, batch, length + max_new_tokens)
    chunk = prefill_chunk or length
    for start in range(0, length, chunk):
        logits_BV, cache = make_prefill(model)(params, prompt_BL[:, start:start + chunk], cache)
    decode = make_decode(model, int(max_new_tokens), float(temperature), top_k, top_p)
    return decode(params, logits_BV, cache, rng)


# ----------------------------------------------------------------------------- text

def encode_bytes(prompt):
    """A byte-level prompt [1, L] (an empty prompt starts from a newline)."""
    data = prompt.encode("utf-8") or b"\n"
    return np.frombuffer(data, np.uint8).astype(np.int32)[None, :]


def decode_bytes(tokens):
    return bytes(np.asarray(tokens, np.int64).clip(0, 255).astype(np.uint8)).decode(
        "utf-8", "replace")


def sample_text(model, params, prompt, max_new_tokens, **kw):
    """Continues the text `prompt` with a byte-level model; returns only the new text."""
    if model.cfg.vocab_size != 256:
        raise ConfigError(f"sample_text: model.vocab_size={model.cfg.vocab_size} is not a "
                          f"byte-level vocabulary (256); tokenize yourself and call generate()")
    out = generate(model, params, encode_bytes(prompt), max_new_tokens=max_new_tokens, **kw)
    return decode_bytes(np.asarray(out)[0])


def encode_prompt(tok, prompt, vocab_size):
    """The prompt's ids [1, L] with the tokenizer's special tokens (an empty prompt
    starts from a newline); ConfigError if an id is outside the model's vocabulary."""
    ids = tok.encode(prompt or "\n", add_special_tokens=True)
    if len(ids) == 0:
        raise ConfigError(f"--prompt {prompt!r} encodes to no tokens; give a longer prompt")
    if int(ids.max()) >= vocab_size:
        raise ConfigError(f"--prompt: token id {int(ids.max())} of the workdir's tokenizer "
                          f"is outside the model's vocabulary ({vocab_size}); the tokenizer "
                          f"folder does not belong to this model")
    return np.asarray(ids, np.int32)[None, :]
