"""Multi-head attention mixer (Llama-style): GQA, rotary embeddings, KV cache.

q_proj / k_proj / v_proj -> rotary embeddings (half-split `rotate_half`
convention, cos/sin of cat(freqs, freqs), theta = cfg.rope_theta) at `positions`
(default 0..L-1) -> causal `ops.attention` with segment ids and an optional
sliding window -> o_proj. Names match HF `LlamaAttention` (q/k/v/o_proj), kernels
stored [in, out]. The output projection is initialised scaled by 1/sqrt(n_layers).

Decoding (`decode=True`) uses a preallocated cache
  {"k": [B, max_len, Hkv, D], "v": [B, max_len, Hkv, D], "index": int32 scalar}:
the new keys/values are written at `index`, queries sit at positions
index + arange(L) and attend (causally, by position) over the filled part; the
returned cache has index + L. Without a cache one is allocated with
max_len = cfg.max_cache_len (default 2048). Writing past max_len is not checked
inside jit (dynamic_update_slice clamps): size the cache for the whole sequence.
Segment ids are ignored while decoding.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import ops, parallel
from jaxmix.errors import ConfigError
from jaxmix.models.layers import (DenseGeneral, compute_dtype, constrain, scaled_init,
                                  torch_linear_init)


def head_shape(cfg, d_model):
    """(n_heads, n_kv_heads, head_dim) with the config's defaults, validated."""
    hq = cfg.n_heads
    hkv = cfg.get("n_kv_heads", 0) or hq
    hd = cfg.get("head_dim", 0) or d_model // hq
    if hq % hkv:
        raise ConfigError(f"model.n_heads={hq} must be a multiple of model.n_kv_heads={hkv}")
    if hd % 2:
        raise ConfigError(f"model.head_dim={hd} must be even for rotary embeddings; "
                          f"set model.head_dim or change model.d_model/n_heads")
    return hq, hkv, hd


def rotary(x_BLHD, positions_BL, theta):
    """Rotary embedding, half-split convention: x * cos + rotate_half(x) * sin (fp32)."""
    d = x_BLHD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions_BL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x = x_BLHD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BLHD.dtype)


class Attention(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        bsz, length, d_model = x_BLD.shape
        hq, hkv, hd = head_shape(cfg, d_model)
        bias = cfg.get("attn_bias", False)
        window = cfg.get("sliding_window", 0) or None
        impl = cfg.get("attn_impl", "auto")

        def proj(heads, axis, name):
            y = DenseGeneral(heads * hd, ("embed", axis), use_bias=bias, dtype=dtype,
                             name=name)(x_BLD)
            return constrain(y.reshape(bsz, length, heads, hd),
                             ("batch", "length", axis, "kv"))

        q_BLHD = proj(hq, "heads", "q_proj")
        k_BLKD = proj(hkv, "kv_heads", "k_proj")
        v_BLKD = proj(hkv, "kv_heads", "v_proj")

        if decode and cache is None:
            cache = self.init_cache(bsz, d_model, dtype)
        start = cache["index"].astype(jnp.int32) if decode else 0
        q_pos_BL = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32),
                                    (bsz, length))
        rope_pos = q_pos_BL if positions is None else positions
        theta = cfg.get("rope_theta", 10000.0)
        q_BLHD = rotary(q_BLHD, rope_pos, theta)
        k_BLKD = rotary(k_BLKD, rope_pos, theta)

        new_cache = None
        if decode:
            k_all = jax.lax.dynamic_update_slice(cache["k"], k_BLKD.astype(cache["k"].dtype),
                                                 (0, start, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v_BLKD.astype(cache["v"].dtype),
                                                 (0, start, 0, 0))
            new_cache = {"k": k_all, "v": v_all, "index": start + length}
            max_len = k_all.shape[1]
            kv_pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (bsz, max_len))
            o_BLHD = ops.attention(q_BLHD, k_all.astype(dtype), v_all.astype(dtype),
                                   causal=True, sliding_window=window,
                                   impl="reference" if impl == "reference" else "xla",
                                   q_positions=q_pos_BL, kv_positions=kv_pos)
        else:
            # Ring attention over the mesh's `sequence` axis when it is > 1, else ops.attention.
            o_BLHD = parallel.sequence_parallel_attention(
                q_BLHD, k_BLKD, v_BLKD, causal=True, segment_ids=segment_ids,
                sliding_window=window, impl=impl, layout=cfg.get("ring_layout", "zigzag"))
        o_BLHD = constrain(o_BLHD, ("batch", "length", "heads", "kv"))
        out_init = scaled_init(torch_linear_init, cfg.n_layers)
        y_BLD = DenseGeneral(d_model, ("heads", "embed"), use_bias=bias, init=out_init,
                             dtype=dtype, name="o_proj")(o_BLHD.reshape(bsz, length, hq * hd))
        return y_BLD, new_cache, {}

    def init_cache(self, batch, d_model, dtype=jnp.float32, max_len=None):
        """An empty KV cache of max_len (default cfg.max_cache_len or 2048) slots."""
        _, hkv, hd = head_shape(self.cfg, d_model)
        max_len = max_len or self.cfg.get("max_cache_len", 2048)
        zeros = jnp.zeros((batch, max_len, hkv, hd), dtype)
        return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32)}
