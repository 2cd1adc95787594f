"""Sequence-parallel ring attention (called inside shard_map on per-device shards).

Each of the N devices on `axis_name` holds L/N queries and the K/V of the same
tokens. The K/V block, its segment ids and its true token positions travel around
the ring (device i sends to i+1 by `lax.ppermute`); at every hop the device runs
the blocked FlashAttention forward (`ops.attention_xla.flash_forward`) of its
queries against the visiting block and merges the normalised partial output by
its log-sum-exp, in fp32. The transfer of the next block is issued before the
current hop's compute so XLA can overlap the two. A hop whose block no query can
see (causal by true positions, sliding window and its sink keys, segment-id ranges)
is skipped by `lax.cond`; inside a hop the kernel itself skips dead tiles. A hop
calls the kernel on slices of the local queries in turn (`q_chunks`), so the
kernels' own O(L/N) temporaries stay a fraction of the shard; partial outputs and
gradients come back from the kernels in fp32 (`out_dtype` / `grad_dtype`),
whatever the input dtype.

Layouts (see `zigzag.py`): "contiguous" (device i holds tokens [iL/N, (i+1)L/N))
or "zigzag" (device i holds chunks i and 2N-1-i of 2N), which gives every device
the same causal work. Masking only reads the positions, so any layout works as
long as `positions` are the true ones (computed from the layout by default).

The backward (custom_vjp) is a second ring: the saved residuals are q, k, v, out
and lse only (per-device memory O(L/N)); K/V rotate again and their fp32 dK/dV
accumulators travel with them, each hop adding `flash_backward` of the local
queries, and one last hop brings every accumulator home. dQ stays local (fp32).

Runs under shard_map's default `check_vma=True` (and under `check_vma=False`): loop
and cond carries are typed as varying like the data (`ops.vma.match_vma`).
`sequence_parallel_attention` is the entry point for models: global arrays in, the
shard_map over the ambient mesh's sequence axis done inside.
"""
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxmix import ops
from jaxmix.ops.attention import split_segment_ids
from jaxmix.ops.attention_xla import flash_backward, flash_forward, merge_partials
from jaxmix.ops.vma import match_vma
from jaxmix.parallel.zigzag import (check_layout, contiguous_to_zigzag, mesh_axis_size,
                                    shard_positions, zigzag_to_contiguous)


# Tiles of the per-hop kernel calls: [B, Hq, 256, 256] fp32 scores keep the fixed
# per-call temporaries small next to the O(L/N) buffers.
RING_BLOCK = 256


class RingCfg(NamedTuple):
    axis_name: str
    causal: bool
    window: Optional[int]
    sink: int          # keys at positions < sink stay visible outside the window
    scale: float
    block_q: int
    block_k: int
    q_chunk: int       # queries per kernel call (a hop loops over n_chunks of them)
    n_chunks: int


def _rotate(tree, axis_name):
    """Sends every leaf of `tree` from device i to device i+1 (mod N)."""
    n = lax.axis_size(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def hop_is_live(q_pos_BL, kv_pos_BS, q_seg_BL, kv_seg_BS, causal, window, sink=0):
    """False only if no (query, key) pair of these shards can attend (conservative).

    With a window, a block is live when some key is recent enough for some query, or
    holds a sink key (position < sink); either way it must also be causally visible."""
    live = jnp.ones(q_pos_BL.shape[:1], bool)
    if causal or window:
        live &= kv_pos_BS.min(1) <= q_pos_BL.max(1)
    if window:
        recent = kv_pos_BS.max(1) > q_pos_BL.min(1) - window
        live &= (recent | (kv_pos_BS.min(1) < sink)) if sink else recent
    if q_seg_BL is not None:
        live &= (kv_seg_BS.min(1) <= q_seg_BL.max(1)) & (kv_seg_BS.max(1) >= q_seg_BL.min(1))
    return jnp.any(live)


def _mask_kw(cfg, q_seg, q_pos, blk):
    _, _, kv_seg, kv_pos = blk
    return dict(causal=cfg.causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                q_positions=q_pos, kv_positions=kv_pos, sliding_window=cfg.window,
                sink=cfg.sink, scale=cfg.scale, block_q=cfg.block_q, block_k=cfg.block_k)


def _live(cfg, q_seg, q_pos, blk):
    _, _, kv_seg, kv_pos = blk
    return hop_is_live(q_pos, kv_pos, q_seg, kv_seg, cfg.causal, cfg.window, cfg.sink)


def _chunk_loop(cfg, fn, carry):
    """Runs fn(sl, carry) over the q chunks of this shard; sl(x, axis) slices chunk i."""
    def step(i, carry):
        def sl(x, axis=1):
            return None if x is None else lax.dynamic_slice_in_dim(x, i * cfg.q_chunk,
                                                                   cfg.q_chunk, axis)
        return fn(i, sl, carry)
    if cfg.n_chunks == 1:
        return step(0, carry)
    return lax.fori_loop(0, cfg.n_chunks, step, carry)


def _put(x, i, part, cfg, axis=1):
    return lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), i * cfg.q_chunk, axis)


def _ring_forward(q, k, v, q_seg, kv_seg, pos, cfg):
    """(out [B, L, Hq, D] in q.dtype, lse [B, Hq, L] fp32) over the whole ring."""
    n = lax.axis_size(cfg.axis_name)
    b, l, hq, _ = q.shape

    def hop(blk, out, lse):
        def chunk(i, sl, carry):
            def compute(out, lse):
                o, s = flash_forward(sl(q), blk[0], blk[1], out_dtype=jnp.float32,
                                     **_mask_kw(cfg, sl(q_seg), sl(pos), blk))
                o, s = merge_partials(sl(out), sl(lse, 2), o, s)  # fp32 accumulators
                return _put(out, i, o, cfg), _put(lse, i, s, cfg, 2)
            return lax.cond(_live(cfg, sl(q_seg), sl(pos), blk), compute, lambda o, s: (o, s),
                            *carry)
        return _chunk_loop(cfg, chunk, (out, lse))

    def body(carry, _):
        blk, out, lse = carry
        nxt = _rotate(blk, cfg.axis_name)  # issued before this hop's compute
        out, lse = hop(blk, out, lse)
        return (nxt, out, lse), None

    blk = (k, v, kv_seg, pos)
    out, lse = match_vma((jnp.zeros(q.shape, jnp.float32),
                          jnp.full((b, hq, l), -jnp.inf, jnp.float32)), q, blk)
    if n > 1:
        (blk, out, lse), _ = lax.scan(body, (blk, out, lse), None, length=n - 1)
    out, lse = hop(blk, out, lse)
    return out.astype(q.dtype), lse


def _ring_backward(q, k, v, q_seg, kv_seg, pos, out, lse, dout, cfg):
    """(dq, dk, dv) with K/V and their fp32 dK/dV accumulators travelling the ring."""
    n = lax.axis_size(cfg.axis_name)

    def hop(blk, dq, dk, dv):
        def chunk(i, sl, carry):
            def compute(dq, dk, dv):
                gq, gk, gv = flash_backward(sl(q), blk[0], blk[1], sl(out), sl(lse, 2),
                                            sl(dout), grad_dtype=jnp.float32,
                                            **_mask_kw(cfg, sl(q_seg), sl(pos), blk))
                return _put(dq, i, sl(dq) + gq, cfg), dk + gk, dv + gv
            return lax.cond(_live(cfg, sl(q_seg), sl(pos), blk), compute, lambda *a: a,
                            *carry)
        return _chunk_loop(cfg, chunk, (dq, dk, dv))

    def body(carry, _):
        blk, dq, (dk, dv) = carry
        nxt = _rotate(blk, cfg.axis_name)  # issued before this hop's compute
        dq, dk, dv = hop(blk, dq, dk, dv)
        return (nxt, dq, _rotate((dk, dv), cfg.axis_name)), None

    blk = (k, v, kv_seg, pos)
    dq, dkv = match_vma((jnp.zeros(q.shape, jnp.float32),
                         (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))),
                        q, blk, out, lse, dout)
    if n > 1:
        (blk, dq, dkv), _ = lax.scan(body, (blk, dq, dkv), None, length=n - 1)
    dq, dk, dv = hop(blk, dq, *dkv)
    dk, dv = _rotate((dk, dv), cfg.axis_name)  # the last hop brings each block's sum home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ring(q, k, v, q_seg, kv_seg, pos, cfg):
    return _ring_forward(q, k, v, q_seg, kv_seg, pos, cfg)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, pos, cfg):
    out, lse = _ring_forward(q, k, v, q_seg, kv_seg, pos, cfg)
    return out, (q, k, v, q_seg, kv_seg, pos, out, lse)


def _ring_bwd(cfg, res, dout):
    q, k, v, q_seg, kv_seg, pos, out, lse = res
    dq, dk, dv = _ring_backward(q, k, v, q_seg, kv_seg, pos, out, lse, dout, cfg)
    return dq, dk, dv, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _block_sizes(layout, shard_len, block_q, block_k):
    """Default tiles; under zigzag no tile straddles the two chunks of a shard."""
    if layout == "zigzag" and shard_len // 2 <= min(block_q, block_k):
        half = shard_len // 2
        return half, half
    return block_q, block_k


def _n_chunks(shard_len, q_chunks, min_chunk=1024):
    """Kernel calls per hop: up to 8 chunks of >= min_chunk queries (auto), dividing L/N."""
    if q_chunks is not None:
        if shard_len % int(q_chunks):
            raise ValueError(f"ring_attention: q_chunks={q_chunks} must divide the per-device "
                             f"length {shard_len}")
        return int(q_chunks)
    for c in (8, 4, 2):
        if shard_len % c == 0 and shard_len // c >= min_chunk:
            return c
    return 1


def ring_attention(q, k, v, *, axis_name="sequence", causal=False, segment_ids=None,
                   layout="contiguous", positions=None, sliding_window=None, sink=0,
                   scale=None, block_q=RING_BLOCK, block_k=RING_BLOCK, q_chunks=None):
    """Exact attention of this device's queries over the keys of the whole ring.

    Per-device shards: q [B, L/N, Hq, D], k and v [B, L/N, Hkv, D] (Hq % Hkv == 0,
    K/V never repeated). `segment_ids` [B, L/N] int (or a pair (q_ids, kv_ids) of
    this shard's tokens): tokens attend only within their segment, across shards.
    `positions` [B, L/N] int: the true positions of this shard's tokens (queries and
    keys alike), used for causal / window masking; by default derived from `layout`.
    `sink` (needs `sliding_window`): keys at positions < sink stay visible to every
    later query outside the window (attention sinks, as `ops.attention`).
    A query that sees no key outputs 0. Differentiable in q, k, v (ring backward).
    Each hop runs the kernel on `q_chunks` slices of the local queries in turn (auto:
    up to 8 slices of >= 1024 queries), bounding the kernels' own temporaries.
    Call inside `jax.shard_map` over `axis_name` (check_vma either way).
    """
    check_layout(layout)
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[2] % k.shape[2]:
        raise ValueError(f"ring_attention: need q [B, L, Hq, D], k = v [B, L, Hkv, D] with "
                         f"Hq % Hkv == 0; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"ring_attention: self-attention shards need k/v with q's B, L, D; "
                         f"got q {q.shape}, k {k.shape}")
    window = None if not sliding_window else int(sliding_window)
    sink = int(sink)
    if sink < 0:
        raise ValueError(f"ring_attention: sink must be >= 0, got {sink}")
    if sink and window is None:
        raise ValueError(f"ring_attention: sink={sink} needs a sliding_window (sink keys "
                         f"are the ones kept visible outside the window)")
    b, l = q.shape[:2]
    q_seg, kv_seg = split_segment_ids(segment_ids, l, l)
    if positions is None:
        positions = shard_positions(layout, axis_name, b, l)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, l))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bq, bk = _block_sizes(layout, l, int(block_q), int(block_k))
    c = _n_chunks(l, q_chunks)
    cfg = RingCfg(axis_name=axis_name, causal=bool(causal), window=window, sink=sink,
                  scale=scale, block_q=bq, block_k=bk, q_chunk=l // c, n_chunks=c)
    # One varying type for q, k, v (positions always vary over axis_name), so the ring
    # backward's cotangents match them; a replicated input's gradient is then psummed.
    q, k, v = match_vma((q, k, v), q, k, v, q_seg, kv_seg, positions)
    return _ring(q, k, v, q_seg, kv_seg, positions, cfg)


def sequence_parallel_attention(q_BLHD, k_BLKD, v_BLKD, *, causal=True, segment_ids=None,
                                positions=None, layout="zigzag", sliding_window=None,
                                sink=0, scale=None, axis_name="sequence", impl="auto"):
    """Attention over global arrays, as ring attention over the ambient mesh's `axis_name`.

    For use inside a jit'd model running under `jax.set_mesh(mesh)`: q [B, L, Hq, D],
    k, v [B, L, Hkv, D] are the usual global (auto-sharded) arrays in token order;
    only `axis_name` goes manual (batch / heads keep whatever data/fsdp/tensor
    sharding they have). With layout="zigzag" the shards are moved to the zigzag
    layout and back inside (two collective-permutes each way), so callers keep the
    natural order; rotary embeddings applied before the call stay correct.
    `positions` [B, L] (masking positions; default the token index 0..L-1, as
    `ops.attention`). `sink` as in `ops.attention` (needs `sliding_window`).
    Without such a mesh axis (or of size 1) this is `ops.attention`.
    """
    check_layout(layout)
    n = mesh_axis_size(axis_name)
    if n == 1:
        return ops.attention(q_BLHD, k_BLKD, v_BLKD, causal=causal, segment_ids=segment_ids,
                             sliding_window=sliding_window, sink=sink, scale=scale,
                             impl=impl, q_positions=positions, kv_positions=positions)
    bsz, length = q_BLHD.shape[:2]
    parts = 2 * n if layout == "zigzag" else n
    if length % parts:
        raise ValueError(f"sequence_parallel_attention: length {length} must be a multiple of "
                         f"{parts} (mesh.{axis_name}={n}, layout={layout!r}); change "
                         f"train.seq_len")
    pair = isinstance(segment_ids, (tuple, list))
    extras = {}
    if segment_ids is not None:
        extras["seg"] = tuple(segment_ids) if pair else segment_ids
    if positions is not None:
        extras["pos"] = jnp.broadcast_to(positions, (bsz, length))

    def body(q, k, v, extras):
        if layout == "zigzag":
            q, k, v, extras = jax.tree.map(
                lambda x: contiguous_to_zigzag(x, axis_name), (q, k, v, extras))
        o = ring_attention(q, k, v, axis_name=axis_name, causal=causal,
                           segment_ids=extras.get("seg"), layout=layout,
                           positions=extras.get("pos"), sliding_window=sliding_window,
                           sink=sink, scale=scale)
        return zigzag_to_contiguous(o, axis_name) if layout == "zigzag" else o

    spec = jax.sharding.PartitionSpec(None, axis_name)
    fn = jax.shard_map(body, in_specs=(spec, spec, spec, spec), out_specs=spec,
                       axis_names={axis_name})
    return fn(q_BLHD, k_BLKD, v_BLKD, extras)
