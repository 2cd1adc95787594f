"""KV caches past their end: sliding-window rings, sink slots, full-cache overflow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmix import generate as gen
from jaxmix import models
from jaxmix.errors import ConfigError
from jaxmix.mixers import kv_cache
from masks import masked_attend


def lm(**attention):
    cfg = dict(family="lm", d_model=32, n_layers=2, vocab_size=256, d_ff=64,
               mixer_pattern=("attention",), dtype="float32",
               mixers={"attention": dict(models.default_mixers("attention")["attention"],
                                         n_heads=4, n_kv_heads=2, attn_impl="xla",
                                         **attention)})
    model = models.build(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    return model, params


def decode_all(model, params, tokens_BL, prefill, max_len):
    """Logits of every position: prefill `prefill` tokens, then one token per step."""
    step = jax.jit(lambda c, t: model.apply(params, t, decode=True, cache=c))
    cache = gen.init_cache(model, tokens_BL.shape[0], max_len)
    logits, _, cache = step(cache, tokens_BL[:, :prefill])
    outs = [logits]
    for t in range(prefill, tokens_BL.shape[1]):
        logits, _, cache = step(cache, tokens_BL[:, t:t + 1])
        outs.append(logits)
    return jnp.concatenate(outs, 1), cache


def test_ring_slot_positions_follow_the_written_tokens():
    n, sink = 6, 2
    for index in range(20):
        pos = np.asarray(kv_cache.slot_positions(index, n, sink))
        expect = {p for p in range(index) if p < sink or p >= max(sink, index - (n - sink))}
        assert set(int(p) for p in pos if p != kv_cache.EMPTY) == expect
        for slot, p in enumerate(pos):
            if p != kv_cache.EMPTY:
                assert int(kv_cache.slot_of(jnp.int32(p), n, sink)) == slot


@pytest.mark.parametrize("sink", [pytest.param(0, marks=pytest.mark.exhaustive), 3])
def test_sliding_window_decoding_past_three_windows(sink):
    window, length = 5, 3 * 5 + 4
    model, params = lm(sliding_window=window, sink=sink, max_cache_len=8)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, length), 0, 256)
    full = jax.jit(model.apply)(params, tokens)[0]
    decoded, cache = decode_all(model, params, tokens, 3, max_len=8)
    assert cache[0]["k"].shape[1] == sink + window  # a ring, whatever the length
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)
    # chunks longer than the ring are exact too (attend over cache + chunk, then write)
    step = jax.jit(lambda c, t: model.apply(params, t, decode=True, cache=c))
    cache = gen.init_cache(model, 2, 8)
    outs = []
    for start in (0, 7, 14):
        logits, _, cache = step(cache, tokens[:, start:start + 7 if start < 14 else length])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_forward_matches_independent_mask():
    """The windowed forward above is itself checked against tests/masks.py."""
    from jaxmix.mixers.attention import Attention
    import ml_collections
    cfg = ml_collections.FrozenConfigDict(dict(
        Attention.DEFAULTS, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, attn_impl="xla",
        dtype="float32", sliding_window=5, sink=3))
    m = Attention(cfg)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 19, 32))
    params = jax.jit(m.init)(jax.random.PRNGKey(0), x)
    got = jax.jit(m.apply)(params, x)[0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Attention, "attend", masked_attend(causal=True, window=5, sink=3))
        want = m.apply(params, x)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_full_cache_overflow_is_nan_inside_jit_and_an_error_up_front():
    model, params = lm(max_cache_len=8)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 10), 0, 256)
    step = jax.jit(lambda c, t: model.apply(params, t, decode=True, cache=c))
    cache = gen.init_cache(model, 1, 8)
    logits, _, cache = step(cache, tokens[:, :8])
    assert np.isfinite(np.asarray(logits)).all()
    logits, _, cache = step(cache, tokens[:, 8:9])  # slot 9 of 8: poisoned, never clamped
    assert np.isnan(np.asarray(logits)).all()
    with pytest.raises(ConfigError, match="max_cache_len=8"):
        gen.generate(model, params["params"], tokens[:, :6], max_new_tokens=3)
    with pytest.raises(ConfigError, match="max_cache_len=8"):
        model.apply(params, tokens, decode=True)  # no cache: max_cache_len slots


def test_kv_bytes_ring_is_constant():
    model, params = lm(sliding_window=4, sink=2)
    sizes = {n: sum(x.nbytes for x in jax.tree.leaves(gen.init_cache(model, 1, n)))
             for n in (64, 4096)}
    assert sizes[64] == sizes[4096]
