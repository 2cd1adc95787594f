"""Mixture-of-Memories: one memory is Gated DeltaNet, routing, decoding, load balance."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_decode_matches_forward

from jaxmix import models, ops
from jaxmix.errors import ConfigError
from jaxmix.mixers.gdn import GatedDeltaNet
from jaxmix.mixers.mom import MoM

B, L, D = 2, 11, 32


def mixer_cfg(cls, **kw):
    base = dict(cls.DEFAULTS, d_model=D, n_layers=2, dtype="float32", norm_eps=1e-5,
                n_heads=2, chunk_size=4)
    base.update(kw)
    return ml_collections.FrozenConfigDict(base)


def init(m, x):
    return nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), x)["params"])


def x_of(seed=1, length=L):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, length, D))


def test_one_memory_top1_no_shared_is_gdn():
    x = x_of()
    gdn = GatedDeltaNet(mixer_cfg(GatedDeltaNet))
    p = init(gdn, x)
    mom = MoM(mixer_cfg(MoM, n_memories=1, top_k=1, shared_memory=False))
    q = init(mom, x)
    mapped = {name: (p[name]["kernel"][None] if name in ("k_proj", "v_proj", "a_proj",
                                                          "b_proj") else p[name])
              for name in p}
    mapped["router"] = q["router"]
    assert set(mapped) == set(q)
    want = jax.jit(gdn.apply)({"params": p}, x)[0]
    got = jax.jit(mom.apply)({"params": mapped}, x)[0]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_querying_each_memory_then_mixing_is_mixing_then_querying():
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    q, k = jax.random.normal(ks[0], (1, 9, 2, 8)), jax.random.normal(ks[1], (2, 9, 2, 8))
    v = jax.random.normal(ks[2], (2, 9, 2, 8))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (2, 9, 2)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (2, 9, 2)))
    w = jnp.asarray([0.3, 0.7])
    qq = jnp.broadcast_to(q, (2,) + q.shape[1:])
    o, states = jax.jit(lambda *a: ops.gated_delta_rule(*a, normalize_qk=False, scale=1.0))(
        qq, k, v, g, beta)
    mixed_outputs = jnp.einsum("m,mhv->hv", w, o[:, -1])
    mixed_state = jnp.einsum("m,mhkv->hkv", w, states)
    np.testing.assert_allclose(jnp.einsum("hkv,hk->hv", mixed_state, q[0, -1]),
                               mixed_outputs, atol=1e-5, rtol=0)


def test_unrouted_memory_is_unchanged_and_the_load_balance_at_uniform_routing():
    """Zero router weights: every token goes to memories 0 and 1 (ties pick the first),
    memories 2 and 3 keep their initial state; the Mixtral-form loss is top_k there."""
    x = x_of()
    m = MoM(mixer_cfg(MoM))
    params = init(m, x)
    params["router"] = jax.tree.map(jnp.zeros_like, params["router"])
    cache = m.init_cache(B, 0, jnp.float32)
    cache["routed"]["state"] = jax.random.normal(jax.random.PRNGKey(5),
                                                 cache["routed"]["state"].shape)
    _, new, aux = jax.jit(lambda p, x, c: m.apply({"params": p}, x, decode=True, cache=c))(
        params, x, cache)
    np.testing.assert_array_equal(new["routed"]["state"][2:], cache["routed"]["state"][2:])
    assert not np.allclose(new["routed"]["state"][:2], cache["routed"]["state"][:2])
    np.testing.assert_allclose(aux["load_balance_loss"], 2.0, rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(shared_memory=False, top_k=1, n_memories=3)])
def test_cached_decoding_equals_full_forward(kw):
    m = MoM(mixer_cfg(MoM, **kw))
    x = x_of(2)
    params = init(m, x)
    assert_decode_matches_forward(m, params, x, m.init_cache(B, 0, jnp.float32), prefill=5)


def test_top_k_larger_than_the_memories():
    c = models.default_mixers()
    c["mom"].update(n_memories=2, top_k=3)
    with pytest.raises(ConfigError, match="top_k=3 is larger than the 2 memories"):
        models.build(dict(family="lm", d_model=D, n_layers=1, vocab_size=64, d_ff=0,
                          mixer_pattern=("mom",), mixers=c))
