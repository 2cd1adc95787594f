"""Scaled dot-product attention: public entry point, masks and the plain reference.

Layout (FlashAttention-2's): q [B, L, Hq, D], k and v [B, S, Hkv, D], Hq % Hkv == 0.
Grouped-query / multi-query attention: query head h reads kv head h // G, G = Hq // Hkv
(the xla and Pallas paths view q as [B, L, Hkv, G, D] and never repeat K/V).

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
kernels; interpret mode off TPU), "auto". On TPU "auto" is the Pallas kernels, except
with explicit positions (xla).

On GPU "auto" runs cuDNN's fused flash attention (through jax's cuDNN attention) for
every call it computes exactly, the blocked xla path otherwise. cuDNN needs bf16/fp16
q/k/v, a head dim <= 128 and a multiple of 8, no sink keys, no lse requested (jax's
cuDNN lse output carries no gradient, and `merge_partials` differentiates it), no
explicit positions (cuDNN masks by token index), and L == S when causal or windowed
(cuDNN aligns causal masks top-left, here they are bottom-right). Then:
  no segment ids        jax.nn.dot_product_attention(implementation="cudnn"): causal,
                        and the window as cuDNN's sliding_window_length W.
  segment ids [B, L]    (self-attention: one array, or a pair of the same array) the
                        packed "THD" layout of jax's cuDNN attention: each run of equal
                        ids in a row is one sequence, described by per-row run lengths
                        and offsets (`segment_runs`, at most CUDNN_MAX_SEGMENTS runs a
                        row, unused slots -1), and cuDNN applies the padding mask, the
                        causal mask and the window inside each sequence. That equals the
                        id-equality mask above whenever every id forms one contiguous
                        run (what data packing produces; padding, id 0, is one more run),
                        so the call is `lax.cond` on a run-time check: a batch with a row
                        of more runs, or an id in two runs, takes the xla path. jax
                        requires a Hopper (sm_90) or newer GPU for the packed layout.
                        Under GQA/MQA the packed call gets K/V repeated to Hq heads when
                        jax scales packed kv offsets by the query's per-token stride
                        (`_packed_kv_offsets_use_kv_heads` checks the installed jax).
Explicit positions, sink keys, lse, other dtypes and head dims, causal or windowed
attention with L != S and distinct q/kv segment id arrays run the blocked xla path
(the Pallas flash kernels in kernels_pallas are TPU Mosaic kernels; there is no GPU
Pallas attention kernel). The attention mixer applies RoPE at the per-document
positions before calling this op and passes no positions, so packed training takes
the cuDNN route; positions reach the op only when decoding with a cache (impl="xla")
and inside ring attention. When jax's cuDNN attention raises while tracing (no cuDNN,
an older GPU or cuDNN, an unsupported shape), one warning per distinct reason is logged
and the call runs the xla path.
"""
import functools
import logging
import math

import jax
import jax.numpy as jnp

from jaxmix.ops import _impl, per_device
from jaxmix.ops.masks import default_positions, mask_of


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


CUDNN_MAX_SEGMENTS = 64
"""Segments (runs of equal ids, documents and padding) per row the packed cuDNN route
expresses; a batch with a row of more runs takes the xla path at run time. cuDNN's
softmax statistics for the packed layout are [B * M, Hq, L] fp32 with
M = min(CUDNN_MAX_SEGMENTS, L), kept for the backward pass: at head dim 128 and M = 64
as large as q itself, so the bound trades that memory against how many documents a row
may hold."""

_log = logging.getLogger(__name__)
_warned = set()


def _warn_once(key, message):
    """Logs `message` as a warning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        _log.warning(message)


def _self_segments(segment_ids, q_len, kv_len):
    """True when the segment ids describe self-attention: one [B, L] array with L == S,
    or a pair holding the same array twice."""
    if segment_ids is None or q_len != kv_len:
        return False
    if isinstance(segment_ids, (tuple, list)):
        return segment_ids[0] is segment_ids[1]
    return True


def _cudnn_ok(q, k, causal, segment_ids, q_positions, kv_positions, return_lse, sink=0,
              sliding_window=None):
    """Whether jax's cuDNN fused attention can compute this call exactly (see the
    module docstring); the packed case still checks the ids' runs at run time."""
    d = q.shape[-1]
    l_len, s_len = q.shape[1], k.shape[1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
            and d <= 128 and d % 8 == 0 and not sink and not return_lse
            and q_positions is None and kv_positions is None
            and (not (causal or sliding_window) or l_len == s_len)
            and (segment_ids is None or _self_segments(segment_ids, l_len, s_len)))


def segment_runs(seg_BL, max_segments):
    """The packed ("THD") description of segment ids [B, L] that cuDNN takes: every
    maximal run of equal ids is one sequence. Returns
      seqlen_BM  int32 [B, M]:     run lengths, -1 past a row's last run
      offset_BN  int32 [B, M + 1]: run starts, -1 past a row's last run (and always in
                                   the last column)
      fits       bool []:          every row has at most M runs and no id in two runs,
                                   i.e. runs mask exactly as id equality does
    with M = max_segments. Runs beyond M are dropped from seqlen/offsets (fits is then
    False). Padding tokens (any id, e.g. 0) form runs like documents, so every token is
    covered."""
    b, l_len = seg_BL.shape
    seg_BL = seg_BL.astype(jnp.int32)
    start_BL = jnp.concatenate([jnp.ones((b, 1), bool), seg_BL[:, 1:] != seg_BL[:, :-1]],
                               axis=1)
    run_BL = jnp.cumsum(start_BL, axis=1, dtype=jnp.int32) - 1
    n_runs_B = run_BL[:, -1] + 1
    rows_BL = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, l_len))
    pos_BL = jnp.broadcast_to(jnp.arange(l_len, dtype=jnp.int32), (b, l_len))
    slot_BL = jnp.where(start_BL & (run_BL < max_segments), run_BL, max_segments + 1)
    offset_BN = jnp.full((b, max_segments + 1), -1, jnp.int32).at[rows_BL, slot_BL].set(
        pos_BL, mode="drop")
    count_BM = jnp.zeros((b, max_segments), jnp.int32).at[rows_BL, run_BL].add(
        1, mode="drop")
    used_BM = jnp.arange(max_segments, dtype=jnp.int32) < n_runs_B[:, None]
    seqlen_BM = jnp.where(used_BM, count_BM, -1)
    sorted_BL = jnp.sort(seg_BL, axis=1)
    n_ids_B = 1 + jnp.sum(sorted_BL[:, 1:] != sorted_BL[:, :-1], axis=1, dtype=jnp.int32)
    fits = jnp.all((n_runs_B <= max_segments) & (n_ids_B == n_runs_B))
    return seqlen_BM, offset_BN, fits


@functools.cache
def _packed_kv_offsets_use_kv_heads():
    """Whether jax scales packed kv offsets by K's own per-token stride (Hkv * D). Some
    jax versions scale them by Q's (Hq * D), which reads the wrong keys under
    GQA/MQA; the packed route then gives cuDNN K/V repeated to Hq heads."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets
        with jax.ensure_compile_time_eval():
            q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
            k = jnp.zeros((1, 4, 1, 8), jnp.bfloat16)
            lens = jnp.array([[2, 2]], jnp.int32)
            offs = jnp.array([[0, 2, -1]], jnp.int32)
            kv_offsets = _fix_seqlen_offsets(lens, lens, offs, offs, q, k)[3]
            return int(kv_offsets[0, 1]) == 2 * 1 * 8
    except Exception:  # noqa: BLE001 - an unknown jax: repeating K/V is always correct
        return False


def _cudnn_sdpa(q, k, v, *, scale, causal, window, seqlen_BM=None, offset_BN=None):
    """jax's cuDNN fused attention on [B, L, H, D] arrays: causal masks top-left
    aligned, `window` W keeps keys p - W < t <= p. With seqlen/offsets (see
    `segment_runs`) each run is its own sequence ("THD" packed layout, padding mask
    from the run lengths; causal and the window apply inside each run)."""
    if seqlen_BM is None:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal,
            local_window_size=None if window is None else (window - 1, 0),
            implementation="cudnn")
    from jax._src.cudnn import fused_attention_stablehlo as fused
    mask_type = fused.MaskType.PADDING_CAUSAL if causal else fused.MaskType.PADDING
    return fused.dot_product_attention(
        q, k, v, q_seqlen=seqlen_BM, kv_seqlen=seqlen_BM, q_offsets=offset_BN,
        kv_offsets=offset_BN, scale=scale, mask_type=mask_type,
        sliding_window_length=window)


def _attention_cudnn(q, k, v, causal, window, scale, seg_BL, xla_kw):
    """The cuDNN route; None (after one logged warning per reason) when jax's cuDNN
    attention refuses the call at trace time. With segment ids the call is
    `lax.cond(fits, cuDNN packed, xla)` on `segment_runs`' run-time check."""
    causal = bool(causal or window)
    case = "packed" if seg_BL is not None else "dense"
    try:
        if seg_BL is None:
            return _cudnn_sdpa(q, k, v, scale=scale, causal=causal, window=window)
        seqlen_BM, offset_BN, fits = segment_runs(
            seg_BL, min(CUDNN_MAX_SEGMENTS, seg_BL.shape[1]))
        repeat = k.shape[2] != q.shape[2] and not _packed_kv_offsets_use_kv_heads()

        def packed(q, k, v):
            if repeat:
                g = q.shape[2] // k.shape[2]
                k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            return _cudnn_sdpa(q, k, v, scale=scale, causal=causal, window=window,
                               seqlen_BM=seqlen_BM, offset_BN=offset_BN)

        def blocked(q, k, v):
            from jaxmix.ops.attention_xla import attention_xla
            return attention_xla(q, k, v, **xla_kw)[0]

        return jax.lax.cond(fits, packed, blocked, q, k, v)
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
        reason = f"{type(e).__name__}: {e}"
        _warn_once((case, reason),
                   f"attention: cuDNN fused attention refused this {case} call ({reason}); "
                   f"using the blocked xla path instead")
        return None


def choose_impl(impl, q, k, *, causal=False, segment_ids=None, q_positions=None,
                kv_positions=None, return_lse=False, sink=0, sliding_window=None):
    """The implementation `attention` runs for these arguments ("cudnn" only on GPU)."""
    resolved = _impl.resolve(impl, "attention")
    if impl == "auto" and jax.default_backend() == "gpu":
        if _cudnn_ok(q, k, causal, segment_ids, q_positions, kv_positions, return_lse,
                     sink, sliding_window):
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
                       return_lse=return_lse, sink=sink, sliding_window=window)
    kw = dict(causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
              q_positions=q_positions, kv_positions=kv_positions, sliding_window=window,
              sink=sink, scale=scale)
    if impl == "cudnn":
        out = _attention_cudnn(q, k, v, causal, window, scale, q_seg, kw)
        if out is not None:
            return out
        impl = "xla"
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
