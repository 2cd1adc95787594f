"""The language-model backbone: embed -> blocks -> norm -> logits.

Blocks follow `cfg.mixer_pattern` (tiled to `cfg.n_layers`): each is a pre-norm
residual mixer, plus a pre-norm SwiGLU MLP when `cfg.d_ff > 0` (Llama-style).
The residual stream is kept in fp32.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmix import mixers
from jaxmix.errors import ConfigError
from jaxmix.models.layers import DenseGeneral, RMSNorm, SwiGLU, compute_dtype, constrain


def padded_vocab(cfg):
    multiple = cfg.get("vocab_multiple", 8)
    return -(-cfg.vocab_size // multiple) * multiple


def layer_kinds(cfg):
    """The mixer name of every layer: the pattern tiled to n_layers."""
    pattern = tuple(cfg.mixer_pattern)
    if not pattern or cfg.n_layers % len(pattern):
        raise ConfigError(f"model.mixer_pattern: length {len(pattern)} must divide "
                          f"model.n_layers={cfg.n_layers}; give one name per layer or a "
                          f"repeating unit")
    for name in pattern:
        mixers.get(name)
    return pattern * (cfg.n_layers // len(pattern))


class Block(nn.Module):
    cfg: Any
    kind: str

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache, decode):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        eps = cfg.get("norm_eps", 1e-5)
        h = RMSNorm(eps, dtype, name="norm")(x)
        y, new_cache, aux = mixers.get(self.kind)(cfg, name="mixer")(
            h, segment_ids=segment_ids, positions=positions, cache=cache, decode=decode)
        x = x + y.astype(jnp.float32)
        if cfg.get("d_ff", 0):
            h = RMSNorm(eps, dtype, name="mlp_norm")(x)
            x = x + SwiGLU(cfg.d_ff, cfg.n_layers, cfg.get("mlp_bias", False), dtype,
                           name="mlp")(h).astype(jnp.float32)
        return constrain(x, ("batch", "length", "embed")), new_cache, aux


class LM(nn.Module):
    """Returns (logits [B, L, V_padded], aux); with `decode=True` also the new cache."""
    cfg: Any

    @nn.compact
    def __call__(self, tokens_BL, *, segment_ids=None, positions=None, cache=None,
                 decode=False):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        vocab = padded_vocab(cfg)
        embed = nn.Embed(vocab, cfg.d_model, dtype=dtype, name="embed",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")))
        x = constrain(embed(tokens_BL).astype(jnp.float32), ("batch", "length", "embed"))
        block_cls = nn.remat(Block, static_argnums=(5,)) if cfg.get("remat") else Block
        aux, new_cache = {}, []
        for i, kind in enumerate(layer_kinds(cfg)):
            layer_cache = cache[i] if cache is not None else None
            x, c, layer_aux = block_cls(cfg, kind, name=f"layers_{i}")(
                x, segment_ids, positions, layer_cache, decode)
            new_cache.append(c)
            for key, value in layer_aux.items():
                aux[key] = aux.get(key, 0.0) + value
        x = RMSNorm(cfg.get("norm_eps", 1e-5), dtype, name="norm_f")(x)
        if cfg.get("tie_embeddings", True):
            logits = embed.attend(x.astype(dtype))
        else:
            logits = DenseGeneral(vocab, ("embed", "vocab"), dtype=dtype, name="lm_head")(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return (logits, aux, new_cache) if decode else (logits, aux)
