"""Bidirectional mixers (bimamba, mambamixer, non-causal attention), the encoder family,
its heads and objectives, and the lm/encoder family checks."""
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
from jaxmix.train import objectives

D = 16
SWAPPED = ("conv_weight", "conv_bias", "x_proj", "dt_proj_kernel", "dt_proj_bias", "A_log",
           "D")


def mixer_cfg(cls, **kw):
    base = dict(cls.DEFAULTS, d_model=D, n_layers=2, d_state=4, expand=2, d_conv=4,
                dt_rank=0, scan_impl="xla", dtype="float32")
    base.update(kw)
    return ml_collections.FrozenConfigDict(base)


def init(module, x):
    return nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x)["params"])


def random_params(params, seed=3):
    """Every leaf redrawn (so that the two directions' params surely differ)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        leaf + 0.3 * jax.random.normal(k, leaf.shape)
        for leaf, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_bimamba_is_flip_equivariant(impl):
    """Forward and backward param sets swapped, on the time-flipped input: the
    time-flipped output."""
    m = BiMamba(mixer_cfg(BiMamba, scan_impl=impl))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 13, D))
    params = random_params(init(m, x))
    swapped = dict(params)
    for name in SWAPPED:
        swapped[name], swapped[name + "_b"] = params[name + "_b"], params[name]
    apply = jax.jit(lambda p, x: m.apply({"params": p}, x)[0])
    y, y_flip = apply(params, x), apply(swapped, x[:, ::-1])
    np.testing.assert_allclose(y_flip[:, ::-1], y, atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(y_flip - y))) > 1e-3  # the flip changes something


def test_bimamba_without_its_backward_output_is_causal_mamba():
    """Backward C projection and D zeroed (its output is exactly 0): the Mamba mixer's
    output with the same shared weights (out_proj halved: the average of two)."""
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 11, D))
    bi = BiMamba(mixer_cfg(BiMamba))
    params = random_params(init(bi, x))
    r, n = 1, 4  # dt_rank = ceil(16 / 16), d_state
    kernel = params["x_proj_b"]["kernel"].at[:, r + n:].set(0.0)
    params = {**params, "x_proj_b": {"kernel": kernel}, "D_b": jnp.zeros_like(params["D_b"])}
    mamba = Mamba(mixer_cfg(Mamba))
    shared = {k: v for k, v in params.items() if not k.endswith("_b")}
    shared["out_proj"] = params["out_proj"] * 0.5
    assert set(shared) == set(init(mamba, x))
    np.testing.assert_allclose(jax.jit(bi.apply)({"params": params}, x)[0],
                               jax.jit(mamba.apply)({"params": shared}, x)[0], atol=1e-6,
                               rtol=0)


def encoder_cfg(pattern, mixers, **kw):
    base = dict(family="encoder", vocab_size=64, d_model=D, n_layers=2, d_ff=0,
                mixer_pattern=pattern, mixers=mixers, patch_dim=8, max_len=12,
                head="features")
    base.update(kw)
    return base


# The reference impls compile fastest; the xla ones are checked by the flip test and
# against the reference in the ops tests.
ENCODERS = {
    "bimamba": (("bimamba",), {"bimamba": dict(d_state=4, scan_impl="reference")}, {}),
    "attention": (("attention",), {"attention": dict(n_heads=2, causal=False,
                                                     attn_impl="reference")},
                  {"d_ff": 32, "cls_token": True}),
    "mambamixer": (("mambamixer",), {"mambamixer": dict(d_state=4, channel_inner=6,
                                                        scan_impl="reference")},
                   {"layer_average": True}),
}


@pytest.mark.parametrize("kind", ["attention", "bimamba"])  # mambamixer: the next test
def test_encoder_output_depends_on_later_positions(kind):
    pattern, mixers, extra = ENCODERS[kind]
    model = models.build(encoder_cfg(pattern, mixers, **extra))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 8))
    args, kw = models.example_inputs(model)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), *args, **kw)["params"]
    f = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    y = f(x)
    y2 = f(x.at[:, 9].add(1.0))
    first = int(extra.get("cls_token", False))
    assert y.shape == (2, 12 + first, D)
    assert float(jnp.max(jnp.abs(y2[:, first + 6] - y[:, first + 6]))) > 1e-3


def test_mambamixer_layer_average_starts_as_the_plain_stack_and_sees_ahead():
    """Identity-initialised averaging weights: the same output as no averaging; the
    output at a position changes when a later input does."""
    pattern, mixers, _ = ENCODERS["mambamixer"]
    avg = models.build(encoder_cfg(pattern, mixers, layer_average=True))
    plain = models.build(encoder_cfg(pattern, mixers, layer_average=False))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 8))
    params = nn.unbox(jax.jit(avg.init)(jax.random.PRNGKey(1), x)["params"])
    weights = [k for k in params if k.startswith("average_")]
    assert len(weights) == 4 and sum(params[k].size for k in weights) == 2 * (2 * 2 + 3)
    base = {k: v for k, v in params.items() if not k.startswith("average_")}
    f = jax.jit(lambda p, x: plain.apply({"params": p}, x)[0])
    y = f(base, x)
    np.testing.assert_allclose(jax.jit(avg.apply)({"params": params}, x)[0], y, atol=1e-6)
    y2 = f(base, x.at[:, 9].add(1.0))
    assert float(jnp.max(jnp.abs(y2[:, 6] - y[:, 6]))) > 1e-3


def test_family_checks_are_one_line_errors():
    bi = (("bimamba",), {"bimamba": {}})
    with pytest.raises(ConfigError, match="bidirectional.*family='lm' takes causal"):
        models.build(dict(encoder_cfg(*bi), family="lm"))
    with pytest.raises(ConfigError, match="mamba mixer is causal.*use bimamba"):
        models.build(encoder_cfg(("mamba",), {"mamba": {}}))
    with pytest.raises(ConfigError, match="causal=False"):
        models.build(encoder_cfg(("attention",), {"attention": {}}))
    with pytest.raises(ConfigError, match="n_classes"):
        models.build(encoder_cfg(*bi, head="classify"))
    with pytest.raises(ConfigError, match="patch inputs"):
        models.build(encoder_cfg(*bi, head="masked_patch", patch_dim=0))
    for bad in (dict(head="masked_patch", patch_dim=0), dict(pool="cls")):
        with pytest.raises(ConfigError) as e:
            models.build(encoder_cfg(*bi, **bad))
        assert "\n" not in str(e.value)


def test_infonce_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    nce, acc = objectives.nce_terms(jnp.asarray(pred), jnp.asarray(target))
    want, hits = 0.0, 0
    for b in range(2):
        s = pred[b] @ target[b].T                      # [prediction, target]
        logp = s - np.log(np.exp(s).sum(0, keepdims=True))
        want -= np.trace(logp)
        hits += int((s.argmax(0) == np.arange(5)).sum())
    np.testing.assert_allclose(nce, want / 10, rtol=1e-5)
    np.testing.assert_allclose(acc, hits / 10)


@pytest.mark.parametrize("head", ["masked_patch", "classify", "masked_token"])
def test_heads_give_finite_losses_and_gradients(head):
    tokens = head == "masked_token"
    model = models.build(encoder_cfg(*ENCODERS["attention"][:2],
                                     head=head, n_classes=3, n_layers=1,
                                     patch_dim=0 if tokens else 8))
    args, kw = models.example_inputs(model)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), *args, **kw)["params"]
    rng = np.random.default_rng(0)
    if tokens:
        batch = {"tokens": jnp.asarray(rng.integers(0, 64, (2, 13)), jnp.int32)}
    else:
        batch = {"patches": jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32),
                 "label": jnp.array([0, 2], jnp.int32),
                 "mask_idx": jnp.array([[0, 3, 5], [1, 2, 11]], jnp.int32)}
    loss_fn = lambda p: objectives.terms(model, p, batch, jax.random.PRNGKey(0), True)[0]
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    total, count, correct = jax.jit(lambda p: objectives.terms(model, p, batch)[2])(params)
    assert float(count) > 0 and 0 <= float(correct) <= float(count)


def tiny_audio_config(preset):
    from audio_encoder import get_config
    from jaxmix.data import audio
    c = get_config(preset)
    c.data.audio.update(clip_seconds=0.64, n_mels=32, n_clips=16, val_clips=8,
                        mask_patches=3 if "pretrain" in preset else 0)
    n = audio.n_patches(c.data.audio)
    c.model.update(d_model=16, n_layers=1, max_len=n)
    c.model.mixers.bimamba.update(d_state=4, scan_impl="reference")
    c.train.update(steps=2, decay_steps=2, batch_size=4, seq_len=n, warmup_steps=1,
                   log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2,
                   cpu_devices=1)
    return c


@pytest.mark.slow
def test_pretrain_then_finetune_from_the_workdir(tmp_path):
    """Masked-patch pretraining writes a workdir; a classifier started from it
    (init_from) has the pretrained backbone and a fresh head (the classify objective's
    loss and gradients: test_heads_give_finite_losses_and_gradients)."""
    from jaxmix import train, workdir
    from jaxmix.train.loop import Run
    pre = tiny_audio_config("ssamba-pretrain")
    metrics = train.run(pre, str(tmp_path / "pre"))
    assert np.isfinite(metrics["val_loss"]) and 0 <= metrics["val_acc"] <= 1
    pretrained, _ = workdir.restore_params(str(tmp_path / "pre" / "checkpoints"))
    assert {"cpred_0", "gpred_1", "mask_embed"} <= set(pretrained)

    ft = tiny_audio_config("ssamba")
    ft.init_from = str(tmp_path / "pre")
    r = Run(ft, str(tmp_path / "ft"))
    state, _, start = r.initial_state()
    r.ckpt.close()
    assert start == 0 and "classifier" in state.params and "cpred_0" not in state.params
    for name in ("patch_embed", "pos_embed", "layers_0", "norm_f"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params[name]),
                     pretrained[name])


@pytest.mark.parametrize("spec", [f"audio_encoder.py:{m}{s}" for m in ("ssamba", "attention",
                                                                       "mambamixer")
                                  for s in ("", "-pretrain", "-pretrain-base")]
                         + [f"byte_encoder.py:{m}" for m in ("ssamba", "mambamixer", "smoke")])
def test_encoder_presets_pass_the_config_checks(spec):
    """Every preset builds its model and passes the early checks; the CPU-sized ones
    also trace their init (no arrays made; the pod shapes take seconds to trace)."""
    from jaxmix import config_files
    from jaxmix.train import validate
    c = config_files.load_config("configs/" + spec)
    validate.check_config(c)
    model = models.build(c.model)
    if not spec.endswith("-base"):
        assert models.abstract_params(model)


def test_lm_commands_refuse_an_encoder_workdir(tmp_path):
    """generate / evaluate / duo load workdirs through load_workdir: an encoder's is
    one line."""
    from jaxmix import workdir
    workdir.write_config(tiny_audio_config("ssamba"), str(tmp_path))
    with pytest.raises(ConfigError, match="holds an encoder .model.family='encoder'.; this "
                                          "command needs a language model"):
        workdir.load_workdir(str(tmp_path))


def test_classifier_outputs_must_match_the_data_classes():
    from types import SimpleNamespace
    from jaxmix.train import validate
    c = tiny_audio_config("ssamba")
    validate.check_classes(c, SimpleNamespace(n_classes=10))
    with pytest.raises(ConfigError, match="model.n_classes=10 .* has 2 classes; set "
                                          "--config.model.n_classes=2"):
        validate.check_classes(c, SimpleNamespace(n_classes=2))
    validate.check_classes(tiny_audio_config("ssamba-pretrain"), SimpleNamespace(n_classes=2))


class FixedOutputs:
    """A stand-in model for objectives.terms: `apply` records its inputs and returns
    fixed outputs, so the losses can be checked against hand computations."""

    def __init__(self, head, outputs, vocab_size=0):
        self.cfg = ml_collections.ConfigDict(dict(head=head, vocab_size=vocab_size))
        self.outputs, self.seen = outputs, {}

    def apply(self, variables, *args, train=False, rngs=None, **kw):
        self.seen = dict(kw, args=args)
        return self.outputs, {}


def test_classify_loss_is_the_mean_cross_entropy_by_hand():
    import oracles
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [1.0, 1.0, -2.0]], np.float32)
    label = np.array([0, 1, 1], np.int32)
    model = FixedOutputs("classify", jnp.asarray(logits))
    loss, _, (total, count, correct) = objectives.terms(model, {}, {
        "patches": jnp.zeros((3, 4, 2)), "label": jnp.asarray(label)})
    ce = oracles.cross_entropy(logits, label)
    np.testing.assert_allclose(loss, ce.mean(), rtol=1e-6)
    np.testing.assert_allclose(total, ce.sum(), rtol=1e-6)
    # row 2 ties 0 and 1: argmax takes the first, 0, so it is a miss
    assert (int(count), int(correct)) == (3, 1)


def test_masked_patch_loss_is_nce_plus_ten_mse_by_hand():
    """InfoNCE with the softmax over the predictions for each masked target, plus 10 x
    the mean squared error over every masked patch value; the targets are the masked
    patches gathered at mask_idx."""
    import oracles
    rng = np.random.default_rng(4)
    b, length, f, n = 2, 6, 3, 3
    patches = rng.normal(size=(b, length, f)).astype(np.float32)
    idx = np.array([[0, 4, 5], [3, 1, 2]], np.int32)
    c_pred = rng.normal(size=(b, n, f)).astype(np.float32)
    g_pred = rng.normal(size=(b, n, f)).astype(np.float32)
    model = FixedOutputs("masked_patch", (jnp.asarray(c_pred), jnp.asarray(g_pred)))
    loss, aux, (total, count, correct) = objectives.terms(
        model, {}, {"patches": jnp.asarray(patches), "mask_idx": jnp.asarray(idx)})
    np.testing.assert_array_equal(model.seen["mask_idx"], idx)
    nce_terms, sq, hits = [], [], 0
    for row in range(b):
        target = patches[row, idx[row]].astype(np.float64)          # [target, F]
        for m in range(n):   # target m against every prediction of the clip
            s = np.array([c_pred[row, j] @ target[m] for j in range(n)])
            nce_terms.append(-(oracles.log_softmax(s)[m]))
            hits += int(np.argmax(s) == m)
            sq.extend(((g_pred[row, m] - target[m]) ** 2).tolist())
    nce, mse = np.mean(nce_terms), np.mean(sq)
    np.testing.assert_allclose(aux["nce"], nce, rtol=1e-5)
    np.testing.assert_allclose(aux["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(loss, nce + 10 * mse, rtol=1e-5)
    np.testing.assert_allclose(aux["nce_acc"], hits / (b * n), rtol=1e-6)
    np.testing.assert_allclose(total, b * (nce + 10 * mse), rtol=1e-5)
    np.testing.assert_allclose(correct, b * hits / (b * n), rtol=1e-6)
    assert int(count) == b


@pytest.mark.parametrize("rng", [None, 3])
def test_masked_token_loss_is_cross_entropy_over_masked_inputs_by_hand(rng):
    """Cross-entropy against the input tokens themselves, averaged over the masked
    positions only (the mask the model was given); hits use the real vocabulary only,
    padded logit columns never count as a prediction."""
    import oracles
    gen = np.random.default_rng(6)
    b, length, vocab, padded = 3, 9, 5, 8
    tokens = gen.integers(0, vocab, (b, length + 1)).astype(np.int32)
    logits = gen.normal(size=(b, length, padded)).astype(np.float32)
    logits[0, :, vocab:] = 50.0    # padded columns win the unrestricted argmax on row 0
    logits[1, :, :vocab] = -5.0    # row 1: the right token wins everywhere
    np.put_along_axis(logits[1], tokens[1, :-1, None], 5.0, axis=-1)
    model = FixedOutputs("masked_token", jnp.asarray(logits), vocab_size=vocab)
    key = None if rng is None else jax.random.PRNGKey(rng)
    loss, _, (total, count, correct) = objectives.terms(model, {}, {"tokens": jnp.asarray(tokens)},
                                                        key, train=rng is not None)
    np.testing.assert_array_equal(model.seen["args"][0], tokens[:, :-1])
    mask = np.asarray(model.seen["mask_BL"], bool)
    assert mask.shape == (b, length) and mask.any(axis=1).all() and not mask.all()
    ce = oracles.cross_entropy(logits, tokens[:, :-1])
    want_hits = (np.argmax(logits[..., :vocab], -1) == tokens[:, :-1]) & mask
    np.testing.assert_allclose(loss, ce[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(total, ce[mask].sum(), rtol=1e-6)
    assert int(count) == mask.sum()
    assert int(correct) == want_hits.sum() and want_hits[1].sum() == mask[1].sum()
