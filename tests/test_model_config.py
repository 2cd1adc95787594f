"""The model config: shared fields plus one entry per mixer; older flat configs."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxmix import models
from jaxmix.errors import ConfigError
from jaxmix.train import validate

D = 32


def init(module, x):
    return nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x)["params"])


def test_unknown_sub_config_field():
    c = models.default_mixers()
    c["moh"]["expert_count"] = 3
    cfg = dict(family="lm", d_model=D, n_layers=1, vocab_size=64, d_ff=0,
               mixer_pattern=("moh",), mixers=c)
    with pytest.raises(ConfigError, match="model.mixers.moh: unknown field 'expert_count'"):
        models.build(cfg)


def test_two_variants_of_one_mixer_in_one_pattern():
    """Entries name their class with `kind`: a local (sliding-window) and a global
    attention layer in one model, each with its own settings."""
    c = models.default_mixers("attention")
    c["local"] = dict(c["attention"], kind="attention", sliding_window=4, n_heads=2)
    cfg = models.normalize_config(dict(family="lm", d_model=D, n_layers=2, vocab_size=64,
                                       d_ff=0, mixer_pattern=("local", "attention"),
                                       mixers=c))
    model = models.build(cfg)
    params = init(model, jnp.zeros((1, 8), jnp.int32))
    assert params["layers_0"]["mixer"]["q_proj"]["kernel"].shape == (D, 2 * (D // 2))
    assert params["layers_1"]["mixer"]["q_proj"]["kernel"].shape == (D, D)
    assert models.mixer_config(model.cfg, "local").sliding_window == 4


# The model section of a config.json written before model.mixers existed.
FLAT = dict(family="lm", d_model=D, n_layers=2, vocab_size=256, vocab_multiple=8,
            mixer_pattern=["mamba", "attention"], d_state=4, expand=2, d_conv=4, dt_rank=0,
            d_ff=64, tie_embeddings=True, norm_eps=1e-5, dtype="float32", scan_impl="auto",
            attn_impl="auto", n_heads=4, n_kv_heads=2, head_dim=0, rope_theta=10000.0,
            sliding_window=0, remat=False, proj_bias=False, mlp_bias=False)


def test_flat_config_of_an_older_workdir_reads_into_entries(tmp_path):
    cfg = models.normalize_config(FLAT)
    assert cfg.mixers.mamba.d_state == 4 and cfg.mixers.attention.n_kv_heads == 2
    assert "d_state" not in cfg and "n_heads" not in cfg
    assert cfg.remat == "none"  # the boolean of older configs, by its name
    tokens = jnp.zeros((1, 4), jnp.int32)
    old = init(models.build(FLAT), tokens)
    new = init(models.build(cfg), tokens)
    assert jax.tree.map(jnp.shape, old) == jax.tree.map(jnp.shape, new)
    # Resuming such a workdir with the same model in the new layout is allowed...
    (tmp_path / "config.json").write_text(json.dumps({"model": FLAT}))
    import ml_collections
    config = ml_collections.ConfigDict({"model": cfg.to_dict()})
    validate.check_workdir(config, str(tmp_path), has_checkpoints=True)
    # ...and another model is refused, naming the field.
    config.model.mixers.mamba.d_state = 8
    with pytest.raises(ConfigError, match="model.mixers.mamba.d_state: 4 in the workdir, 8 now"):
        validate.check_workdir(config, str(tmp_path), has_checkpoints=True)


def test_unknown_flat_field():
    with pytest.raises(ConfigError, match="unknown field 'n_expert'"):
        models.normalize_config(dict(FLAT, n_expert=2))


def test_moved_field_on_the_command_line_names_its_new_place():
    import train
    msg = train._unknown_override(["train.py", "--config", "configs/transformer_lm.py",
                                   "--config.model.attn_impl=xla"])
    assert msg == ("--config.model.attn_impl: mixer fields moved to model.mixers.<entry>; "
                   "use --config.model.mixers.attention.attn_impl or "
                   "--config.model.mixers.moh.attn_impl")
    msg = train._unknown_override(["train.py", "--config", "configs/transformer_lm.py",
                                   "--config.model.mixers.moh.experts=3"])
    assert "model.mixers.moh has no field 'experts'" in msg


def test_every_mixer_has_one_cache_protocol():
    """init_cache(batch, max_len, dtype) for every registered mixer, cache_axes()
    names every axis of every cache array, and FIXED_SIZE_CACHE says whether the
    cache's shapes stay the same for a longer max_len."""
    from jaxmix import mixers
    for kind in mixers.REGISTRY:
        cfg = models.mixer_config(models.normalize_config(dict(
            family="lm", d_model=D, n_layers=1, vocab_size=64, d_ff=0, mixer_pattern=(kind,),
            mixers=models.default_mixers())), kind)
        mixer = mixers.get(kind)(cfg)
        cache = mixer.init_cache(2, 16, jnp.float32)
        axes = mixer.cache_axes()
        assert jax.tree.structure(cache) == jax.tree.structure(
            axes, is_leaf=lambda x: isinstance(x, tuple)), kind
        for array, names in zip(jax.tree.leaves(cache),
                                jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                                strict=True):
            assert array.ndim == len(names), (kind, array.shape, names)
        longer = mixer.init_cache(2, 32, jnp.float32)
        same = [a.shape for a in jax.tree.leaves(cache)] == [
            a.shape for a in jax.tree.leaves(longer)]
        assert same == mixer.FIXED_SIZE_CACHE, kind


def test_unused_entries_and_later_defaults_do_not_block_a_resume(tmp_path):
    """A workdir written before a mixer was registered (no entry for it), or before a
    field was added to an entry (its default now), resumes; a changed field does not."""
    import ml_collections
    cfg = models.normalize_config(FLAT)
    old = cfg.to_dict()
    del old["mixers"]["attention"]["rope_theta"]  # absent: its default, as now
    (tmp_path / "config.json").write_text(json.dumps({"model": old}, default=list))
    config = ml_collections.ConfigDict({"model": cfg.to_dict()})
    config.model.mixers.unused = dict(kind="moh")  # an entry the pattern does not use
    validate.check_workdir(config, str(tmp_path), has_checkpoints=True)
    config.model.mixers.attention.rope_theta = 500000.0
    with pytest.raises(ConfigError, match="rope_theta: 10000.0 in the workdir, 500000.0"):
        validate.check_workdir(config, str(tmp_path), has_checkpoints=True)
