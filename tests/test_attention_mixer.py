"""The attention mixer: shapes, causality, GQA, rotary embeddings, packing, KV cache."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxmix import mixers, models
from jaxmix.errors import ConfigError
from jaxmix.mixers.attention import Attention, rotary


def mixer_cfg(**kw):
    base = dict(Attention.DEFAULTS, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=0, rope_theta=10000.0, sliding_window=0, attn_impl="xla",
                dtype="float32", max_cache_len=16)
    base.update(kw)
    return ml_collections.FrozenConfigDict(base)


def init_mixer(cfg, x):
    m = Attention(cfg)
    return m, nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), x)["params"])


def apply(m, params, x, **kw):
    """m.apply under jit (the blocked attention is slow op by op)."""
    return jax.jit(lambda p, x, kw: m.apply({"params": p}, x, **kw))(params, x, kw)


def test_shapes_names_and_registry():
    assert mixers.get("attention") is Attention
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 32))
    m, params = init_mixer(mixer_cfg(), x)
    y, cache, aux = apply(m, params, x)
    chex.assert_shape(y, (2, 11, 32))
    assert cache is None and aux == {}
    chex.assert_shape(params["q_proj"]["kernel"], (32, 4 * 8))
    chex.assert_shape(params["k_proj"]["kernel"], (32, 2 * 8))
    chex.assert_shape(params["v_proj"]["kernel"], (32, 2 * 8))
    chex.assert_shape(params["o_proj"]["kernel"], (4 * 8, 32))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        Attention(mixer_cfg(n_kv_heads=3)).init(jax.random.PRNGKey(0), x)


def test_is_causal():
    """d y_t / d x_s is exactly zero for every s > t, and nonzero for s <= t."""
    length = 9
    x = jax.random.normal(jax.random.PRNGKey(2), (1, length, 32))
    m, params = init_mixer(mixer_cfg(), x)
    jac = jax.jit(jax.jacrev(lambda x: m.apply({"params": params}, x)[0]))(x)
    per_pair = jnp.abs(jac[0, :, :, 0]).sum(axis=(1, 3))  # [t, s]
    future = np.triu(np.ones((length, length), bool), k=1)
    assert float(per_pair[future].max()) == 0.0
    assert float(per_pair[~future].min()) > 0.0


def test_gqa_equals_mha_with_repeated_kv():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 10, 32))
    m, params = init_mixer(mixer_cfg(n_kv_heads=1), x)
    mha = Attention(mixer_cfg(n_kv_heads=4))
    rep = lambda w: jnp.tile(w.reshape(32, 1, 8), (1, 4, 1)).reshape(32, 32)
    mha_params = dict(params, k_proj={"kernel": rep(params["k_proj"]["kernel"])},
                      v_proj={"kernel": rep(params["v_proj"]["kernel"])})
    y = apply(m, params, x)[0]
    y_mha = apply(mha, mha_params, x)[0]
    np.testing.assert_allclose(y, y_mha, atol=1e-5, rtol=1e-5)


def test_rotary_half_split_and_relative():
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 3, 1, 8))
    pos = jnp.arange(3)[None]
    y = rotary(x, pos, 10000.0)
    # position 1, pair (0, 4) rotates by angle 1 * theta^0 = 1 radian
    c, s = np.cos(1.0), np.sin(1.0)
    np.testing.assert_allclose(y[0, 1, 0, 0], x[0, 1, 0, 0] * c - x[0, 1, 0, 4] * s, rtol=1e-5)
    np.testing.assert_allclose(y[0, 1, 0, 4], x[0, 1, 0, 4] * c + x[0, 1, 0, 0] * s, rtol=1e-5)
    np.testing.assert_allclose(y[0, 0], x[0, 0])
    # attention scores depend only on relative positions: shifting all positions is a no-op
    xs = jax.random.normal(jax.random.PRNGKey(5), (1, 7, 32))
    m, params = init_mixer(mixer_cfg(), xs)
    base = apply(m, params, xs)[0]
    shifted = apply(m, params, xs, positions=jnp.arange(7)[None] + 11)[0]
    np.testing.assert_allclose(base, shifted, atol=1e-4, rtol=1e-4)


def test_packed_segments_equal_separate_documents():
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 12, 32))
    m, params = init_mixer(mixer_cfg(), x)
    seg = jnp.asarray([[0] * 5 + [1] * 7])
    pos = jnp.asarray([list(range(5)) + list(range(7))])
    packed = apply(m, params, x, segment_ids=seg, positions=pos)[0]
    first = apply(m, params, x[:, :5])[0]
    second = apply(m, params, x[:, 5:])[0]
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 3])
def test_kv_cache_decoding_matches_full_forward(window):
    cfg = mixer_cfg(sliding_window=window)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 9, 32))
    m, params = init_mixer(cfg, x)
    full = apply(m, params, x)[0]
    step = jax.jit(lambda x, cache: m.apply({"params": params}, x, cache=cache, decode=True))
    y, cache = step(x[:, :5], None)[:2]  # prefill allocates max_cache_len = 16 slots
    chex.assert_shape(cache["k"], (2, window or 16, 2, 8))  # a window keeps a W-slot ring
    outs = [y]
    for t in range(5, 9):
        y, cache = step(x[:, t:t + 1], cache)[:2]
        outs.append(y)
    assert int(cache["index"]) == 9
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_reference_impl_and_lm_patterns():
    x = jax.random.normal(jax.random.PRNGKey(8), (1, 8, 32))
    m, params = init_mixer(mixer_cfg(sliding_window=4), x)
    y_xla = apply(m, params, x)[0]
    y_ref = apply(Attention(mixer_cfg(sliding_window=4, attn_impl="reference")), params, x)[0]
    np.testing.assert_allclose(y_xla, y_ref, atol=1e-5, rtol=1e-5)
    for pattern in (("attention",), ("mamba", "mamba", "attention")):
        cfg = dict(family="lm", d_model=32, n_layers=3 if len(pattern) == 3 else 2,
                   vocab_size=256, mixer_pattern=pattern, d_state=4, expand=2, d_ff=64,
                   n_heads=2, n_kv_heads=1, attn_impl="xla", scan_impl="xla")
        model = models.build(cfg)
        tokens = jnp.zeros((2, 8), jnp.int32)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
        logits, aux = jax.jit(model.apply)(variables, tokens)
        chex.assert_shape(logits, (2, 8, 256))
        chex.assert_tree_all_finite(logits)
