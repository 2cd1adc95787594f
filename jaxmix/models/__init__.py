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


def adapt_params(params, source_config, target_config):
    """`params` of a model built from `source_config`, made to fit `target_config`: a
    layer whose mixer class takes over another's weights (MoH from attention: the same
    q/k/v/o projections) gets the parameters its class adds zero-initialised
    (`ZERO_PARAMS`: learned routers start uniform). Anything else is left to
    workdir.check_params to name."""
    source = normalize_config(source_config)
    target = ml_collections.FrozenConfigDict(normalize_config(target_config))
    src_kinds = [kind_of(source, n) for n in layer_kinds(source)]
    out = jax.tree.map(lambda x: x, dict(params))
    abstract = None
    for i, (_, cls, _) in enumerate(layer_mixers(target)):
        zero = getattr(cls, "ZERO_PARAMS", ())
        layer = dict(out.get(f"layers_{i}", {}))
        if not zero or i >= len(src_kinds) or "mixer" not in layer:
            continue
        if abstract is None:
            import flax.linen as nn
            model = LM(target)
            abstract = nn.unbox(jax.eval_shape(lambda: model.init(
                jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]))
        mixer = dict(layer["mixer"])
        for name in zero:
            want = abstract[f"layers_{i}"]["mixer"].get(name)
            if want is not None and name not in mixer:
                mixer[name] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), want)
        layer["mixer"] = mixer
        out[f"layers_{i}"] = layer
    return out


__all__ = ["build", "LM", "padded_vocab", "layer_kinds", "layer_mixers", "mixer_config",
           "normalize_config", "default_mixers", "kind_of", "adapt_params", "SHARED"]
