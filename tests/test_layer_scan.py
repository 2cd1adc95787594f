"""The LM's layers as a scan over repeats of the mixer pattern, and the remat policies:
same numbers as the unrolled blocks, the selective scan's forward run once per layer
unless the policy is "block", and the presets' parameter counts."""
import functools

import jax
import jax.numpy as jnp
import pytest

from jaxmix import models
from jaxmix.config_files import load_config
from jaxmix.errors import ConfigError
from jaxmix.models.lm import scan_repeat
from jaxmix.models.config import layer_mixers


def sub_jaxprs(eqn):
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, jax.extend.core.Jaxpr):
                yield sub


def has_loop(jaxpr):
    return any(e.primitive.name == "while" or any(has_loop(s) for s in sub_jaxprs(e))
               for e in jaxpr.eqns)


def scan_forward_runs(jaxpr):
    """How many times the jaxpr runs the xla selective scan's forward loop (its own
    jit, `_scan_forward_loop`; the loop-free part that partial evaluation hoists from it
    does not count)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.params.get("name") == "_scan_forward_loop" and any(
                has_loop(s) for s in sub_jaxprs(eqn)):
            n += 1
        n += sum(scan_forward_runs(s) for s in sub_jaxprs(eqn))
    return n


def model_and_loss(spec, n_repeats, **fields):
    config = load_config(spec)
    config.model.n_layers = n_repeats * len(config.model.mixer_pattern)
    config.model.update(**fields)
    model = models.build(config.model)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 250)
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux.get("aux_loss", 0.0)
    return params, loss


@pytest.mark.parametrize("spec", ["configs/mamba_lm.py:smoke", "configs/transformer_lm.py:smoke"])
def test_scanned_layers_match_unrolled(spec):
    """Loss and gradients of the scanned layers equal the unrolled blocks' (same params:
    the per-layer layout is kept), with and without remat."""
    params, want_loss = model_and_loss(spec, 2, scan_layers="unroll", remat="none")
    want = jax.jit(jax.value_and_grad(want_loss))(params)
    for remat in ("none", "save_kernels"):
        _, loss = model_and_loss(spec, 2, scan_layers="scan", remat=remat)
        got = jax.jit(jax.value_and_grad(loss))(params)
        assert abs(float(got[0] - want[0])) <= 1e-6 * abs(float(want[0]))
        for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
            assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * (float(jnp.max(jnp.abs(w))) + 1e-6)


@pytest.mark.parametrize("scan_layers, n_bodies", [("unroll", 4), ("scan", 1)])
def test_remat_runs_the_scan_forward_once_per_layer(scan_layers, n_bodies):
    """Counted in the gradient's jaxpr of a 4-layer Mamba LM: one forward per layer
    (unrolled: 4; scanned: 1 in the loop body run for every layer) without remat and
    with "save_kernels" or "dots_saveable", which keep what the scan computed; "block"
    (least memory) recomputes it in the backward: twice."""
    for remat, per_layer in (("none", 1), ("save_kernels", 1), ("dots_saveable", 1),
                             ("block", 2)):
        params, loss = model_and_loss("configs/mamba_lm.py:smoke", 4, scan_layers=scan_layers,
                                      remat=remat)
        runs = scan_forward_runs(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
        assert runs == n_bodies * per_layer, (remat, runs)


def test_layers_configured_differently_stay_unrolled():
    """The scan needs layer i configured as layer i + P: DuoAttention's per-layer head
    split breaks that, and the blocks then run one by one. model.scan_layers chooses
    the layout ("auto": unrolled on the CPU backend, which these tests run on)."""
    config = load_config("configs/transformer_lm.py:smoke")
    cfg = models.normalize_config(config.model)
    cfg.scan_layers = "scan"
    assert scan_repeat(cfg, layer_mixers(cfg)) == len(cfg.mixer_pattern)
    cfg.duo = {"retrieval": [1] + [0] * (cfg.n_layers - 1), "sink": 4, "recent": 8}
    assert scan_repeat(cfg, layer_mixers(cfg)) == 0
    cfg.duo = None
    cfg.scan_layers = "unroll"
    assert scan_repeat(cfg, layer_mixers(cfg)) == 0
    cfg.scan_layers = "auto"
    assert scan_repeat(cfg, layer_mixers(cfg)) == 0
    from jaxmix.models.lm import layer_layout
    assert layer_layout({"scan_layers": True}) == "scan"  # older boolean values
    assert layer_layout({"scan_layers": False}) == "unroll"
    cfg.scan_layers = "sometimes"
    with pytest.raises(ConfigError, match="model.scan_layers='sometimes': choose from auto"):
        scan_repeat(cfg, layer_mixers(cfg))


def test_remat_values():
    """true/false read as "block"/"none"; anything else is a one-line ConfigError."""
    config = load_config("configs/mamba_lm.py:smoke")
    for value, name in ((True, "block"), (False, "none"), ("save_kernels", "save_kernels")):
        config.model.remat = value if isinstance(value, str) else ("block" if value else "none")
        assert models.remat.policy_name(config.model) == name
        assert models.remat.policy_name({"remat": value}) == name
    config.model.remat = "everything"
    with pytest.raises(ConfigError, match="model.remat='everything': choose from none, block"):
        models.build(config.model)


def test_presets_state_their_parameter_count():
    import mamba_lm
    assert set(mamba_lm.POD_PARAMS) == set(mamba_lm.POD_CHIPS)
    for preset, want in mamba_lm.POD_PARAMS.items():
        model = models.build(mamba_lm.get_config(preset).model)
        got = sum(x.size for x in jax.tree.leaves(models.abstract_params(model)))
        assert got == want, (preset, got)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_save_kernels_keeps_the_pallas_scans_outputs(impl):
    """The Pallas scans' forwards tag y, the last state and the chunk states: under
    "save_kernels" the gradient's jaxpr holds one forward pallas_call per remat'd call
    ("block": two)."""
    from jaxmix.models.remat import checkpoint_policy
    from jaxmix.ops.scan_pallas import selective_scan_pallas
    from jaxmix.ops.scan_pallas_gpu import selective_scan_pallas_gpu
    # The generic Pallas interpreter: TPU interpret mode's callbacks have effects that
    # jax.checkpoint does not take (on a TPU the kernel is compiled, without them).
    fn = functools.partial(selective_scan_pallas if impl == "pallas_tpu"
                           else selective_scan_pallas_gpu, interpret=True)
    ks = jax.random.split(jax.random.key(0), 4)
    u = jax.random.normal(ks[0], (1, 16, 8))
    B, C = jax.random.normal(ks[1], (1, 16, 4)), jax.random.normal(ks[2], (1, 16, 4))
    A = -jnp.ones((8, 4))

    def forward_calls(policy):
        def f(u):
            return jnp.sum(fn(jnp.tanh(u), u, A, B, C, delta_softplus=True) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(jax.checkpoint(f, policy=policy)))(u).jaxpr
        return str(jaxpr).count("pallas_call") - 1  # one is the backward kernel
    assert forward_calls(checkpoint_policy("save_kernels")) == 1
    assert forward_calls(checkpoint_policy("block")) == 2
