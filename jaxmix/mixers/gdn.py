"""Gated DeltaNet mixer: the gated delta rule (`ops.gated_delta_rule`) as a layer.

As the layer in flash-linear-attention (fla): q_proj, k_proj [D, H * d_k], v_proj
[D, H * d_v] -> a causal depthwise short conv (kernel d_conv, no bias) and SiLU on
each -> per-head q, k (L2-normalised inside the op), v; beta = sigmoid(b_proj(x)) and
the log decay g = -exp(A_log) * softplus(a_proj(x) + dt_bias) per head ->
o = gated delta rule -> RMSNorm over d_v (weight `o_norm`) times SiLU(g_proj(x)) ->
o_proj. d_k = head_dim (0: d_model // n_heads), d_v = d_k * expand_v.
Initialisation: A ~ U(1, 16) (fla draws from (0, 16); 1 keeps log A finite), dt_bias
as Mamba's (inverse softplus of dt ~ logU(1e-3, 1e-1)), projections as torch Linear,
o_proj scaled by 1/sqrt(n_layers). Segment ids reset the state at document starts
and keep the short convs inside each document (packed documents never mix).

Decoding: cache {"conv_q", "conv_k", "conv_v": the last d_conv - 1 inputs of each
conv, "state": [B, H, d_k, d_v] fp32}; a prompt continues the state with the chunked
op, a single token runs one step of the recurrence.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import ops, parallel
from jaxmix.ops import _impl
from jaxmix.errors import ConfigError
from jaxmix.mixers.mamba import dt_bias_init, uniform_init
from jaxmix.nn import (DenseGeneral, compute_dtype, constrain, param_with_axes, scaled_init,
                       torch_linear_init)

DEFAULTS = dict(n_heads=4, head_dim=0, expand_v=1.0, d_conv=4, chunk_size=64,
                delta_impl="auto")
CACHE_AXES = {"conv_q": ("batch", None, "mlp"), "conv_k": ("batch", None, "mlp"),
              "conv_v": ("batch", None, "mlp"), "state": ("batch", "heads", None, None)}


def dims(cfg, where="model.mixers.gdn"):
    """(heads, d_k, d_v), checked."""
    h = cfg.n_heads
    if h <= 0:
        raise ConfigError(f"{where}.n_heads={h} must be positive")
    if not cfg.head_dim and cfg.d_model % h:
        raise ConfigError(f"{where}: n_heads={h} does not divide d_model={cfg.d_model}; "
                          f"set head_dim or another n_heads")
    d_k = cfg.head_dim or cfg.d_model // h
    d_v = d_k * cfg.expand_v
    if d_v != int(d_v) or d_v < 1:
        raise ConfigError(f"{where}: head dim {d_k} x expand_v={cfg.expand_v} is not a "
                          f"positive whole number")
    return h, d_k, int(d_v)


def check_config(cfg, where="model.mixers.gdn"):
    dims(cfg, where)
    if cfg.chunk_size < 1:
        raise ConfigError(f"{where}.chunk_size={cfg.chunk_size} must be positive")
    if cfg.delta_impl not in _impl.IMPLS:
        raise ConfigError(f"{where}.delta_impl={cfg.delta_impl!r}: use one of "
                          f"{', '.join(_impl.IMPLS)}")
    if cfg.delta_impl == "pallas" and cfg.chunk_size % 8:
        raise ConfigError(f"{where}.chunk_size={cfg.chunk_size} must be a multiple of 8 "
                          f"with delta_impl='pallas' (the kernel's sublane tile)")


def log_decay(a, A_log, dt_bias):
    """g = -exp(A_log) * softplus(a + dt_bias), fp32 [..., H]."""
    return -jnp.exp(A_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)


def a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


class GatedDeltaNet(nn.Module):
    cfg: Any
    DEFAULTS = DEFAULTS
    FIXED_SIZE_CACHE = True  # init_cache ignores max_len: conv windows and the state
    check_config = staticmethod(check_config)

    # ------------------------------------------------------------------ pieces
    # (jaxmix.mixers.mom reuses them: the same weight names and maths per memory)
    def conv_weight(self, name, width):
        k = self.cfg.d_conv
        return param_with_axes(self, f"{name}_conv", uniform_init(1 / math.sqrt(k)),
                               (k, width), (None, "mlp"))

    def short_conv(self, name, x_BLC, cache, decode, segment_ids=None):
        """(SiLU(causal depthwise conv of x), the conv's new window or None); the conv
        stays inside each segment of `segment_ids` (training only)."""
        w = self.conv_weight(name, x_BLC.shape[-1]).astype(x_BLC.dtype)
        if not decode:
            y = parallel.sequence_parallel_causal_conv(x_BLC, w, segment_ids=segment_ids)
            return jax.nn.silu(y), None
        ctx = cache[f"conv_{name}"].astype(x_BLC.dtype)
        window = jnp.concatenate([ctx, x_BLC], axis=1)[:, x_BLC.shape[1]:]
        return jax.nn.silu(parallel.causal_conv(x_BLC, w, None, ctx)), window

    def decay_params(self, h):
        """(A_log, dt_bias) [H], for `log_decay`."""
        return (param_with_axes(self, "A_log", a_log_init, (h,), (None,)),
                param_with_axes(self, "dt_bias", dt_bias_init(), (h,), (None,)))

    def output(self, o_BLHV, x_BLD):
        """o_proj(RMSNorm(o) over d_v times SiLU(g_proj(x)))."""
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        bsz, length, h, d_v = o_BLHV.shape
        o32 = o_BLHV.astype(jnp.float32)
        scale = param_with_axes(self, "o_norm", nn.initializers.ones, (d_v,), (None,))
        o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, -1, keepdims=True)
                                  + cfg.get("norm_eps", 1e-5))
        gate = DenseGeneral(h * d_v, ("embed", "mlp"), dtype=dtype, name="g_proj")(x_BLD)
        gate = gate.astype(jnp.float32).reshape(bsz, length, h, d_v)
        o = (o32 * scale * jax.nn.silu(gate)).astype(dtype).reshape(bsz, length, h * d_v)
        o = constrain(o, ("batch", "length", "mlp"))
        return DenseGeneral(cfg.d_model, ("mlp", "embed"), dtype=dtype, name="o_proj",
                            init=scaled_init(torch_linear_init, cfg.n_layers))(o)

    # ------------------------------------------------------------------ the mixer
    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
                 train=False):
        del positions, train
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        bsz, length, _ = x_BLD.shape
        h, d_k, d_v = dims(cfg)
        if decode and cache is None:
            cache = self.init_cache(bsz, 0, dtype)

        def proj(width, name, axes=("embed", "mlp")):
            return DenseGeneral(width, axes, dtype=dtype, name=name)(x_BLD)

        new_cache = {}
        qkv = []
        for name, width in (("q", h * d_k), ("k", h * d_k), ("v", h * d_v)):
            y = constrain(proj(width, f"{name}_proj"), ("batch", "length", "mlp"))
            y, window = self.short_conv(name, y, cache, decode,
                                        None if decode else segment_ids)
            new_cache[f"conv_{name}"] = window
            qkv.append(y.reshape(bsz, length, h, -1))
        beta = jax.nn.sigmoid(proj(h, "b_proj", ("embed", None)).astype(jnp.float32))
        g = log_decay(proj(h, "a_proj", ("embed", None)), *self.decay_params(h))
        # Training: sequence-parallel over the mesh's `sequence` axis when it is > 1.
        delta_rule = ops.gated_delta_rule if decode else parallel.sequence_parallel_gated_delta_rule
        o, new_cache["state"] = delta_rule(
            *qkv, g, beta, initial_state=cache["state"] if decode else None,
            segment_ids=None if decode else segment_ids, chunk_size=cfg.chunk_size,
            impl="reference" if decode and length == 1 else cfg.delta_impl)
        return self.output(o, x_BLD), (new_cache if decode else None), {}

    def init_cache(self, batch, max_len, dtype=jnp.float32):
        """Conv windows and the delta-rule state: constant size whatever `max_len`."""
        del max_len
        h, d_k, d_v = dims(self.cfg)
        conv = lambda width: jnp.zeros((batch, self.cfg.d_conv - 1, width), dtype)
        return {"conv_q": conv(h * d_k), "conv_k": conv(h * d_k), "conv_v": conv(h * d_v),
                "state": jnp.zeros((batch, h, d_k, d_v), jnp.float32)}

    def cache_axes(self):
        return CACHE_AXES
