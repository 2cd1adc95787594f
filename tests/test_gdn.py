"""The Gated DeltaNet mixer: shapes, segment resets, cached decoding, bad input; packed
documents in it and in Mixture-of-Memories (the short convs too)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_decode_matches_forward

from jaxmix import models
from jaxmix.errors import ConfigError
from jaxmix.mixers.gdn import GatedDeltaNet
from jaxmix.mixers.mom import MoM

B, L, D = 2, 13, 32


def mixer_cfg(**kw):
    base = dict(GatedDeltaNet.DEFAULTS, d_model=D, n_layers=2, dtype="float32",
                norm_eps=1e-5, n_heads=2, chunk_size=4)
    base.update(kw)
    return ml_collections.FrozenConfigDict(base)


def init(m, x):
    return nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), x)["params"])


@pytest.mark.parametrize("kw", [dict(), dict(expand_v=2.0, head_dim=8, n_heads=4)])
def test_cached_decoding_equals_full_forward(kw):
    m = GatedDeltaNet(mixer_cfg(**kw))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, D))
    params = init(m, x)
    assert_decode_matches_forward(m, params, x, m.init_cache(B, 0, jnp.float32), prefill=6)


def test_lm_with_gdn_layers_and_a_segment_reset_in_the_state():
    c = models.default_mixers()
    c["gdn"].update(n_heads=2, chunk_size=8)
    model = models.build(dict(family="lm", d_model=D, n_layers=2, vocab_size=64, d_ff=0,
                              mixer_pattern=("gdn", "attention"), mixers=c))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 16), 0, 64)
    params = init(model, tokens)
    logits, aux = jax.jit(model.apply)({"params": params}, tokens)
    assert logits.shape == (1, 16, 64) and aux == {}
    m = GatedDeltaNet(mixer_cfg())  # the short convs (d_conv = 4) stop there too
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 12, D))
    p = init(m, x)
    seg = jnp.asarray([[0] * 5 + [1] * 7])
    apply = jax.jit(lambda p, x, seg: m.apply({"params": p}, x, segment_ids=seg)[0])
    packed, alone = apply(p, x, seg), apply(p, x[:, 5:], None)
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5, rtol=0)


def test_mom_packed_documents_equal_documents_alone():
    """Mixture-of-Memories: segment ids keep the short convs (d_conv = 4) and the state
    of every compacted per-memory stream inside each of three packed documents: each
    gets the outputs it gets alone."""
    m = MoM(ml_collections.FrozenConfigDict(dict(MoM.DEFAULTS, **mixer_cfg(), n_memories=2,
                                                 top_k=1)))
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 18, D))
    seg = np.repeat(np.arange(3, dtype=np.int32), 6)[None]

    @jax.jit
    def run(x):                      # init and both calls in one program: one compile
        p = m.init(jax.random.PRNGKey(0), x)["params"]
        packed = m.apply({"params": p}, x, segment_ids=seg)[0]
        return packed, m.apply({"params": p}, x.reshape(3, 6, D))[0].reshape(1, 18, D)

    packed, alone = run(x)
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields, needle", [
    (dict(n_heads=3), "n_heads=3 does not divide d_model=32"),
    (dict(expand_v=0.3), "is not a positive whole number"),
    (dict(delta_impl="pallas", chunk_size=12), "chunk_size=12 must be a multiple of 8 with "
                                               "delta_impl='pallas'"),
    (dict(delta_impl="triton"), "delta_impl='triton': use one of"),
])
def test_bad_config(fields, needle):
    c = models.default_mixers()
    c["gdn"].update(fields)
    with pytest.raises(ConfigError, match=needle):
        models.build(dict(family="lm", d_model=D, n_layers=1, vocab_size=64, d_ff=0,
                          mixer_pattern=("gdn",), mixers=c))
