"""Model builders: `models.build(config.model)` returns a flax.linen Module."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmix.errors import ConfigError
from jaxmix.models.config import (SHARED, default_mixers, kind_of, layer_kinds, layer_mixers,
                                  mixer_config, normalize_config)
from jaxmix.models.lm import LM, padded_vocab

FAMILIES = {"lm": LM}


def build(model_config):
    """The Module described by `model_config` (a ConfigDict or dict; configs with flat
    mixer fields are read as `normalize_config` says)."""
    cfg = ml_collections.FrozenConfigDict(normalize_config(model_config))
    family = cfg.get("family", "lm")
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown {family!r}; choose from {sorted(FAMILIES)}")
    for name, cls, mixer_cfg in layer_mixers(cfg):  # early checks, outside jit
        if hasattr(cls, "check_config"):
            cls.check_config(mixer_cfg, f"model.mixers.{name}")
    return FAMILIES[family](cfg)


def adapt_params(params, target_config):
    """`params` of some model (a checkpoint's), made to fit `target_config`: each
    layer whose mixer class lists `ZERO_PARAMS` (weights another mixer's layer lacks:
    MoH's routers, next to the q/k/v/o projections it shares with attention) gets those
    it misses as zeros (learned routers start uniform). Anything else that does not
    fit is left to workdir.check_params to name."""
    import flax.linen as nn
    target = ml_collections.FrozenConfigDict(normalize_config(target_config))
    zero = {i: cls.ZERO_PARAMS for i, (_, cls, _) in enumerate(layer_mixers(target))
            if getattr(cls, "ZERO_PARAMS", ())}
    if not zero:
        return params
    model = LM(target)
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    out = dict(params)
    for i, names in zero.items():
        layer = dict(out.get(f"layers_{i}", {}))
        if "mixer" not in layer:
            continue
        mixer = dict(layer["mixer"])
        for name in names:
            want = abstract[f"layers_{i}"]["mixer"].get(name)
            if want is not None and name not in mixer:
                mixer[name] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), want)
        out[f"layers_{i}"] = dict(layer, mixer=mixer)
    return out


__all__ = ["build", "LM", "padded_vocab", "layer_kinds", "layer_mixers", "mixer_config",
           "normalize_config", "default_mixers", "kind_of", "adapt_params", "SHARED"]
