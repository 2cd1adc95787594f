"""The Mamba mixer and the LM backbone: shapes, causality, reference init, packed
documents in the bidirectional variants."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxmix import models
from jaxmix.errors import ConfigError
from jaxmix.mixers.bimamba import BiMamba
from jaxmix.mixers.mamba import Mamba
from jaxmix.mixers.mambamixer import MambaMixer


def mixer_cfg(**kw):
    base = dict(Mamba.DEFAULTS, d_model=16, n_layers=2, d_state=4, expand=2, d_conv=4,
                dt_rank=0, scan_impl="xla", dtype="float32")
    base.update(kw)
    return ml_collections.FrozenConfigDict(base)


def init_mixer(cfg, x):
    m = Mamba(cfg)
    params = nn.unbox(m.init(jax.random.PRNGKey(0), x)["params"])
    return m, params


def test_mixer_shapes_and_interface():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 16))
    m, params = init_mixer(mixer_cfg(), x)
    y, cache, aux = m.apply({"params": params}, x)
    chex.assert_shape(y, (2, 11, 16))
    assert cache is None and aux == {}
    chex.assert_shape(params["in_proj"], (16, 2, 32))
    chex.assert_shape(params["x_proj"]["kernel"], (32, 1 + 2 * 4))  # dt_rank = ceil(16/16)
    chex.assert_tree_all_finite(y)


def test_mixer_is_causal():
    """d y_t / d x_s is exactly zero for every s > t."""
    length = 9
    x = jax.random.normal(jax.random.PRNGKey(2), (1, length, 16))
    m, params = init_mixer(mixer_cfg(), x)
    f = lambda x: m.apply({"params": params}, x)[0]
    jac = jax.jacrev(f)(x)  # [1, L, D, 1, L, D]
    per_pair = jnp.abs(jac[0, :, :, 0]).sum(axis=(1, 3))  # [t, s]
    future = np.triu(np.ones((length, length), bool), k=1)
    assert float(per_pair[future].max()) == 0.0
    assert float(per_pair[~future].min()) > 0.0  # and the past does matter


def test_reference_init():
    x = jnp.zeros((1, 4, 64))
    _, params = init_mixer(mixer_cfg(d_model=64, d_state=16), x)
    np.testing.assert_allclose(np.exp(params["A_log"][0]), np.arange(1, 17), rtol=1e-6)
    np.testing.assert_allclose(np.exp(params["A_log"][-1]), np.arange(1, 17), rtol=1e-6)
    np.testing.assert_array_equal(params["D"], 1.0)
    dt = jax.nn.softplus(params["dt_proj_bias"])
    assert float(dt.min()) >= 1e-4 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    r = math.ceil(64 / 16)
    assert float(jnp.abs(params["dt_proj_kernel"]).max()) <= r ** -0.5
    # out_proj: torch Linear init (bound 1/sqrt(fan_in)) divided by sqrt(n_layers=2)
    bound = 1 / math.sqrt(128) / math.sqrt(2)
    assert float(jnp.abs(params["out_proj"]).max()) <= bound


def test_in_proj_init_matches_torch_linear():
    """in_proj [d_model, 2, d_inner] is torch nn.Linear(d_model, 2 d_inner)'s init:
    U(+-1/sqrt(d_model)), standard deviation 1/sqrt(3 d_model) (fan-in d_model, not
    the 2 d_model flax would count for the 3-D shape)."""
    d_model = 256
    _, params = init_mixer(mixer_cfg(d_model=d_model), jnp.zeros((1, 4, d_model)))
    w = np.asarray(params["in_proj"])
    want = 1 / math.sqrt(3 * d_model)
    assert abs(w.std() / want - 1) < 0.05, (w.std(), want)
    assert np.abs(w).max() <= 1 / math.sqrt(d_model)


@pytest.mark.parametrize("cls", [BiMamba, MambaMixer])
def test_bidirectional_mixers_keep_packed_documents_apart(cls):
    """Both directions (the reverse conv and scan too) stop at segment boundaries: each
    of three packed documents gets the outputs it gets alone (the LM-level test,
    tests/test_packing.py, runs the causal mixers)."""
    cfg = ml_collections.FrozenConfigDict(dict(cls.DEFAULTS, **mixer_cfg()))
    m = cls(cfg)
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 21, 16))
    params = nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), x)["params"])
    seg = np.repeat(np.arange(3, dtype=np.int32), 7)[None]

    @jax.jit
    def run(params, x):
        packed = m.apply({"params": params}, x, segment_ids=seg)[0]
        alone = m.apply({"params": params}, x.reshape(3, 7, 16))[0]
        return packed, alone.reshape(1, 21, 16)

    packed, alone = run(params, x)
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=0)


def lm_config(**kw):
    import mamba_lm
    c = mamba_lm.get_config("smoke")
    c.model.update(kw)
    return c.model


def test_lm_logits_and_tied_padded_vocab():
    cfg = lm_config(vocab_size=250)
    model = models.build(cfg)
    tokens = jnp.zeros((2, 7), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    logits, aux = model.apply({"params": params}, tokens)
    chex.assert_shape(logits, (2, 7, 256))  # 250 padded to a multiple of 8
    assert "lm_head" not in params  # tied to the embedding
    assert logits.dtype == jnp.float32 and aux == {}


def test_lm_is_causal():
    model = models.build(lm_config())
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 12), 0, 256)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    base = model.apply({"params": params}, tokens)[0]
    changed = model.apply({"params": params}, tokens.at[0, 8].set((tokens[0, 8] + 1) % 256))[0]
    np.testing.assert_array_equal(base[0, :8], changed[0, :8])
    assert not np.allclose(base[0, 8:], changed[0, 8:])


@pytest.mark.parametrize("pattern, layers, msg", [
    (("nope",), 2, "'nope' has no entry in model.mixers"),
    (("mamba", "mamba", "mamba"), 2, "must divide model.n_layers"),
])
def test_bad_pattern(pattern, layers, msg):
    with pytest.raises(ConfigError, match=msg):
        models.build(lm_config(mixer_pattern=pattern, n_layers=layers))
