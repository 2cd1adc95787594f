"""The language-model backbone: embed -> blocks -> norm -> logits.

Blocks follow `cfg.mixer_pattern` (tiled to `cfg.n_layers`): each is a pre-norm
residual mixer, plus a pre-norm SwiGLU MLP when `cfg.d_ff > 0` (Llama-style).
The residual stream is kept in fp32.

Aux outputs of the mixers are averaged over the layers of each model.mixers entry and
returned as "<entry>/<name>"; "aux_loss" is the sum of the entries' loss terms times
their `aux_weight` (what the trainer adds to the cross-entropy).

Blocks are rematerialised as `model.remat` says (`jaxmix.models.remat`). Layers that
repeat (the pattern tiled R >= 2 times, every repeat configured alike) run as one
`lax.scan` over the repeats when `model.scan_layers` says "scan" ("auto", the
default: on TPU/GPU, not on the CPU backend) and no decoding cache is in use: XLA
compiles one repeat of the pattern instead of all n_layers blocks. On CPU the
unrolled blocks train faster (measured 25-35% on the default Mamba preset: XLA:CPU
runs a loop body's work on fewer threads), and small models compile quickly anyway. The parameters keep their per-layer layout (`layers_<i>`) either way,
so checkpoints, conversions and per-layer tools see one tree; the scan stacks them
along a leading repeat axis inside the step (one extra copy of the block parameters
and of their gradients, which XLA frees after use).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import cpu
from jaxmix.errors import ConfigError
from jaxmix.models import remat
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


LAYOUTS = ("auto", "scan", "unroll")


def layer_layout(cfg):
    """`model.scan_layers` resolved for the default backend: "scan" or "unroll" ("auto":
    scan on TPU/GPU, unroll on the CPU backend; true/false read as scan/unroll)."""
    value = cfg.get("scan_layers", "auto")
    if isinstance(value, bool):
        return "scan" if value else "unroll"
    if value not in LAYOUTS:
        raise ConfigError(f"model.scan_layers={value!r}: choose from {', '.join(LAYOUTS)}")
    if value == "auto":
        return "unroll" if cpu.on_cpu() else "scan"
    return value


def scan_repeat(cfg, layers):
    """The pattern's length P when the layers run as a scan over repeats of it:
    `layer_layout` is "scan", the pattern repeats at least twice, and layer i is
    configured exactly as layer i + P (DuoAttention's per-layer head split, for one,
    is not); else 0."""
    period = len(tuple(cfg.mixer_pattern))
    if layer_layout(cfg) != "scan" or len(layers) < 2 * period:
        return 0
    same = all(layers[i][1:] == layers[i % period][1:] for i in range(len(layers)))
    return period if same else 0


def scan_blocks(cfg, layers, period, params, x, segment_ids, positions, train, rng=None):
    """The blocks as one lax.scan over the R = n_layers / P repeats of the pattern:
    (x after the last block, [aux of every layer]). The params of layer r * P + k are
    the k-th entry of repeat r; each block is rematerialised as `model.remat` says.
    `rng` (the "mixer" stream's key, when the caller has one) is split per layer."""
    params = nn.unbox(params)
    repeats = len(layers) // period
    stacked = [jax.tree.map(lambda *ps: jnp.stack(ps),
                            *[params[f"layers_{r * period + k}"] for r in range(repeats)])
               for k in range(period)]
    policy = remat.policy_name(cfg)

    def block_fn(k):
        _, cls, mixer_cfg = layers[k]
        block = Block(cfg, cls, mixer_cfg, parent=None)

        def apply(p, x, key):
            rngs = None if key is None else {"mixer": jax.random.fold_in(key, k)}
            y, _, aux = block.apply({"params": p}, x, segment_ids, positions, None, False,
                                    train, rngs=rngs)
            return y, aux
        if policy == "none":
            return apply
        return jax.checkpoint(apply, policy=remat.checkpoint_policy(policy),
                              prevent_cse=False)

    fns = [block_fn(k) for k in range(period)]

    def body(x, xs):
        ps, key = xs
        auxes = []
        for k in range(period):
            x, aux = fns[k](ps[k], x, key)
            auxes.append(aux)
        return x, auxes

    keys = None if rng is None else jax.random.split(rng, repeats)
    x, aux_RK = jax.lax.scan(body, x, (stacked, keys))
    layer_aux = [jax.tree.map(lambda a: a[r], aux_RK[k])
                 for r in range(repeats) for k in range(period)]
    return x, layer_aux


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
        layers = layer_mixers(cfg)
        repeat = scan_repeat(cfg, layers)
        if repeat and cache is None and not decode and not self.is_initializing():
            rng = self.make_rng("mixer") if self.has_rng("mixer") else None
            x, layer_aux = scan_blocks(cfg, layers, repeat, self.variables["params"], x,
                                       segment_ids, positions, train, rng)
            new_cache = [None] * len(layers)
        else:
            policy = remat.policy_name(cfg)
            block_cls = Block if policy == "none" else nn.remat(
                Block, static_argnums=(5, 6), policy=remat.checkpoint_policy(policy))
            layer_aux, new_cache = [], []
            for i, (_, cls, mixer_cfg) in enumerate(layers):
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
