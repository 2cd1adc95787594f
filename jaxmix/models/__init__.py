"""Model builders: `models.build(config.model)` returns a flax.linen Module."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmix.errors import ConfigError
from jaxmix.models.config import (SHARED, default_mixers, kind_of, layer_kinds, layer_mixers,
                                  mixer_config, normalize_config)
from jaxmix import mixers
from jaxmix.models import encoder, remat
from jaxmix.models.encoder import Encoder
from jaxmix.models import lm
from jaxmix.models.lm import LM, padded_vocab

FAMILIES = {"lm": LM, "encoder": Encoder}


def check_family(cfg):
    """One-line errors: the lm family takes causal mixers only, the encoder family
    bidirectional ones, and the encoder's fields must fit together."""
    family = cfg.get("family", "lm")
    for name, cls, mixer_cfg in layer_mixers(cfg):
        kind = kind_of(cfg, name)
        causal = mixers.is_causal(cls, mixer_cfg)
        if family == "lm" and not causal:
            raise ConfigError(f"model.mixers.{name}: the {kind} mixer is bidirectional (it "
                              f"sees later positions); model.family='lm' takes causal mixers "
                              f"only; use it with model.family='encoder'")
        if family == "encoder" and causal:
            hint = (f"set model.mixers.{name}.causal=False" if getattr(cls, "CAUSAL", True)
                    is None else "use bimamba, mambamixer or attention with causal=False")
            raise ConfigError(f"model.mixers.{name}: the {kind} mixer is causal; "
                              f"model.family='encoder' takes bidirectional mixers: {hint}")
    if family != "encoder":
        return
    head = encoder.field(cfg, "head")
    if head not in encoder.HEADS:
        raise ConfigError(f"model.head={head!r}: choose from {', '.join(encoder.HEADS)}")
    patch_dim = encoder.field(cfg, "patch_dim")
    if head == "classify" and encoder.field(cfg, "n_classes") < 2:
        raise ConfigError("model.n_classes: a classify head needs n_classes >= 2")
    if head == "masked_patch" and not patch_dim:
        raise ConfigError("model.head='masked_patch' needs patch inputs (model.patch_dim > 0)")
    if head == "masked_token" and patch_dim:
        raise ConfigError("model.head='masked_token' needs token inputs (model.patch_dim=0)")
    if encoder.field(cfg, "pool") not in ("mean", "cls"):
        raise ConfigError(f"model.pool={cfg.pool!r}: use 'mean' or 'cls'")
    if encoder.field(cfg, "pool") == "cls" and not encoder.field(cfg, "cls_token"):
        raise ConfigError("model.pool='cls' needs model.cls_token=True")


def build(model_config):
    """The Module described by `model_config` (a ConfigDict or dict; configs with flat
    mixer fields are read as `normalize_config` says)."""
    cfg = ml_collections.FrozenConfigDict(normalize_config(model_config))
    family = cfg.get("family", "lm")
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown {family!r}; choose from {sorted(FAMILIES)}")
    remat.policy_name(cfg)
    lm.layer_layout(cfg)
    for name, cls, mixer_cfg in layer_mixers(cfg):  # early checks, outside jit
        if hasattr(cls, "check_config"):
            cls.check_config(mixer_cfg, f"model.mixers.{name}")
    check_family(cfg)
    return FAMILIES[family](cfg)


def abstract_params(model):
    """The params tree of `model` as ShapeDtypeStructs (no arrays made)."""
    args, kwargs = model.example_inputs(1)
    return nn.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs)["params"]))


def named_params(tree):
    """{"a/b/c": leaf} of a params tree, in its flattening order."""
    return {"/".join(str(getattr(p, "key", p)) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_param_shape(where, name, have, want):
    """One-line ConfigError when a loaded param's shape is not the model's."""
    if tuple(have.shape) != tuple(want.shape):
        raise ConfigError(f"{where}: param {name} has shape {tuple(have.shape)}, the model "
                          f"wants {tuple(want.shape)}")


def graft(fresh, loaded, where):
    """`fresh` params with every leaf that `loaded` has under the same name put in its
    place (a pretrained backbone under a new head); loaded leaves the model lacks (the
    pretraining heads) are dropped. Logs which params start fresh; a shape mismatch is
    a one-line ConfigError, as is a checkpoint that shares nothing with the model."""
    import logging
    have, want = named_params(loaded), named_params(fresh)
    out, kept = [], []
    for name, leaf in want.items():
        if name in have:
            check_param_shape(where, name, have[name], leaf)
            out.append(jax.device_put(jnp.asarray(have[name], leaf.dtype), leaf.sharding))
            kept.append(name)
        else:
            out.append(leaf)
    if not kept:
        raise ConfigError(f"{where}: the checkpoint has no param of this model; it was "
                          f"written for another model config")
    fresh_names = sorted({n.split("/")[0] for n in want} - {n.split("/")[0] for n in kept})
    logging.getLogger("jaxmix").info("%s: %d params loaded, starting fresh: %s", where,
                                     len(kept), ", ".join(fresh_names) or "none")
    return jax.tree.unflatten(jax.tree.structure(fresh), out)


def example_inputs(model, seq_len=1):
    """(args, kwargs) of a call of `model` that creates all its params (model init)."""
    return model.example_inputs(seq_len)


def adapt_params(params, target_config):
    """`params` of some model (a checkpoint's), made to fit `target_config`: each
    layer whose mixer class lists `ZERO_PARAMS` (weights another mixer's layer lacks:
    MoH's routers, next to the q/k/v/o projections it shares with attention) gets those
    it misses as zeros (learned routers start uniform). Anything else that does not
    fit is left to workdir.check_params to name."""
    target = ml_collections.FrozenConfigDict(normalize_config(target_config))
    zero = {i: cls.ZERO_PARAMS for i, (_, cls, _) in enumerate(layer_mixers(target))
            if getattr(cls, "ZERO_PARAMS", ())}
    if not zero:
        return params
    abstract = abstract_params(LM(target))
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


__all__ = ["build", "LM", "Encoder", "example_inputs", "check_family", "abstract_params",
           "graft", "named_params", "check_param_shape", "padded_vocab", "layer_kinds",
           "layer_mixers", "mixer_config", "normalize_config", "default_mixers", "kind_of",
           "adapt_params", "SHARED"]
