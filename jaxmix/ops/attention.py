"""Scaled dot-product attention: public entry point, masks and the plain reference.

Layout (FlashAttention-2's): q [B, L, Hq, D], k and v [B, S, Hkv, D], Hq % Hkv == 0.
Grouped-query / multi-query attention never repeats K/V: q is viewed as
[B, L, Hkv, G, D] with G = Hq // Hkv, query head h reading kv head h // G.

Masking is defined on absolute token positions. By default query i sits at
position i + S - L and key j at position j, so causal attention is *bottom-right
aligned* when L != S (the last query sees every key, as in decoding with a cache).
`q_positions` [B, L] / `kv_positions` [B, S] override these (ring attention passes
the true positions of rotated K/V blocks). Query at position p sees key at t when
  causal:            t <= p
  sliding_window=W:  p - W < t <= p      (W keys counting itself; implies causal)
  sink=S (with W):   t < S or p - W < t, and t <= p   (StreamingLLM / DuoAttention
                     "streaming" heads: S attention-sink keys plus the recent window)
  segment_ids:       q_seg == kv_seg     (packed documents)
A query that sees no key outputs 0 (never NaN) and has lse = -inf.

impl: "reference" (plain masked softmax in fp32, the oracle), "xla" (blocked
online softmax, O(L) memory, custom_vjp; the CPU default), "pallas" (Mosaic-style
kernels; interpret mode off TPU), "auto". On GPU "auto" uses cuDNN's fused
attention through `jax.nn.dot_product_attention(implementation="cudnn")` when the
call is one cuDNN supports (bf16/fp16, head dim <= 128 and a multiple of 8, no
segment ids, explicit positions or sink keys, causal only with L == S since cuDNN
aligns causal masks top-left, no lse requested) and the blocked xla path otherwise.
On TPU "auto" is the Pallas kernels, except with explicit positions (xla).
"""
import math

import jax
import jax.numpy as jnp

from jaxmix.ops import _impl, per_device


def default_positions(batch, q_len, kv_len):
    """Bottom-right aligned positions: q [B, L] at i + S - L, kv [B, S] at j."""
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len)
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
    return (jnp.broadcast_to(q_pos, (batch, q_len)), jnp.broadcast_to(kv_pos, (batch, kv_len)))


def mask_of(q_pos_BL, kv_pos_BS, q_seg_BL, kv_seg_BS, causal, window, sink=0):
    """Boolean [B, L, S]: True where query l may attend to key s. None if unmasked."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal or window:
        mask = kv_pos_BS[:, None, :] <= q_pos_BL[:, :, None]
    if window:
        recent = kv_pos_BS[:, None, :] > q_pos_BL[:, :, None] - window
        if sink:
            recent = recent | (kv_pos_BS[:, None, :] < sink)
        mask = both(mask, recent)
    if q_seg_BL is not None:
        mask = both(mask, q_seg_BL[:, :, None] == kv_seg_BS[:, None, :])
    return mask


def attention_reference(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                        q_positions=None, kv_positions=None, sliding_window=None, sink=0,
                        scale=None, upcast=True):
    """The oracle: materialises [B, Hkv, G, L, S]. Returns (out, lse [B, Hq, L] fp32).

    With upcast=False everything runs in the input dtype (the "same-dtype plain
    implementation" that bf16 accuracy bounds are measured against).
    """
    b, l, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dtype = jnp.float32 if upcast else q.dtype
    dq_pos, dkv_pos = default_positions(b, l, s_len)
    q_pos = dq_pos if q_positions is None else q_positions
    kv_pos = dkv_pos if kv_positions is None else kv_positions
    q_BLHGD = q.astype(dtype).reshape(b, l, hkv, g, d)
    s = jnp.einsum("blhgd,bshd->bhgls", q_BLHGD, k.astype(dtype)) * jnp.asarray(scale, dtype)
    mask_BLS = mask_of(q_pos, kv_pos, q_segment_ids, kv_segment_ids, causal, sliding_window,
                       sink)
    if mask_BLS is not None:
        s = jnp.where(mask_BLS[:, None, None], s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p.astype(jnp.float32), axis=-1, keepdims=True)
    empty = denom == 0
    o = jnp.einsum("bhgls,bshd->blhgd", p, v.astype(dtype))
    o = o / jnp.where(empty, 1, denom).astype(dtype).transpose(0, 3, 1, 2, 4)
    lse = jnp.where(empty, -jnp.inf, m.astype(jnp.float32) + jnp.log(jnp.where(empty, 1, denom)))
    return o.reshape(b, l, hq, d).astype(q.dtype), lse.reshape(b, hq, l)


def _check(q, k, v, q_seg, kv_seg, q_positions, kv_positions, sliding_window, sink):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be [B, L, H, D]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    b, l, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must be [B, S, Hkv, D] "
                         f"matching q {q.shape} in B and D")
    if hq % hkv:
        raise ValueError(f"attention: query heads {hq} must be a multiple of kv heads {hkv}")
    for name, arr, shape in (("q_segment_ids", q_seg, (b, l)), ("kv_segment_ids", kv_seg, (b, s)),
                             ("q_positions", q_positions, (b, l)),
                             ("kv_positions", kv_positions, (b, s))):
        if arr is not None and tuple(arr.shape) != shape:
            raise ValueError(f"attention: {name} has shape {tuple(arr.shape)}, expected {shape}")
    if sliding_window is not None and int(sliding_window) < 1:
        raise ValueError(f"attention: sliding_window must be >= 1 (or None), "
                         f"got {sliding_window}")
    if int(sink) < 0:
        raise ValueError(f"attention: sink must be >= 0, got {sink}")
    if sink and sliding_window is None:
        raise ValueError(f"attention: sink={sink} needs a sliding_window (sink keys are "
                         f"the ones kept visible outside the window)")


def split_segment_ids(segment_ids, q_len, kv_len):
    """segment_ids [B, L] (self-attention) or a pair (q [B, L], kv [B, S])."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(f"attention: segment_ids [B, L] needs L == S (got L={q_len}, "
                             f"S={kv_len}); pass a pair (q_segment_ids, kv_segment_ids)")
        q_seg = kv_seg = segment_ids
    return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def _cudnn_ok(q, k, causal, q_seg, q_positions, kv_positions, return_lse):
    d = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0
            and q_seg is None and q_positions is None and kv_positions is None
            and not return_lse and (not causal or q.shape[1] == k.shape[1]))


def _attention_cudnn(q, k, v, causal, sliding_window, scale):
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                        is_causal=causal or window is not None,
                                        local_window_size=window, implementation="cudnn")


def choose_impl(impl, q, k, *, causal=False, segment_ids=None, q_positions=None,
                kv_positions=None, return_lse=False, sink=0):
    """The implementation `attention` runs for these arguments ("cudnn" only on GPU)."""
    resolved = _impl.resolve(impl, "attention")
    if impl == "auto" and jax.default_backend() == "gpu":
        q_seg, _ = split_segment_ids(segment_ids, q.shape[1], k.shape[1])
        if not sink and _cudnn_ok(q, k, causal, q_seg, q_positions, kv_positions,
                                  return_lse):
            return "cudnn"
    if impl == "auto" and resolved == "pallas" and (q_positions is not None
                                                    or kv_positions is not None):
        return "xla"  # the Pallas kernels take positions from the layout only
    return resolved


def decode_attention(q_BKGD, k_BKSD, v_BKSD, mask_BS, scale=None):
    """One query per query head over a cache, head-major: q [B, Hkv, G, D] (G query
    heads share each KV head), k / v [B, Hkv, S, D], mask [B, S] (True: visible) ->
    [B, Hkv, G, D] in q's dtype. A plain masked softmax with fp32 scores and
    accumulation: for a single decoded token the [B, H, S] scores are small, and the
    blocked path's tiling only adds copies."""
    scale = q_BKGD.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BKSD,
                   preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask_BS[:, None, None, :], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgs,bksd->bkgd", p.astype(v_BKSD.dtype), v_BKSD,
                   preferred_element_type=jnp.float32)
    return o.astype(q_BKGD.dtype)


def attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, sink=0,
              scale=None, impl="auto", return_lse=False, q_positions=None, kv_positions=None):
    """Attention over q [B, L, Hq, D], k/v [B, S, Hkv, D] -> out [B, L, Hq, D].

    See the module docstring for masking semantics. With return_lse=True returns
    (out, lse) with lse [B, Hq, L] fp32 (-inf for fully masked rows); both are
    differentiable, so partial results over disjoint key sets can be merged with
    `jaxmix.ops.attention_xla.merge_partials`.
    """
    q_seg, kv_seg = split_segment_ids(segment_ids, q.shape[1], k.shape[1])
    _check(q, k, v, q_seg, kv_seg, q_positions, kv_positions, sliding_window, sink)
    window = None if sliding_window is None else int(sliding_window)
    sink = int(sink)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    impl = choose_impl(impl, q, k, causal=causal, segment_ids=segment_ids,
                       q_positions=q_positions, kv_positions=kv_positions,
                       return_lse=return_lse, sink=sink)
    if impl == "cudnn":
        try:
            return _attention_cudnn(q, k, v, causal, window, scale)
        except (ValueError, NotImplementedError, RuntimeError):
            impl = "xla"  # cuDNN refused this shape at trace time: use the blocked path
    kw = dict(causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
              q_positions=q_positions, kv_positions=kv_positions, sliding_window=window,
              sink=sink, scale=scale)
    if impl == "reference":
        out, lse = attention_reference(q, k, v, **kw)
    elif impl == "xla":
        from jaxmix.ops.attention_xla import attention_xla
        out, lse = attention_xla(q, k, v, **kw)
    else:
        out, lse = attention_per_device(q, k, v, **kw)
    return (out, lse) if return_lse else out


def attention_per_device(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, **kw):
    """The Pallas kernels run by every device on its shard (`per_device.per_device`):
    batch over the mesh axes of the logical name "batch", query heads over those of
    "heads" (k/v heads too when they divide, so query head h still reads kv head
    h // G locally; MQA keeps its one kv head whole). Returns (out, lse)."""
    from jaxmix.ops.attention_pallas import attention_pallas
    hq, hkv = q.shape[2], k.shape[2]
    b_ax = per_device.mesh_axes("batch", q.shape[0])
    h_ax = kv_ax = per_device.mesh_axes("heads", hq, hkv)
    if not h_ax and hkv == 1:
        h_ax, kv_ax = per_device.mesh_axes("heads", hq), ()
    s = per_device.spec
    seg = None if q_segment_ids is None else s(b_ax)

    def body(q, k, v, q_seg, kv_seg):
        return attention_pallas(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, **kw)

    in_specs = (s(b_ax, (), h_ax), s(b_ax, (), kv_ax), s(b_ax, (), kv_ax), seg, seg)
    out_specs = (s(b_ax, (), h_ax), s(b_ax, h_ax))
    return per_device.per_device(body, in_specs, out_specs)(q, k, v, q_segment_ids,
                                                            kv_segment_ids)
