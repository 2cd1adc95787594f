"""FlashAttention-2 forward and backward as Pallas TPU (Mosaic) kernels.

Arrays and block sizes only. Layout (prepared by the caller):
  q, o, do   [B, Hq, Lp, Dp]   Lp a multiple of block_q, Dp a multiple of 128
  k, v       [B, Hkv, Sp, Dp]  Sp a multiple of block_k; Hq = groups * Hkv
  lse, delta [B, Hq, Lp, 128]  fp32, broadcast along lanes (row statistics)
  q_seg      [B, Lp, 128]      int32 segment ids broadcast along lanes
  kv_seg     [B, 8, Sp]        int32 segment ids broadcast along sublanes
Query row r has position r + offset, key column c position c; columns c >= kv_len
are padding and always masked. Masks: causal (c <= r + offset), window W
(r + offset - W < c, implies causal) under which the first `sink` keys stay visible
too (c < sink, still causal), segment equality. Tiles with no visible pair are
skipped (`pl.when`) and their K/V (resp. Q) index maps send those grid steps to a
neighbouring live block, so no DMA is issued for them (a block index equal to the
previous step's is not fetched again). The live key blocks of a query block are the
sink blocks [0, ns) and the window range [lo, hi]; the live query blocks of a key
block run from its causal start to the window's end, or to the last query block when
the key block holds sink keys.
GQA: query head h reads kv head h // groups through the index maps; the dk/dv
kernel sums the groups in its grid.

Three kernels: forward (o, lse), dq, and dk/dv; every entry point takes
`interpret=` (pass `pltpu.InterpretParams()` or True off TPU).
"""
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8


class Spec(NamedTuple):
    causal: bool
    window: Optional[int]
    sink: int  # keys c < sink stay visible outside the window (0: none; needs a window)
    scale: float
    q_len: int
    kv_len: int
    offset: int
    block_q: int
    block_k: int
    groups: int
    segments: bool


def _live(spec, i, j):
    """Whether query block i and key block j hold any pair that may attend."""
    q_first = i * spec.block_q + spec.offset
    q_last = q_first + spec.block_q - 1
    k_first = j * spec.block_k
    live = k_first < spec.kv_len
    if spec.causal or spec.window:
        live = jnp.logical_and(live, k_first <= q_last)
    if spec.window:
        recent = k_first + spec.block_k - 1 > q_first - spec.window
        if spec.sink:
            recent = jnp.logical_or(recent, k_first < spec.sink)
        live = jnp.logical_and(live, recent)
    return live


def _div(x, m):
    """x // m for x >= 0 as a truncating division: jnp's floor division of traced ints
    goes through sign(), whose TPU lowering depends on the chip generation."""
    return jax.lax.div(x, jnp.asarray(m, jnp.int32))


def _kv_range(spec, i, nk):
    """First and last live key block of query block i, sink blocks aside."""
    q_first = i * spec.block_q + spec.offset
    hi = nk - 1
    lo = 0
    if spec.causal or spec.window:
        hi = jnp.minimum(hi, _div(jnp.maximum(q_first + spec.block_q - 1, 0), spec.block_k))
    if spec.window:
        lo = _div(jnp.maximum(q_first - spec.window + 1, 0), spec.block_k)
    return lo, hi


def _kv_block(spec, i, j, nk):
    """Key block fetched at grid step j of query block i. The live blocks are two runs,
    the sink blocks [0, ns) (up to the causal limit hi) and the window range [lo, hi]:
    a live step reads its own block j, a dead one repeats the next live block (hi after
    the last), which issues no new DMA."""
    lo, hi = _kv_range(spec, i, nk)
    block = _clamp(j, lo, hi)
    ns = -(-spec.sink // spec.block_k) if spec.window else 0
    if ns:
        block = jnp.where(j < ns, jnp.minimum(j, hi), block)
    return block


def _q_major_maps(spec, nk):
    """Index maps of a (batch, q head, q block i, kv block j) grid: q blocks, and the
    live kv blocks of q block i (`_kv_block`; GQA: kv head = q head // groups)."""
    def q_map(b_, h, i, j):
        return b_, h, i, 0

    def kv_map(b_, h, i, j):
        return b_, _div(h, spec.groups), _kv_block(spec, i, j, nk), 0

    return q_map, kv_map


def _q_range(spec, j, nq):
    """First and last live query block of key block j (for index-map clamping): sink
    keys are seen by every query block from their causal start on."""
    k_first = j * spec.block_k
    lo, hi = 0, nq - 1
    if spec.causal or spec.window:
        lo = jnp.minimum(_div(jnp.maximum(k_first - spec.offset, 0), spec.block_q), nq - 1)
    if spec.window:
        y = k_first + spec.block_k - 2 - spec.offset + spec.window
        hi = jnp.minimum(_div(jnp.maximum(y, 0), spec.block_q), nq - 1)
        if spec.sink:
            hi = jnp.where(k_first < spec.sink, nq - 1, hi)
    return lo, hi


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _mask(spec, i, j, qs_ref, ks_ref):
    """[block_q, block_k] boolean mask of tile (i, j)."""
    shape = (spec.block_q, spec.block_k)
    rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + (i * spec.block_q + spec.offset)
    cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + j * spec.block_k
    mask = cols < spec.kv_len
    if spec.causal or spec.window:
        mask = jnp.logical_and(mask, cols <= rows)
    if spec.window:
        recent = cols > rows - spec.window
        if spec.sink:
            recent = jnp.logical_or(recent, cols < spec.sink)
        mask = jnp.logical_and(mask, recent)
    if spec.segments:
        q_ids = qs_ref[:, 0:1]
        kv_ids = ks_ref[0:1, :]
        mask = jnp.logical_and(mask, q_ids == kv_ids)
    return mask


def _scores(spec, q, k, mask):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * spec.scale
    return jnp.where(mask, s, -jnp.inf)


def _split_refs(spec, refs, n_in):
    ins, rest = refs[:n_in], refs[n_in:]
    if spec.segments:
        return ins[:-2], ins[-2], ins[-1], rest
    return ins, None, None, rest


def _seg_specs(spec, q_map, kv_map):
    return [pl.BlockSpec((pl.squeezed, spec.block_q, LANES), q_map),
            pl.BlockSpec((pl.squeezed, SUBLANES, spec.block_k), kv_map)]


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(spec, nk, *refs):
    n_in = 3 + 2 * spec.segments
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(
        spec, refs, n_in)
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_live(spec, i, j))
    def _tile():
        s = _scores(spec, q_ref[...], k_ref[...], _mask(spec, i, j, qs_ref, ks_ref))
        m_prev = m_sc[:, 0:1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(alpha * l_sc[:, 0:1] + p.sum(axis=1, keepdims=True),
                                     l_sc.shape)
        pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv

    @pl.when(j == nk - 1)
    def _finish():
        den = l_sc[:, 0:1]
        empty = den == 0.0
        o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, den)).astype(o_ref.dtype)
        lse = jnp.where(empty, -jnp.inf, m_sc[:, 0:1] + jnp.log(jnp.where(empty, 1.0, den)))
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def flash_fwd(q, k, v, q_seg, kv_seg, spec, *, interpret=False):
    """Returns (o [B, Hq, Lp, Dp] in q.dtype, lse [B, Hq, Lp, 128] fp32)."""
    b, hq, lp, dp = q.shape
    nq, nk = lp // spec.block_q, k.shape[2] // spec.block_k
    q_map, kv_map = _q_major_maps(spec, nk)

    in_specs = [pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, dp), q_map),
                pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_k, dp), kv_map),
                pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_k, dp), kv_map)]
    args = [q, k, v]
    if spec.segments:
        def kvs_map(b_, h, i, j):
            return b_, 0, kv_map(b_, h, i, j)[2]
        in_specs += _seg_specs(spec, lambda b_, h, i, j: (b_, i, 0), kvs_map)
        args += [q_seg, kv_seg]
    out_specs = [pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, dp), q_map),
                 pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, LANES), q_map)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, spec, nk),
        grid=(b, hq, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, lp, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((spec.block_q, LANES), jnp.float32),  # running max
                        pltpu.VMEM((spec.block_q, LANES), jnp.float32),  # denominator
                        pltpu.VMEM((spec.block_q, dp), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)


# ----------------------------------------------------------------------------- backward

def _probs(spec, i, j, q, k, lse_ref, qs_ref, ks_ref):
    s = _scores(spec, q, k, _mask(spec, i, j, qs_ref, ks_ref))
    return jnp.exp(s - lse_ref[:, 0:1])


def _dq_kernel(spec, nk, *refs):
    n_in = 6 + 2 * spec.segments
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qs_ref, ks_ref, (dq_ref, acc_sc) = (
        _split_refs(spec, refs, n_in))
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_live(spec, i, j))
    def _tile():
        k = k_ref[...]
        p = _probs(spec, i, j, q_ref[...], k, lse_ref, qs_ref, ks_ref)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[:, 0:1]) * spec.scale
        acc_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _bwd_specs(spec, dp, q_map, kv_map):
    """(q-block spec, kv-block spec, in_specs for q, k, v, do, lse, delta) of a backward
    kernel, given its grid's index maps."""
    qo = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, dp), q_map)
    kv = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_k, dp), kv_map)
    row = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, LANES), q_map)
    return qo, kv, [qo, kv, kv, qo, row, row]


def flash_bwd_dq(q, k, v, do, lse, delta, q_seg, kv_seg, spec, *, interpret=False):
    """dq [B, Hq, Lp, Dp]. lse must have -inf replaced (e.g. by 0) for empty rows."""
    b, hq, lp, dp = q.shape
    nq, nk = lp // spec.block_q, k.shape[2] // spec.block_k
    q_map, kv_map = _q_major_maps(spec, nk)

    qo, kv, in_specs = _bwd_specs(spec, dp, q_map, kv_map)
    args = [q, k, v, do, lse, delta]
    if spec.segments:
        def kvs_map(b_, h, i, j):
            return b_, 0, kv_map(b_, h, i, j)[2]
        in_specs += _seg_specs(spec, lambda b_, h, i, j: (b_, i, 0), kvs_map)
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_dq_kernel, spec, nk),
        grid=(b, hq, nq, nk),
        in_specs=in_specs,
        out_specs=qo,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((spec.block_q, dp), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_attention_bwd_dq",
    )(*args)


def _dkv_kernel(spec, nq, *refs):
    n_in = 6 + 2 * spec.segments
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qs_ref, ks_ref, rest = _split_refs(
        spec, refs, n_in)
    dk_ref, dv_ref, dk_sc, dv_sc = rest
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_live(spec, i, j))
    def _tile():
        q, do = q_ref[...], do_ref[...]
        p = _probs(spec, i, j, q, k_ref[...], lse_ref, qs_ref, ks_ref)
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[:, 0:1]) * spec.scale
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

    @pl.when(jnp.logical_and(g == spec.groups - 1, i == nq - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def flash_bwd_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, spec, *, interpret=False):
    """(dk, dv) [B, Hkv, Sp, Dp], summed over the query heads of each group."""
    b, hkv, sp, dp = k.shape
    nq, nk = q.shape[2] // spec.block_q, sp // spec.block_k
    g = spec.groups

    def q_map(b_, h, j, gi, i):
        lo, hi = _q_range(spec, j, nq)
        return b_, h * g + gi, _clamp(i, lo, hi), 0

    def kv_map(b_, h, j, gi, i):
        return b_, h, j, 0

    qo, kv, in_specs = _bwd_specs(spec, dp, q_map, kv_map)
    args = [q, k, v, do, lse, delta]
    if spec.segments:
        in_specs += _seg_specs(spec, lambda b_, h, j, gi, i: (b_, q_map(b_, h, j, gi, i)[2], 0),
                               lambda b_, h, j, gi, i: (b_, 0, j))
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, spec, nq),
        grid=(b, hkv, nk, g, nq),
        in_specs=in_specs,
        out_specs=[kv, kv],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((spec.block_k, dp), jnp.float32),
                        pltpu.VMEM((spec.block_k, dp), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary",
                                 "arbitrary")),
        interpret=interpret,
        name="flash_attention_bwd_dkv",
    )(*args)
