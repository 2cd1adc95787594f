"""Mixture-of-Head attention: gates, load balance, cached decoding, dense -> MoH."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jex_core
import numpy as np
import pytest
from conftest import assert_decode_matches_forward

from jaxmix import models
from jaxmix.errors import ConfigError
from jaxmix.mixers.attention import Attention
from jaxmix.mixers.moh import MoH

B, L, D = 2, 12, 32


def mixer_cfg(**kw):
    base = dict(MoH.DEFAULTS, d_model=D, n_layers=2, dtype="float32", n_heads=4,
                n_kv_heads=2, attn_impl="xla", max_cache_len=32, shared_heads=1, top_k=2)
    base.update(kw)
    return ml_collections.FrozenConfigDict(base)


def init(module, x):
    return nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x)["params"])


def run(module, params, x, **kw):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, **kw))(params, x)


def zero_routers(params):
    return {k: (jax.tree.map(jnp.zeros_like, v) if k.startswith("router") else v)
            for k, v in params.items()}


def inputs(seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))


def attention_params(params):
    return {k: v for k, v in params.items() if not k.startswith("router")}


@pytest.mark.parametrize("shared, top_k", [(1, 2), (2, 1), (0, 2)])
def test_zero_routers_give_masked_dense_attention(shared, top_k):
    """Gates all 1 on the shared heads and the top-k routed heads (ties pick the first
    heads): dense attention whose o_proj sees only those heads."""
    cfg = mixer_cfg(shared_heads=shared, top_k=top_k)
    x = inputs()
    params = zero_routers(init(MoH(cfg), x))
    y = run(MoH(cfg), params, x)[0]
    hd = D // cfg.n_heads
    active = np.zeros(cfg.n_heads, bool)
    active[:shared + top_k] = True
    dense = dict(attention_params(params))
    w_o = np.asarray(dense["o_proj"]["kernel"]).reshape(cfg.n_heads, hd, D) * active[:, None, None]
    dense["o_proj"] = {"kernel": jnp.asarray(w_o.reshape(-1, D))}
    want = run(Attention(cfg), dense, x)[0]
    np.testing.assert_allclose(y, want, atol=1e-6, rtol=0)


def test_all_shared_heads_with_constant_gates_is_mha():
    cfg = mixer_cfg(shared_heads=4, top_k=0)
    x = inputs()
    params = zero_routers(init(MoH(cfg), x))
    assert set(params) == {"q_proj", "k_proj", "v_proj", "o_proj", "router_shared"}
    y, _, aux = run(MoH(cfg), params, x)
    assert aux == {}  # no routed heads: no load balance
    np.testing.assert_allclose(y, run(Attention(cfg), attention_params(params), x)[0],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("gating, want", [("official", 2.0), ("paper", 2.0 / 3.0)])
def test_load_balance_at_uniform_routing_and_its_gradient(gating, want):
    """Uniform router probabilities: E * sum P_i f_i = top_k (official form), sum P_i f_i
    = top_k / E (paper, Eq. 7); E = 3 routed heads, top_k = 2."""
    cfg = mixer_cfg(gating=gating)
    x = inputs()
    params = init(MoH(cfg), x)
    aux = run(MoH(cfg), zero_routers(params), x)[2]
    np.testing.assert_allclose(aux["load_balance_loss"], want, rtol=1e-6)

    def lb(p):
        return MoH(cfg).apply({"params": p}, x)[2]["load_balance_loss"]
    grads = jax.jit(jax.grad(lb))(params)
    assert float(jnp.abs(grads["router_routed"]["kernel"]).max()) > 0


def test_aux_loss_weighted_and_averaged_over_moh_layers():
    c = models.default_mixers()
    c["moh"].update(n_heads=4, n_kv_heads=2, shared_heads=1, top_k=2, aux_weight=0.5)
    cfg = dict(family="lm", d_model=D, n_layers=3, vocab_size=64, d_ff=0,
               mixer_pattern=("moh", "mamba", "moh"), mixers=c)
    model = models.build(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (B, L), 0, 64)
    params = init(model, tokens)
    _, aux = run(model, params, tokens)
    from jaxmix.models.lm import combine_aux
    layers = [{"load_balance_loss": 1.0}, {}, {"load_balance_loss": 3.0}]
    assert combine_aux(model.cfg, layers) == {"moh/load_balance_loss": 2.0, "aux_loss": 1.0}
    assert set(aux) == {"moh/load_balance_loss", "aux_loss"}
    np.testing.assert_allclose(aux["aux_loss"], 0.5 * aux["moh/load_balance_loss"], rtol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(),                                        # GQA, official gates, learned routers
    dict(gating="paper", n_kv_heads=4),            # MHA, paper gates
    dict(router="query_norm", shared_heads=1, top_k=1, sliding_window=5),
])
def test_cached_decoding_equals_full_forward(kw):
    """Prefill 5 tokens, then decode one token at a time (only the active heads are
    computed): the same outputs as one full pass, fp32."""
    cfg = mixer_cfg(**kw)
    x = inputs(2)
    m = MoH(cfg)
    params = init(m, x)
    cache = m.init_cache(B, cfg.max_cache_len, jnp.float32)
    assert_decode_matches_forward(m, params, x, cache, prefill=5)


def dot_shapes(jaxpr):
    """Output shapes of every dot_general in a jaxpr, nested calls included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jex_core.jaxprs_in_params(eqn.params):
            out += dot_shapes(sub)
    return out


def test_decode_step_gathers_only_the_active_heads():
    """The one-token step's attention (its dots over the 40 cache slots) runs on the
    shared + top_k = 4 active heads, never on all 8."""
    cfg = mixer_cfg(n_heads=8, n_kv_heads=8, shared_heads=2, top_k=2, max_cache_len=40)
    m = MoH(cfg)
    x = inputs()[:, :1]
    params = init(m, x)
    cache = m.init_cache(B, cfg.max_cache_len, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x, c: m.apply({"params": p}, x, decode=True,
                                                   cache=c))(params, x, cache)
    over_cache = [s for s in dot_shapes(jaxpr.jaxpr) if 40 in s]
    assert over_cache and all(4 in s and 8 not in s for s in over_cache), over_cache


def test_query_norm_router_converts_a_dense_model_exactly():
    """router='query_norm' adds no weights: a dense attention layer's params load as
    they are, and with every routed head active (0/1 gates all 1) the output is the
    dense output."""
    cfg = mixer_cfg(router="query_norm", shared_heads=2, top_k=2)
    x = inputs()
    dense = init(Attention(cfg), x)
    assert set(init(MoH(cfg), x)) == set(dense)
    np.testing.assert_allclose(run(MoH(cfg), dense, x)[0], run(Attention(cfg), dense, x)[0],
                               atol=1e-6, rtol=0)
    grads = jax.jit(jax.grad(
        lambda p: MoH(cfg).apply({"params": p}, x)[2]["load_balance_loss"]))(dense)
    assert float(jnp.abs(grads["q_proj"]["kernel"]).max()) > 0  # straight-through scores


def test_init_from_dense_workdir_for_a_moh_model(tmp_path):
    """A dense attention workdir initialises a MoH model: the learned routers start at
    zero, so with every head active the MoH LM equals the dense LM."""
    import transformer_lm
    from jaxmix import convert, workdir

    dense_cfg = transformer_lm.get_config("smoke")
    dense = models.build(dense_cfg.model)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 8), 0, 256)
    params = init(dense, tokens)
    convert.write_workdir(str(tmp_path / "dense"), dense_cfg, params)

    moh_cfg = transformer_lm.get_config("smoke")
    moh_cfg.model.mixer_pattern = ("moh",)
    moh_cfg.model.mixers.moh.update(shared_heads=1, top_k=1)  # 2 heads: all active
    moh = models.build(moh_cfg.model)
    loaded = workdir.load_params(str(tmp_path / "dense"), moh)
    assert float(jnp.abs(loaded["layers_0"]["mixer"]["router_routed"]["kernel"]).max()) == 0
    np.testing.assert_allclose(run(moh, loaded, tokens)[0], run(dense, params, tokens)[0],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields, needle", [
    (dict(top_k=4), "top_k=4 is larger than the 3 routed heads"),
    (dict(shared_heads=0, top_k=0), "shared_heads \\+ top_k = 0"),
    (dict(gating="nope"), "gating='nope'"),
])
def test_bad_head_budgets(fields, needle):
    c = models.default_mixers()
    c["moh"].update(dict(n_heads=4, shared_heads=1, top_k=1), **fields)
    cfg = dict(family="lm", d_model=D, n_layers=1, vocab_size=64, d_ff=0,
               mixer_pattern=("moh",), mixers=c)
    with pytest.raises(ConfigError, match=needle):
        models.build(cfg)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_every_attention_impl_with_segments_and_window(impl):
    """Packed segments and a sliding window through each attention impl (the Pallas
    kernel interpreted on CPU) give the xla path's output."""
    cfg = mixer_cfg(sliding_window=6)
    x = inputs(3)
    seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 12])
    params = init(MoH(cfg), x)
    want = run(MoH(cfg), params, x, segment_ids=seg)[0]
    got = run(MoH(mixer_cfg(sliding_window=6, attn_impl=impl)), params, x, segment_ids=seg)[0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def captured_calls(module, params, x, names):
    """{method name: (args, output)} of the module's own methods `names` during one
    forward pass (flax method interception)."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module is not None and context.module.name is None \
                and context.method_name in names:
            seen[context.method_name] = (args, out)
        return out

    with nn.intercept_methods(interceptor):
        module.apply({"params": params}, x)
    return seen


def random_routers(params, seed=7, std=0.5):
    leaves = {k: v for k, v in params.items() if k.startswith("router")}
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return dict(params, **{k: {"kernel": std * jax.random.normal(key, v["kernel"].shape)}
                           for key, (k, v) in zip(keys, sorted(leaves.items()))})


@pytest.mark.parametrize("gating, shared, top_k", [("official", 3, 2), ("paper", 1, 3)])
def test_learned_gates_match_a_numpy_computation_from_the_router_weights(gating, shared,
                                                                         top_k):
    """Random router weights: the module's gates equal tests/oracles.moh_gates (the
    paper's Eq. 5-6 or the official code's scaled, renormalised form), and the heads
    reaching o_proj are dense attention's heads times those gates."""
    import oracles
    cfg = mixer_cfg(n_heads=8, n_kv_heads=2, shared_heads=shared, top_k=top_k, gating=gating)
    x = inputs()
    params = random_routers(init(MoH(cfg), x))
    seen = captured_calls(MoH(cfg), params, x, ("gates", "project_out"))
    gates, top_idx, _ = seen["gates"][1]
    w = lambda name: np.asarray(params[name]["kernel"]) if name in params else None
    want = oracles.moh_gates(np.asarray(x), w("router_shared"), w("router_routed"),
                             w("router_mix"), shared, top_k, gating)
    np.testing.assert_allclose(gates, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.sort(np.asarray(top_idx), -1),
                                  np.sort(np.argsort(-want[..., shared:], -1)[..., :top_k], -1))
    dense = captured_calls(Attention(cfg), attention_params(params), x, ("project_out",))
    heads = np.asarray(dense["project_out"][0][0])
    np.testing.assert_allclose(seen["project_out"][0][0], heads * want[..., None],
                               rtol=1e-5, atol=1e-6)
