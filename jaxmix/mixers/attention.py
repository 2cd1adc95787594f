"""Multi-head attention mixer (Llama-style): GQA, rotary embeddings, KV cache.

q_proj / k_proj / v_proj -> rotary embeddings (half-split `rotate_half`
convention, cos/sin of cat(freqs, freqs), theta = cfg.rope_theta) at `positions`
(default 0..L-1) -> causal `ops.attention` with segment ids and an optional
sliding window -> o_proj. Names match HF `LlamaAttention` (q/k/v/o_proj), kernels
stored [in, out]. The output projection is initialised scaled by 1/sqrt(n_layers).

Decoding (`decode=True`) uses a preallocated cache (`init_cache`)
  {"k": [B, max_len, Hkv, D], "v": [B, max_len, Hkv, D], "index": int32 scalar}:
the new keys/values are written at `index`, queries sit at positions
index + arange(L) and attend (causally, by position) over the filled part; the
returned cache has index + L; a single new token attends with a plain fp32 softmax
(`ops.decode_attention`), longer chunks with the blocked path. Without a cache one is
allocated with
max_len = cfg.max_cache_len. Writing past max_len is not checked inside jit
(dynamic_update_slice clamps): size the cache for the whole sequence. Segment ids are
ignored while decoding.

The pieces (`project`, `attend`, `project_out`) are methods so that variants of
attention (jaxmix.mixers.moh) reuse them and keep the same weight names.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import ops, parallel
from jaxmix.ops.attention import mask_of
from jaxmix.errors import ConfigError
from jaxmix.nn import DenseGeneral, compute_dtype, constrain, scaled_init, torch_linear_init

# n_kv_heads 0: = n_heads; head_dim 0: d_model // n_heads; sliding_window 0: none.
DEFAULTS = dict(n_heads=4, n_kv_heads=0, head_dim=0, rope_theta=10000.0, sliding_window=0,
                attn_impl="auto", attn_bias=False, max_cache_len=2048, ring_layout="zigzag")
CACHE_AXES = {"k": ("batch", "cache_length", "kv_heads", "kv"),
              "v": ("batch", "cache_length", "kv_heads", "kv"), "index": ()}


def head_shape(cfg, d_model=None):
    """(n_heads, n_kv_heads, head_dim) with the config's defaults, validated."""
    d_model = d_model or cfg.d_model
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
    DEFAULTS = DEFAULTS
    FIXED_SIZE_CACHE = False  # the KV cache holds max_len tokens

    # ------------------------------------------------------------------ pieces
    def project(self, x_BLD):
        """(q [B, L, Hq, D], k, v [B, L, Hkv, D]) before rotary embeddings."""
        bsz, length, _ = x_BLD.shape
        hq, hkv, hd = head_shape(self.cfg)

        def proj(heads, axis, name):
            y = DenseGeneral(heads * hd, ("embed", axis), use_bias=self.cfg.attn_bias,
                             dtype=compute_dtype(self.cfg), name=name)(x_BLD)
            return constrain(y.reshape(bsz, length, heads, hd),
                             ("batch", "length", axis, "kv"))

        return proj(hq, "heads", "q_proj"), proj(hkv, "kv_heads", "k_proj"), \
            proj(hkv, "kv_heads", "v_proj")

    def positions(self, bsz, length, positions, cache, decode):
        """(query positions [B, L] for masks, rotary positions [B, L])."""
        start = cache["index"].astype(jnp.int32) if decode else 0
        q_pos_BL = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32),
                                    (bsz, length))
        return q_pos_BL, (q_pos_BL if positions is None else positions)

    def write_cache(self, cache, k_BLKD, v_BLKD):
        """(cache with the new keys/values written at its index, their start)."""
        start = cache["index"].astype(jnp.int32)
        k_all = jax.lax.dynamic_update_slice(cache["k"], k_BLKD.astype(cache["k"].dtype),
                                             (0, start, 0, 0))
        v_all = jax.lax.dynamic_update_slice(cache["v"], v_BLKD.astype(cache["v"].dtype),
                                             (0, start, 0, 0))
        return {"k": k_all, "v": v_all, "index": start + k_BLKD.shape[1]}

    def attend(self, q_BLHD, k_BLKD, v_BLKD, q_pos_BL, segment_ids, cache, decode):
        """(attention output [B, L, Hq, D], new cache or None): over the cache when
        decoding, else ring attention across `mesh.sequence` (> 1) or ops.attention."""
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        window = cfg.sliding_window or None
        if not decode:
            o_BLHD = parallel.sequence_parallel_attention(
                q_BLHD, k_BLKD, v_BLKD, causal=True, segment_ids=segment_ids,
                sliding_window=window, impl=cfg.attn_impl, layout=cfg.ring_layout)
            return constrain(o_BLHD, ("batch", "length", "heads", "kv")), None
        new_cache = self.write_cache(cache, k_BLKD, v_BLKD)
        bsz, length, hq, hd = q_BLHD.shape
        max_len, hkv = new_cache["k"].shape[1:3]
        kv_pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (bsz, max_len))
        k_all, v_all = new_cache["k"].astype(dtype), new_cache["v"].astype(dtype)
        if length == 1 and cfg.attn_impl != "reference":  # one token: a plain softmax
            mask_BS = mask_of(q_pos_BL, kv_pos, None, None, True, window)[:, 0]
            o = ops.decode_attention(q_BLHD.reshape(bsz, hkv, hq // hkv, hd),
                                     k_all.transpose(0, 2, 1, 3), v_all.transpose(0, 2, 1, 3),
                                     mask_BS)
            return o.reshape(bsz, 1, hq, hd), new_cache
        o_BLHD = ops.attention(q_BLHD, k_all, v_all, causal=True, sliding_window=window,
                               impl="reference" if cfg.attn_impl == "reference" else "xla",
                               q_positions=q_pos_BL, kv_positions=kv_pos)
        return o_BLHD, new_cache

    def project_out(self, o_BLHD):
        bsz, length, hq, hd = o_BLHD.shape
        out_init = scaled_init(torch_linear_init, self.cfg.n_layers)
        return DenseGeneral(self.cfg.d_model, ("heads", "embed"), use_bias=self.cfg.attn_bias,
                            init=out_init, dtype=compute_dtype(self.cfg),
                            name="o_proj")(o_BLHD.reshape(bsz, length, hq * hd))

    # ------------------------------------------------------------------ the mixer
    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
                 train=False):
        del train  # no dropout or routing
        bsz, length, _ = x_BLD.shape
        q_BLHD, k_BLKD, v_BLKD = self.project(x_BLD)
        if decode and cache is None:
            cache = self.init_cache(bsz, self.cfg.max_cache_len, compute_dtype(self.cfg))
        q_pos_BL, rope_pos = self.positions(bsz, length, positions, cache, decode)
        q_BLHD = rotary(q_BLHD, rope_pos, self.cfg.rope_theta)
        k_BLKD = rotary(k_BLKD, rope_pos, self.cfg.rope_theta)
        o_BLHD, new_cache = self.attend(q_BLHD, k_BLKD, v_BLKD, q_pos_BL, segment_ids, cache,
                                        decode)
        return self.project_out(o_BLHD), new_cache, {}

    def init_cache(self, batch, max_len, dtype=jnp.float32):
        """An empty KV cache of `max_len` slots (logical axes: CACHE_AXES)."""
        _, hkv, hd = head_shape(self.cfg)
        zeros = jnp.zeros((batch, max_len, hkv, hd), dtype)
        return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32)}

    def cache_axes(self):
        return CACHE_AXES
