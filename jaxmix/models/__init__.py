"""Model builders: `models.build(config.model)` returns a flax.linen Module."""
import ml_collections

from jaxmix.errors import ConfigError
from jaxmix.models.lm import LM, layer_kinds, padded_vocab

FAMILIES = {"lm": LM}


def build(model_config):
    """The Module described by `model_config` (a ConfigDict or dict)."""
    cfg = ml_collections.FrozenConfigDict(model_config)
    family = cfg.get("family", "lm")
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown {family!r}; choose from {sorted(FAMILIES)}")
    layer_kinds(cfg)  # validates the pattern early, outside jit
    return FAMILIES[family](cfg)


__all__ = ["build", "LM", "padded_vocab", "layer_kinds"]
