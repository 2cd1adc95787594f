"""Blocked attention in plain XLA (FlashAttention-2 schedule): O(L) memory, exact.

Internally q is laid out [B, Hkv, G, L, D] and k, v [B, Hkv, S, D], cut into
blocks of `block_q` queries and `block_k` keys. The forward walks query blocks
(fori_loop) and, for each, only its live key blocks (a list per query block, so a
sink and a window cost their own blocks and nothing in between), keeping the running max
`m`, denominator `l` and fp32 accumulator: never more than one [bq, bk] tile of
scores per head. Blocks are classified from per-block min/max of positions and
segment ids: *dead* (no pair can attend: skipped), *full* (every pair attends: no
mask is built) or *partial* (masked). With sorted positions and packed segments
this skips everything above the causal diagonal, outside the sink and the window and
between documents, and is still exact (only conservative) for arbitrary positions.

With a sliding window of W < 512 the tiles shrink to the power of two >= W (at
least 128), so that streaming attention costs O(L x (sink + W)).

The backward (custom_vjp; residuals are q, k, v, out, lse only) is one fused pass:
key blocks outer, live query blocks inner, recomputing p = exp(s - lse) once per
tile, accumulating dk/dv per key block and dq into an fp32 [B, Hkv, G, L, D] buffer.

`flash_forward` / `flash_backward` are the per-block primitives ring attention
uses: call the forward on each rotated K/V block with its true positions and
segment ids, combine with `merge_partials`, and in the backward call
`flash_backward` per block with the *merged* out and lse.

Inside `jax.shard_map` (default check_vma=True) the loop carries are typed varying
like the data and `attention_xla` casts q, k, v to one varying type (`ops.vma`).
"""
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxmix.ops.masks import default_positions, mask_of
from jaxmix.ops.vma import cast_vma, match_vma, vma_of

BLOCK_Q = 512
BLOCK_K = 512
NEG_INF = -jnp.inf


class Blocks(NamedTuple):
    """Static tiling: true lengths, block sizes and padded lengths."""
    q_len: int
    kv_len: int
    bq: int
    bk: int
    nq: int
    nk: int


def _split(length, block):
    """(block, n_blocks) with blocks as even as possible (<= block, multiple of 8)."""
    n = max(1, -(-length // block))
    size = -(-length // n)
    if n > 1 or size > 8:
        size = -(-size // 8) * 8
    n = -(-length // size)
    return size, n


def tiling(q_len, kv_len, block_q=BLOCK_Q, block_k=BLOCK_K):
    bq, nq = _split(q_len, block_q)
    bk, nk = _split(kv_len, block_k)
    return Blocks(q_len, kv_len, bq, bk, nq, nk)


class Ctx(NamedTuple):
    """Padded position / segment arrays and the [nq, nk] block classification."""
    q_pos: jax.Array            # [B, nq*bq] int32 (edge padded)
    kv_pos: jax.Array           # [B, nk*bk] int32 (edge padded)
    q_seg: Optional[jax.Array]
    kv_seg: Optional[jax.Array]
    kind: jax.Array             # [nq, nk] int32: 0 dead, 1 full, 2 partial


def _pad_edge(x_BL, length):
    return jnp.pad(x_BL, ((0, 0), (0, length - x_BL.shape[1])), mode="edge")


def _block_range(x_BL, n, size):
    x = x_BL.reshape(x_BL.shape[0], n, size)
    return x.min(-1), x.max(-1)


def make_ctx(t, batch, q_pos, kv_pos, q_seg, kv_seg, causal, window, sink=0):
    dq, dkv = default_positions(batch, t.q_len, t.kv_len)
    q_pos = _pad_edge(jnp.asarray(dq if q_pos is None else q_pos, jnp.int32), t.nq * t.bq)
    kv_pos = _pad_edge(jnp.asarray(dkv if kv_pos is None else kv_pos, jnp.int32), t.nk * t.bk)
    if q_seg is not None:
        q_seg = _pad_edge(q_seg, t.nq * t.bq)
        kv_seg = _pad_edge(kv_seg, t.nk * t.bk)
    qlo, qhi = (a[:, :, None] for a in _block_range(q_pos, t.nq, t.bq))
    klo, khi = (a[:, None, :] for a in _block_range(kv_pos, t.nk, t.bk))
    live = jnp.ones((batch, t.nq, t.nk), bool)
    full = jnp.ones((batch, t.nq, t.nk), bool)
    if causal or window:
        live &= klo <= qhi
        full &= khi <= qlo
    if window:
        live &= (khi > qlo - window) | (klo < sink)
        full &= (klo > qhi - window) | (khi < sink)
    if q_seg is not None:
        slo, shi = (a[:, :, None] for a in _block_range(q_seg, t.nq, t.bq))
        tlo, thi = (a[:, None, :] for a in _block_range(kv_seg, t.nk, t.bk))
        live &= (tlo <= shi) & (thi >= slo)
        full &= (slo == shi) & (tlo == thi) & (slo == tlo)
    if t.kv_len % t.bk:  # the last key block holds padding: always mask it
        full &= jnp.arange(t.nk) < t.nk - 1
    kind = jnp.where(jnp.any(live, 0), jnp.where(jnp.all(full, 0), 1, 2), 0)
    return Ctx(q_pos, kv_pos, q_seg, kv_seg, kind.astype(jnp.int32))


def _tile_mask(ctx, t, i, j, causal, window, sink):
    """[B, 1, 1, bq, bk] mask of query block i against key block j (padding included)."""
    q_pos = jax.lax.dynamic_slice_in_dim(ctx.q_pos, i * t.bq, t.bq, 1)
    kv_pos = jax.lax.dynamic_slice_in_dim(ctx.kv_pos, j * t.bk, t.bk, 1)
    q_seg = kv_seg = None
    if ctx.q_seg is not None:
        q_seg = jax.lax.dynamic_slice_in_dim(ctx.q_seg, i * t.bq, t.bq, 1)
        kv_seg = jax.lax.dynamic_slice_in_dim(ctx.kv_seg, j * t.bk, t.bk, 1)
    mask = mask_of(q_pos, kv_pos, q_seg, kv_seg, causal, window, sink)
    valid = (j * t.bk + jnp.arange(t.bk)) < t.kv_len
    mask = valid[None, None, :] if mask is None else mask & valid[None, None, :]
    return mask[:, None, None]


def live_lists(kind):
    """(order [n, m], count [n]) of a [n, m] kind table: order[i, :count[i]] are the
    live (nonzero) columns of row i in increasing order, so loops visit only those
    (a sink plus a window are two separate runs of live blocks)."""
    live = kind > 0
    order = jnp.argsort(~live, axis=1, stable=True).astype(jnp.int32)
    return order, live.sum(1).astype(jnp.int32)


def block_sizes(window, block_q, block_k):
    """Smaller tiles for a short window: a query block then reads about
    (block + window) keys instead of rounding the window up to whole 512-blocks."""
    if window is None or block_q != BLOCK_Q or block_k != BLOCK_K:
        return block_q, block_k
    size = max(128, min(BLOCK_Q, 1 << max(int(window) - 1, 1).bit_length()))
    return size, size


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _scores(q_blk, k_blk, scale, mask):
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk,
                   preferred_element_type=jnp.float32) * scale
    return s if mask is None else jnp.where(mask, s, NEG_INF)


def _q_blocked(x_BLHD, t, hkv):
    """[B, L, Hq, D] -> padded [B, Hkv, G, nq*bq, D]."""
    b, _, hq, d = x_BLHD.shape
    x = jnp.pad(x_BLHD, ((0, 0), (0, t.nq * t.bq - t.q_len), (0, 0), (0, 0)))
    return x.reshape(b, t.nq * t.bq, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)


def _to_blocked(q, k, v, t):
    pk = t.nk * t.bk - t.kv_len
    q_BHGLD = _q_blocked(q, t, k.shape[2])
    k_BHSD, v_BHSD = (jnp.pad(x, ((0, 0), (0, pk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
                      for x in (k, v))
    return q_BHGLD, k_BHSD, v_BHSD


def _from_blocked_q(x_BHGLD, t):
    b, hkv, g, _, d = x_BHGLD.shape
    return x_BHGLD.transpose(0, 3, 1, 2, 4).reshape(b, -1, hkv * g, d)[:, :t.q_len]


def flash_forward(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                  q_positions=None, kv_positions=None, sliding_window=None, sink=0,
                  scale=None, block_q=BLOCK_Q, block_k=BLOCK_K, out_dtype=None):
    """Non-differentiable forward: (out [B, L, Hq, D] in out_dtype or q.dtype, lse [B, Hq, L]).

    Ring attention asks for out_dtype=float32 so merged partial outputs stay exact.
    """
    b, l, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    t = tiling(l, k.shape[1], *block_sizes(sliding_window, block_q, block_k))
    ctx = make_ctx(t, b, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
                   sliding_window, sink)
    order, count = live_lists(ctx.kind)
    q_BHGLD, k_BHSD, v_BHSD = _to_blocked(q, k, v, t)
    stat_shape = q_BHGLD.shape[:3] + (t.bq,)
    axes = vma_of(q, k, v, ctx)  # loop carries vary like the data (inside shard_map)

    def kv_step(i, q_blk, n, carry):
        j = order[i, n]

        def tile(masked, carry):
            m, den, acc = carry
            mask = _tile_mask(ctx, t, i, j, causal, sliding_window, sink) if masked else None
            s = _scores(q_blk, _slice(k_BHSD, j * t.bk, t.bk, 2), scale, mask)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype),
                            _slice(v_BHSD, j * t.bk, t.bk, 2),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * den + p.sum(-1), alpha[..., None] * acc + pv

        return jax.lax.cond(ctx.kind[i, j] == 1, functools.partial(tile, False),
                            functools.partial(tile, True), carry)

    def q_step(i, carry):
        out, lse = carry
        q_blk = _slice(q_BHGLD, i * t.bq, t.bq, 3)
        init = cast_vma((jnp.full(stat_shape, NEG_INF, jnp.float32),
                         jnp.zeros(stat_shape, jnp.float32),
                         jnp.zeros(stat_shape + (d,), jnp.float32)), axes)
        m, den, acc = jax.lax.fori_loop(0, count[i], functools.partial(kv_step, i, q_blk), init)
        empty = den == 0
        o_blk = acc / jnp.where(empty, 1.0, den)[..., None]
        lse_blk = jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, den)))
        out = jax.lax.dynamic_update_slice_in_dim(out, o_blk.astype(out.dtype), i * t.bq, 3)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_blk, i * t.bq, 3)
        return out, lse

    init = cast_vma((jnp.zeros(q_BHGLD.shape, out_dtype or q.dtype),
                     jnp.zeros(q_BHGLD.shape[:4], jnp.float32)), axes)
    out_BHGLD, lse_BHGL = jax.lax.fori_loop(0, t.nq, q_step, init)
    lse = lse_BHGL.reshape(b, hq, -1)[:, :, :l]
    return _from_blocked_q(out_BHGLD, t), lse


def flash_backward(q, k, v, out, lse, dout, dlse=None, *, causal=False, q_segment_ids=None,
                   kv_segment_ids=None, q_positions=None, kv_positions=None,
                   sliding_window=None, sink=0, scale=None, block_q=BLOCK_Q, block_k=BLOCK_K,
                   grad_dtype=None):
    """Gradients (dq, dk, dv) given the (merged) out, lse and their cotangents.

    Returned in the dtypes of q, k, v, or all in grad_dtype (e.g. float32 for ring
    accumulators).
    """
    b, l, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    t = tiling(l, s_len, *block_sizes(sliding_window, block_q, block_k))
    ctx = make_ctx(t, b, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
                   sliding_window, sink)
    q_BHGLD, k_BHSD, v_BHSD = _to_blocked(q, k, v, t)
    do_BHGLD, o_BHGLD = _q_blocked(dout, t, hkv), _q_blocked(out, t, hkv)
    delta = jnp.sum(do_BHGLD.astype(jnp.float32) * o_BHGLD.astype(jnp.float32), -1)
    lse_BHGL = jnp.pad(lse.reshape(b, hkv, g, l), ((0, 0),) * 3 + ((0, t.nq * t.bq - l),))
    if dlse is not None:
        delta = delta - jnp.pad(dlse.astype(jnp.float32).reshape(b, hkv, g, l),
                                ((0, 0),) * 3 + ((0, t.nq * t.bq - l),))
    lse_BHGL = jnp.where(lse_BHGL == NEG_INF, 0.0, lse_BHGL)
    kv_kind = ctx.kind.T
    order, count = live_lists(kv_kind)
    axes = vma_of(q, k, v, out, lse, dout, dlse, ctx)  # loop carries vary like the data

    def q_step(j, k_blk, v_blk, n, carry):
        i = order[j, n]

        def tile(masked, carry):
            dq, dk, dv = carry
            mask = _tile_mask(ctx, t, i, j, causal, sliding_window, sink) if masked else None
            q_blk = _slice(q_BHGLD, i * t.bq, t.bq, 3)
            do_blk = _slice(do_BHGLD, i * t.bq, t.bq, 3)
            s = _scores(q_blk, k_blk, scale, mask)
            p = jnp.exp(s - _slice(lse_BHGL, i * t.bq, t.bq, 3)[..., None])
            dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(v.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_blk, v_blk,
                            preferred_element_type=jnp.float32)
            ds = p * (dp - _slice(delta, i * t.bq, t.bq, 3)[..., None]) * scale
            dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(q.dtype), q_blk,
                                 preferred_element_type=jnp.float32)
            dq_blk = _slice(dq, i * t.bq, t.bq, 3) + jnp.einsum(
                "bhgqk,bhkd->bhgqd", ds.astype(k.dtype), k_blk,
                preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i * t.bq, 3), dk, dv

        return jax.lax.cond(kv_kind[j, i] == 1, functools.partial(tile, False),
                            functools.partial(tile, True), carry)

    def kv_step(j, carry):
        dq, dk, dv = carry
        k_blk, v_blk = (_slice(x, j * t.bk, t.bk, 2) for x in (k_BHSD, v_BHSD))
        acc_shape = k_blk.shape
        zeros = cast_vma(jnp.zeros(acc_shape, jnp.float32), axes)
        dq, dk_blk, dv_blk = jax.lax.fori_loop(0, count[j],
                                               functools.partial(q_step, j, k_blk, v_blk),
                                               (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_blk.astype(dk.dtype), j * t.bk, 2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_blk.astype(dv.dtype), j * t.bk, 2)
        return dq, dk, dv

    init = cast_vma((jnp.zeros(q_BHGLD.shape, jnp.float32),
                     jnp.zeros(k_BHSD.shape, grad_dtype or k.dtype),
                     jnp.zeros(v_BHSD.shape, grad_dtype or v.dtype)), axes)
    dq, dk, dv = jax.lax.fori_loop(0, t.nk, kv_step, init)
    dq = _from_blocked_q(dq, t).astype(grad_dtype or q.dtype)
    dk, dv = (x.transpose(0, 2, 1, 3)[:, :s_len] for x in (dk, dv))
    return dq, dk, dv


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combines attention over two disjoint key sets: (out [B, L, H, D], lse [B, H, L])."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(lse == NEG_INF, 0.0, lse)
    w_a = jnp.exp(lse_a - safe).transpose(0, 2, 1)[..., None]
    w_b = jnp.exp(lse_b - safe).transpose(0, 2, 1)[..., None]
    out = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
    return out.astype(out_a.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _flash(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, window, sink, scale, block_q,
           block_k):
    return flash_forward(q, k, v, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                         q_positions=q_pos, kv_positions=kv_pos, sliding_window=window,
                         sink=sink, scale=scale, block_q=block_q, block_k=block_k)


def _flash_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, window, sink, scale, block_q,
               block_k):
    out, lse = _flash(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, window, sink, scale,
                      block_q, block_k)
    return (out, lse), (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _flash_bwd(causal, window, sink, scale, block_q, block_k, res, cts):
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
    dout, dlse = cts
    dq, dk, dv = flash_backward(q, k, v, out, lse, dout, dlse, causal=causal,
                                q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                q_positions=q_pos, kv_positions=kv_pos,
                                sliding_window=window, sink=sink, scale=scale,
                                block_q=block_q, block_k=block_k)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_xla(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                  q_positions=None, kv_positions=None, sliding_window=None, sink=0,
                  scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Differentiable blocked attention: (out [B, L, Hq, D], lse [B, Hq, L] fp32)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Inside shard_map q, k, v get one varying type, so that the cotangents (which vary
    # like all the data) match their primals; e.g. a replicated k's dk is then psummed.
    q, k, v = match_vma((q, k, v), q, k, v, q_segment_ids, kv_segment_ids, q_positions,
                        kv_positions)
    return _flash(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                  bool(causal), sliding_window, int(sink) if sliding_window else 0, scale,
                  int(block_q), int(block_k))
