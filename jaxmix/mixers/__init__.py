"""The token-mixer registry: one name per mixer, one file per mixer.

Every mixer is a flax.linen Module built as `cls(cfg=mixer_config, name=...)`, where
`mixer_config` holds the model's shared fields (d_model, n_layers, dtype, ...) and the
mixer's own (its class's DEFAULTS, overridden by its entry in model.mixers). It has
  DEFAULTS                 {field: default} of its own config fields
  CAUSAL                   True: sees only earlier positions (LM and decoding);
                           False: bidirectional (the encoder family only);
                           None: set by its config's `causal` field
  FIXED_SIZE_CACHE         True when init_cache's size does not grow with max_len
                           (recurrent state), False for a KV cache
  __call__(x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
           train=False) -> (y_BLD, new_cache or None, aux)
  init_cache(batch, max_len, dtype) -> the decode cache before any token
  cache_axes()             the cache's logical axis names (same tree as the cache)
`aux` maps names to scalars for this layer: entries whose name ends in "loss" are
added to the training loss, times the entry's `aux_weight` field, after averaging
over the layers of one model.mixers entry; all entries are logged. Mixers modules
import jaxmix.nn, jaxmix.ops and jaxmix.parallel, never jaxmix.models or jaxmix.train.
"""
import importlib

from jaxmix.errors import ConfigError

# name -> "module:Class"; adding a mixer is one file plus one line here.
REGISTRY = {
    "mamba": "jaxmix.mixers.mamba:Mamba",
    "attention": "jaxmix.mixers.attention:Attention",
    "moh": "jaxmix.mixers.moh:MoH",
    "gdn": "jaxmix.mixers.gdn:GatedDeltaNet",
    "mom": "jaxmix.mixers.mom:MoM",
    "bimamba": "jaxmix.mixers.bimamba:BiMamba",
    "mambamixer": "jaxmix.mixers.mambamixer:MambaMixer",
}


def get(name):
    """The mixer class registered under `name`."""
    if name not in REGISTRY:
        raise ConfigError(f"model.mixer_pattern: unknown mixer {name!r}; "
                          f"choose from {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def is_causal(cls, cfg):
    """Whether the mixer class `cls` built with config `cfg` sees only earlier
    positions."""
    causal = getattr(cls, "CAUSAL", True)
    return bool(cfg.get("causal", True)) if causal is None else causal
