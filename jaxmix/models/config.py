"""The model config: shared fields plus one sub-config per mixer.

  model.mixer_pattern = ("mamba", "moh")        # names of entries in model.mixers,
                                                # tiled to model.n_layers
  model.mixers.mamba = {d_state, expand, ...}   # each entry's fields
  model.mixers.moh = {n_heads, active_heads, ...}

An entry's class is its `kind` field, or its own name when it has none, so two
differently configured variants of one mixer can sit in one pattern
(`mixers.local = {"kind": "attention", "sliding_window": 256, ...}`). A mixer module
sees its entry's fields merged over the shared ones (SHARED), so `cfg.d_model` and
`cfg.n_heads` are both plain attributes there.

Configs written before the sub-configs existed held every mixer field flat under
`model`; `normalize_config` moves such fields into the entries that have them.
"""
import logging

import ml_collections

from jaxmix import mixers
from jaxmix.errors import ConfigError

log = logging.getLogger("jaxmix")

# Fields of the whole model, visible to every mixer.
SHARED = ("family", "vocab_size", "vocab_multiple", "d_model", "n_layers", "d_ff", "mlp_bias",
          "norm_eps", "tie_embeddings", "dtype", "remat", "scan_layers")
# Fields of the encoder family (jaxmix.models.encoder.DEFAULTS).
ENCODER_FIELDS = ("patch_dim", "max_len", "cls_token", "pool", "n_classes", "head",
                  "layer_average")
MODEL_FIELDS = SHARED + ("mixer_pattern", "mixers", "duo") + ENCODER_FIELDS
# Fields that were booleans before they took names: field -> (name for true, for false).
_BOOLEAN_FIELDS = {"remat": ("block", "none"), "scan_layers": ("scan", "unroll")}


def default_mixers(*names):
    """{name: that mixer's defaults} for the registered mixers `names` (default: all)."""
    return {name: dict(mixers.get(name).DEFAULTS) for name in names or mixers.REGISTRY}


def kind_of(cfg, name):
    """The registered mixer class name of the sub-config `name`."""
    entries = cfg.get("mixers") or {}
    if name not in entries:
        raise ConfigError(f"model.mixer_pattern: {name!r} has no entry in model.mixers "
                          f"(entries: {', '.join(sorted(entries)) or 'none'})")
    return entries[name].get("kind", name)


def _check_entry(name, entry):
    kind = entry.get("kind", name)
    cls = mixers.get(kind)
    unknown = sorted(set(entry) - set(cls.DEFAULTS) - {"kind"})
    if unknown:
        raise ConfigError(f"model.mixers.{name}: unknown field {unknown[0]!r} for a {kind} "
                          f"mixer (fields: {', '.join(sorted(cls.DEFAULTS))})")


def normalize_config(model_cfg, where="model"):
    """`model_cfg` (ConfigDict or dict) in the sub-config layout, checked: flat mixer
    fields of older configs move into model.mixers (logged once), the booleans of
    `remat` and `scan_layers` become their names, unknown fields fail."""
    cfg = ml_collections.ConfigDict(dict(model_cfg))
    for key, (on, off) in _BOOLEAN_FIELDS.items():  # older configs' true/false
        if isinstance(cfg.get(key), bool):
            value = on if cfg[key] else off
            del cfg[key]
            cfg[key] = value
    flat = {k: v for k, v in cfg.items() if k not in MODEL_FIELDS}
    if flat:
        known = {f for name in mixers.REGISTRY for f in mixers.get(name).DEFAULTS}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r} (model fields: "
                              f"{', '.join(MODEL_FIELDS)}; mixer fields go in "
                              f"model.mixers.<name>)")
        entries = cfg.get("mixers") or default_mixers(*{n for n in cfg.mixer_pattern})
        entries = {name: dict(entry) for name, entry in dict(entries).items()}
        for name, entry in entries.items():
            fields = mixers.get(entry.get("kind", name)).DEFAULTS
            entry.update({k: v for k, v in flat.items() if k in fields})
        for k in flat:
            del cfg[k]
        cfg.mixers = entries
        log.info("%s: flat mixer fields %s read into model.mixers (the layout before "
                 "per-mixer sub-configs)", where, ", ".join(sorted(flat)))
    if "mixers" not in cfg:
        cfg.mixers = default_mixers(*{n for n in cfg.mixer_pattern})
    for name, entry in cfg.mixers.items():
        _check_entry(name, entry)
    return cfg


def mixer_config(cfg, name, extra=None):
    """The frozen config the mixer of sub-config `name` is built with: the shared model
    fields, then the mixer's defaults, then the entry's own fields (then `extra`)."""
    entry = dict(cfg.mixers[name])
    kind = entry.pop("kind", name)
    shared = {k: cfg[k] for k in SHARED if k in cfg}
    return ml_collections.FrozenConfigDict({**shared, **mixers.get(kind).DEFAULTS, **entry,
                                            **(extra or {})})


def duo_fields(cfg, layer, cls):
    """The DuoAttention settings of one layer (`model.duo`, written by jaxmix.duo):
    {"retrieval": retrieval KV heads per layer (-1: plain attention), "sink", "recent",
    "gates": gate training}. Empty for layers whose mixer does not take them."""
    duo = cfg.get("duo") or None
    if duo is None or not getattr(cls, "DUO", False):
        return {}
    retrieval = tuple(duo.get("retrieval") or ())
    if retrieval and len(retrieval) != cfg.n_layers:
        raise ConfigError(f"model.duo.retrieval has {len(retrieval)} entries; the model has "
                          f"n_layers={cfg.n_layers}")
    return {"duo_retrieval": int(retrieval[layer]) if retrieval else -1,
            "duo_sink": int(duo.get("sink", 64)), "duo_recent": int(duo.get("recent", 256)),
            "duo_gates": bool(duo.get("gates", False))}


def layer_kinds(cfg):
    """The sub-config name of every layer: the pattern tiled to n_layers."""
    pattern = tuple(cfg.mixer_pattern)
    if not pattern or cfg.n_layers % len(pattern):
        raise ConfigError(f"model.mixer_pattern: length {len(pattern)} must divide "
                          f"model.n_layers={cfg.n_layers}; give one name per layer or a "
                          f"repeating unit")
    for name in pattern:
        mixers.get(kind_of(cfg, name))
    return pattern * (cfg.n_layers // len(pattern))


def layer_mixers(cfg):
    """[(sub-config name, mixer class, its frozen config)] for every layer."""
    out = []
    for i, name in enumerate(layer_kinds(cfg)):
        cls = mixers.get(kind_of(cfg, name))
        out.append((name, cls, mixer_config(cfg, name, duo_fields(cfg, i, cls))))
    return out
