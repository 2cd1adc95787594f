"""The language-model backbone: embed -> blocks -> norm -> logits.

Blocks follow `cfg.mixer_pattern` (tiled to `cfg.n_layers`): each is a pre-norm
residual mixer, plus a pre-norm SwiGLU MLP when `cfg.d_ff > 0` (Llama-style).
The residual stream is kept in fp32.

Aux outputs of the mixers are averaged over the layers of each model.mixers entry and
returned as "<entry>/<name>"; "aux_loss" is the sum of the entries' loss terms times
their `aux_weight` (what the trainer adds to the cross-entropy).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmix.models.config import layer_mixers
from jaxmix.nn import DenseGeneral, RMSNorm, SwiGLU, compute_dtype, constrain


def padded_vocab(cfg):
    multiple = cfg.get("vocab_multiple", 8)
    return -(-cfg.vocab_size // multiple) * multiple


class Block(nn.Module):
    cfg: Any
    mixer_cls: Any      # the layer's mixer class and its frozen config (layer_mixers)
    mixer_cfg: Any

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache, decode, train):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        eps = cfg.get("norm_eps", 1e-5)
        h = RMSNorm(eps, dtype, name="norm")(x)
        y, new_cache, aux = self.mixer_cls(self.mixer_cfg, name="mixer")(
            h, segment_ids=segment_ids, positions=positions, cache=cache, decode=decode,
            train=train)
        x = x + y.astype(jnp.float32)
        if cfg.get("d_ff", 0):
            h = RMSNorm(eps, dtype, name="mlp_norm")(x)
            x = x + SwiGLU(cfg.d_ff, cfg.n_layers, cfg.get("mlp_bias", False), dtype,
                           name="mlp")(h).astype(jnp.float32)
        return constrain(x, ("batch", "length", "embed")), new_cache, aux


def combine_aux(cfg, layer_aux):
    """{"<entry>/<name>": mean over that entry's layers} plus "aux_loss" (weighted sum
    of the loss terms) from the per-layer aux dicts."""
    sums, counts = {}, {}
    for (name, _, _), aux in zip(layer_mixers(cfg), layer_aux):
        for key, value in aux.items():
            k = f"{name}/{key}"
            sums[k] = sums.get(k, 0.0) + value
            counts[k] = counts.get(k, 0) + 1
    out = {k: v / counts[k] for k, v in sums.items()}
    if out:
        out["aux_loss"] = sum(
            cfg.mixers[k.split("/")[0]].get("aux_weight", 0.0) * v
            for k, v in out.items() if k.endswith("loss"))
    return out


class LM(nn.Module):
    """Returns (logits [B, L, V_padded], aux); with `decode=True` also the new cache.
    With `hidden=True` the final-normed hidden states [B, L, d_model] fp32 replace the
    logits (what DuoAttention's gate training distils)."""
    cfg: Any

    @nn.compact
    def __call__(self, tokens_BL, *, segment_ids=None, positions=None, cache=None,
                 decode=False, train=False, hidden=False):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        vocab = padded_vocab(cfg)
        embed = nn.Embed(vocab, cfg.d_model, dtype=dtype, name="embed",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")))
        x = constrain(embed(tokens_BL).astype(jnp.float32), ("batch", "length", "embed"))
        block_cls = nn.remat(Block, static_argnums=(5, 6)) if cfg.get("remat") else Block
        layer_aux, new_cache = [], []
        for i, (_, cls, mixer_cfg) in enumerate(layer_mixers(cfg)):
            layer_cache = cache[i] if cache is not None else None
            x, c, aux = block_cls(cfg, cls, mixer_cfg, name=f"layers_{i}")(
                x, segment_ids, positions, layer_cache, decode, train)
            new_cache.append(c)
            layer_aux.append(aux)
        x = RMSNorm(cfg.get("norm_eps", 1e-5), dtype, name="norm_f")(x)
        if hidden:
            return x.astype(jnp.float32), combine_aux(cfg, layer_aux)
        if cfg.get("tie_embeddings", True):
            logits = embed.attend(x.astype(dtype))
        else:
            logits = DenseGeneral(vocab, ("embed", "vocab"), dtype=dtype, name="lm_head")(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        aux = combine_aux(cfg, layer_aux)
        return (logits, aux, new_cache) if decode else (logits, aux)

    def example_inputs(self, seq_len):
        """(args, kwargs) of a call for model init."""
        return (jnp.zeros((1, seq_len), jnp.int32),), {}
