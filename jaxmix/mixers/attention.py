"""Multi-head attention mixer (Llama-style): GQA, rotary embeddings, KV cache.

q_proj / k_proj / v_proj -> rotary embeddings (half-split `rotate_half`
convention, cos/sin of cat(freqs, freqs), theta = cfg.rope_theta) at `positions`
(default 0..L-1) -> causal `ops.attention` with segment ids and an optional
sliding window -> o_proj. Names match HF `LlamaAttention` (q/k/v/o_proj), kernels
stored [in, out]. The output projection is initialised scaled by 1/sqrt(n_layers).

Decoding (`decode=True`) keeps its keys and values in ring buffers
(`jaxmix.mixers.kv_cache`), {"k": [B, N, Hkv, D], "v": ..., "index": int32 scalar}:
  - full attention: N = max_len slots; a write past the end poisons the output with
    NaN (inside jit nothing can be raised), and `check_decode_length` turns a length
    known up front into a ConfigError, as does a prompt longer than max_cache_len
    when no cache is passed;
  - sliding window W (with `sink` S first keys kept visible): N = S + W slots, the
    oldest overwritten, so memory is constant however long the generation;
  - DuoAttention (`duo_retrieval` = r >= 0, set per layer through `model.duo` by
    `jaxmix.duo`): the first r KV heads (retrieval heads; `jaxmix.duo` reorders the
    weights so they come first) keep a full cache in "k"/"v", the others (streaming
    heads) a sink + recent ring in "sk"/"sv" of duo_sink + duo_recent slots.
One new token is written first and attends over the cache (a plain fp32 softmax,
`ops.decode_attention`); a chunk of L > 1 tokens attends over the cache and the
chunk together, then is written, so a ring never drops a key the chunk still needs.
Streaming heads attend causally to their whole chunk during a chunked prefill (the
DuoAttention paper's prefill: the sink + recent limit holds across chunks and while
decoding); sliding-window layers apply their window exactly. Without a cache one is
allocated with max_len = cfg.max_cache_len. Segment ids are ignored while decoding.

Training and full forwards of a DuoAttention model apply the per-head masks exactly
(streaming heads: sink + recent); with `duo_gates` (gate training) every layer mixes
alpha x full + (1 - alpha) x streaming attention per KV head, alpha a parameter
"duo_alpha" [Hkv] initialised to 1.

The pieces (`project`, `attend`, `project_out`) are methods so that variants of
attention (jaxmix.mixers.moh) reuse them and keep the same weight names.
"""
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxmix import ops, parallel
from jaxmix.ops.attention import mask_of
from jaxmix.errors import ConfigError
from jaxmix.mixers import kv_cache
from jaxmix.nn import DenseGeneral, compute_dtype, constrain, scaled_init, torch_linear_init

# n_kv_heads 0: = n_heads; head_dim 0: d_model // n_heads; sliding_window 0: none;
# sink: keys at positions < sink stay visible to a sliding window (StreamingLLM).
# causal False: every position sees every other (the encoder family; no decoding).
DEFAULTS = dict(n_heads=4, n_kv_heads=0, head_dim=0, rope_theta=10000.0, sliding_window=0,
                sink=0, attn_impl="auto", attn_bias=False, max_cache_len=2048,
                ring_layout="zigzag", causal=True)
KV_AXES = ("batch", "cache_length", "kv_heads", "kv")
CACHE_AXES = {"k": KV_AXES, "v": KV_AXES, "sk": KV_AXES, "sv": KV_AXES, "index": ()}


class Part(NamedTuple):
    """A group of KV heads [lo, hi) with one cache (keys k/v in the cache dict) and one
    mask: window None is full causal attention; `full` caches must never wrap."""
    k: str
    v: str
    lo: int
    hi: int
    n_slots: int
    sink: int
    window: Optional[int]
    chunk_window: Optional[int]  # the window a chunk of L > 1 tokens uses within itself

    @property
    def full(self):
        return self.window is None


def check_config(cfg, where="model.mixers.attention"):
    """One-line errors for settings that cannot work together."""
    _, hkv, _ = head_shape(cfg)
    if cfg.get("sink", 0) < 0 or (cfg.get("sink", 0) and not cfg.sliding_window):
        raise ConfigError(f"{where}.sink={cfg.sink}: sink keys need a sliding_window > 0 "
                          f"(and sink >= 0)")
    r = cfg.get("duo_retrieval", -1)
    if not cfg.get("causal", True) and (cfg.sliding_window or r >= 0
                                        or cfg.get("duo_gates", False)):
        raise ConfigError(f"{where}.causal=False: bidirectional attention takes no "
                          f"sliding_window or DuoAttention heads")
    if r >= 0 or cfg.get("duo_gates", False):
        if cfg.sliding_window:
            raise ConfigError(f"{where}: DuoAttention on a sliding-window layer is not "
                              f"supported (sliding_window={cfg.sliding_window})")
        if r > hkv:
            raise ConfigError(f"{where}: {r} retrieval heads but the layer has {hkv} KV heads")
        if cfg.duo_sink < 0 or cfg.duo_recent < 1:
            raise ConfigError(f"model.duo: sink={cfg.duo_sink} must be >= 0 and "
                              f"recent={cfg.duo_recent} >= 1")


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
    CAUSAL = None  # cfg.causal
    FIXED_SIZE_CACHE = False  # the KV cache holds max_len tokens
    DUO = True  # takes model.duo's per-layer retrieval heads (models.layer_mixers)
    check_config = staticmethod(check_config)

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

    def parts(self, max_len):
        """The layer's cache parts (see `Part`)."""
        cfg = self.cfg
        _, hkv, _ = head_shape(cfg)
        r = cfg.get("duo_retrieval", -1)
        if r >= 0:
            s, rec = cfg.duo_sink, cfg.duo_recent
            full = [Part("k", "v", 0, r, max_len, 0, None, None)] if r else []
            stream = [Part("sk", "sv", r, hkv, s + rec, s, rec, None)] if r < hkv else []
            return full + stream
        if cfg.sliding_window:
            w, s = cfg.sliding_window, cfg.get("sink", 0)
            return [Part("k", "v", 0, hkv, s + w, s, w, w)]
        return [Part("k", "v", 0, hkv, max_len, 0, None, None)]

    def write_cache(self, cache, k_BLKD, v_BLKD):
        """The cache with new keys/values written and its index advanced (one part)."""
        (part,) = self.parts(cache["k"].shape[1])
        k, v = kv_cache.write(cache["k"], cache["v"], k_BLKD, v_BLKD, cache["index"],
                              part.sink)
        return {"k": k, "v": v, "index": cache["index"].astype(jnp.int32) + k_BLKD.shape[1]}

    def cache_positions(self, cache):
        """[B, N] token positions of the (single-part) cache's slots (EMPTY if unused)."""
        (part,) = self.parts(cache["k"].shape[1])
        pos = kv_cache.slot_positions(cache["index"], part.n_slots, part.sink)
        return kv_cache.batch_positions(pos, cache["k"].shape[0])

    def check_decode_length(self, total, where="generate"):
        """ConfigError if decoding `total` tokens would overflow a full KV cache."""
        cfg = self.cfg
        if any(p.full for p in self.parts(cfg.max_cache_len)) and total > cfg.max_cache_len:
            raise ConfigError(
                f"{where}: {total} tokens do not fit the full-attention KV cache of "
                f"max_cache_len={cfg.max_cache_len}; raise model.mixers.<name>.max_cache_len"
                f" (generate: --max_cache_len), shorten the prompt or max_new_tokens, or "
                f"decode with DuoAttention / a sliding window")

    def attend_part(self, part, q_BLHD, k_BLKD, v_BLKD, q_pos_BL, cache):
        """One cache part while decoding: (output of its query heads, its new k, v)."""
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        bsz, length = q_BLHD.shape[:2]
        index = cache["index"].astype(jnp.int32)
        ck, cv = cache[part.k], cache[part.v]
        new_k, new_v = kv_cache.write(ck, cv, k_BLKD, v_BLKD, index, part.sink)
        if length == 1 or part.full:  # nothing the chunk needs is overwritten
            k_all, v_all = new_k, new_v
            kv_pos = kv_cache.slot_positions(index + length, part.n_slots, part.sink)
        else:
            k_all = jnp.concatenate([ck, k_BLKD.astype(ck.dtype)], axis=1)
            v_all = jnp.concatenate([cv, v_BLKD.astype(cv.dtype)], axis=1)
            kv_pos = jnp.concatenate([kv_cache.slot_positions(index, part.n_slots, part.sink),
                                      index + jnp.arange(length, dtype=jnp.int32)])
        kv_pos = kv_cache.batch_positions(kv_pos, bsz)
        window = part.window if length == 1 else part.chunk_window
        sink = part.sink if window else 0
        k_all, v_all = k_all.astype(dtype), v_all.astype(dtype)
        if length == 1 and cfg.attn_impl != "reference":  # one token: a plain softmax
            hkv = k_all.shape[2]
            hq, hd = q_BLHD.shape[2:]
            mask_BS = mask_of(q_pos_BL, kv_pos, None, None, True, window, sink)[:, 0]
            o = ops.decode_attention(q_BLHD.reshape(bsz, hkv, hq // hkv, hd),
                                     k_all.transpose(0, 2, 1, 3), v_all.transpose(0, 2, 1, 3),
                                     mask_BS)
            o_BLHD = o.reshape(bsz, 1, hq, hd)
        else:
            o_BLHD = ops.attention(q_BLHD, k_all, v_all, causal=True, sliding_window=window,
                                   sink=sink,
                                   impl="reference" if cfg.attn_impl == "reference" else "xla",
                                   q_positions=q_pos_BL, kv_positions=kv_pos)
        if part.full:
            o_BLHD = kv_cache.poison(o_BLHD, kv_cache.overflowed(index, length, part.n_slots))
        return o_BLHD, new_k, new_v

    def attend_duo_gates(self, q_BLHD, k_BLKD, v_BLKD, segment_ids):
        """Gate training: alpha x full + (1 - alpha) x streaming per KV head."""
        cfg = self.cfg
        hq, hkv = q_BLHD.shape[2], k_BLKD.shape[2]
        alpha_K = self.param("duo_alpha", nn.with_logical_partitioning(
            nn.initializers.ones, ("kv_heads",)), (hkv,), jnp.float32)
        full_BLHD = self.sequence_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids, None)
        stream_BLHD = self.sequence_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids,
                                              cfg.duo_recent, cfg.duo_sink)
        a_H = jnp.repeat(alpha_K, hq // hkv)[:, None].astype(full_BLHD.dtype)
        return a_H * full_BLHD + (1 - a_H) * stream_BLHD

    def sequence_attention(self, q_BLHD, k_BLKD, v_BLKD, segment_ids, window, sink=0):
        """Attention over the whole sequence, causal unless cfg.causal is False (ring
        attention across mesh.sequence > 1)."""
        o_BLHD = parallel.sequence_parallel_attention(
            q_BLHD, k_BLKD, v_BLKD, causal=self.cfg.get("causal", True), segment_ids=segment_ids,
            sliding_window=window, sink=sink, impl=self.cfg.attn_impl,
            layout=self.cfg.ring_layout)
        return constrain(o_BLHD, ("batch", "length", "heads", "kv"))

    def attend(self, q_BLHD, k_BLKD, v_BLKD, q_pos_BL, segment_ids, cache, decode):
        """(attention output [B, L, Hq, D], new cache or None): over the cache parts
        when decoding, else over the sequence with each part's mask."""
        if not decode and self.cfg.get("duo_gates", False):
            return self.attend_duo_gates(q_BLHD, k_BLKD, v_BLKD, segment_ids), None
        g = q_BLHD.shape[2] // k_BLKD.shape[2]
        parts = self.parts(cache["k"].shape[1] if decode and "k" in cache
                           else self.cfg.max_cache_len)
        outs, new_cache = [], {}
        for part in parts:
            q, k, v = (q_BLHD[:, :, part.lo * g:part.hi * g], k_BLKD[:, :, part.lo:part.hi],
                       v_BLKD[:, :, part.lo:part.hi])
            if decode:
                o, new_cache[part.k], new_cache[part.v] = self.attend_part(part, q, k, v,
                                                                           q_pos_BL, cache)
            else:
                o = self.sequence_attention(q, k, v, segment_ids, part.window, part.sink)
            outs.append(o)
        o_BLHD = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
        if not decode:
            return o_BLHD, None
        new_cache["index"] = cache["index"].astype(jnp.int32) + q_BLHD.shape[1]
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
        if decode and not self.cfg.get("causal", True):
            raise ValueError("attention with causal=False has no decoding")
        q_BLHD, k_BLKD, v_BLKD = self.project(x_BLD)
        if decode and cache is None:
            self.check_decode_length(length, "attention decode without a cache")
            cache = self.init_cache(bsz, self.cfg.max_cache_len, compute_dtype(self.cfg))
        q_pos_BL, rope_pos = self.positions(bsz, length, positions, cache, decode)
        q_BLHD = rotary(q_BLHD, rope_pos, self.cfg.rope_theta)
        k_BLKD = rotary(k_BLKD, rope_pos, self.cfg.rope_theta)
        o_BLHD, new_cache = self.attend(q_BLHD, k_BLKD, v_BLKD, q_pos_BL, segment_ids, cache,
                                        decode)
        return self.project_out(o_BLHD), new_cache, {}

    def init_cache(self, batch, max_len, dtype=jnp.float32):
        """An empty KV cache for sequences of up to `max_len` tokens (logical axes:
        CACHE_AXES): one [B, N, heads, D] pair of arrays per part."""
        _, _, hd = head_shape(self.cfg)
        cache = {"index": jnp.zeros((), jnp.int32)}
        for part in self.parts(max_len):
            zeros = jnp.zeros((batch, part.n_slots, part.hi - part.lo, hd), dtype)
            cache[part.k], cache[part.v] = zeros, zeros
        return cache

    def cache_axes(self):
        names = [n for part in self.parts(1) for n in (part.k, part.v)] + ["index"]
        return {n: CACHE_AXES[n] for n in names}
