"""The token-mixer registry: one name per mixer, one file per mixer.

Every mixer is a flax.linen Module built as `cls(cfg=model_config, name=...)` with
  __call__(x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False)
      -> (y_BLD, new_cache, aux)
where `aux` is a dict of auxiliary losses/metrics (empty for most mixers).
"""
import importlib

from jaxmix.errors import ConfigError

# name -> "module:Class"; adding a mixer is one file plus one line here.
REGISTRY = {
    "mamba": "jaxmix.mixers.mamba:Mamba",
    "attention": "jaxmix.mixers.attention:Attention",
}


def get(name):
    """The mixer class registered under `name`."""
    if name not in REGISTRY:
        raise ConfigError(f"model.mixer_pattern: unknown mixer {name!r}; "
                          f"choose from {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
