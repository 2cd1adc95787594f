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

Blocks default to DEFAULT_BLOCK (512) rows and columns, clipped by the caller to the
128-rounded lengths: a forward 512 x 512 tile is 134 MFLOP at head dim 128, about
0.7 us of MXU work on a v5e (197 TFLOP/s bf16), against a fixed ~0.35 us per grid
step (a 128 x 128 tile has 1/16 of that work). Only partially visible tiles build
the mask: a live tile that `_full` proves entirely visible (inside kv_len, at or below
the causal diagonal, inside the window or the sink, and no segment ids) takes a
mask-free branch (`pl.when` on the two cases), so with causal masking only the
diagonal and boundary tiles pay for the iotas, compares and selects.

Block shapes come from `fwd_layout` / `dq_layout` / `dkv_layout`, shared by the
pallas_calls and the VMEM model (kernels_pallas.vmem, `vmem_bytes`); every call asks
Mosaic for `vmem.limit_bytes` of its footprint and passes a `cost_estimate` counted
from its live tiles (K/V read once per query block, Q/dO once per key block).

Three kernels: forward (o, lse), dq, and dk/dv; every entry point takes
`interpret=` (pass `pltpu.InterpretParams()` or True off TPU).
"""
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import vmem

LANES = 128
SUBLANES = 8
DEFAULT_BLOCK = 512


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


def _full(spec, i, j):
    """Whether every pair of query block i and key block j may attend (no mask needed):
    never with segment ids (their equality is data)."""
    if spec.segments:
        return False
    q_first = i * spec.block_q + spec.offset
    q_last = q_first + spec.block_q - 1
    k_first = j * spec.block_k
    k_last = k_first + spec.block_k - 1
    full = k_last < spec.kv_len
    if spec.causal or spec.window:
        full = jnp.logical_and(full, k_last <= q_first)
    if spec.window:
        inside = k_first > q_last - spec.window
        if spec.sink:
            inside = jnp.logical_or(inside, k_last < spec.sink)
        full = jnp.logical_and(full, inside)
    return full


def _branches(spec, i, j, body):
    """Runs body(masked) on a live tile: body(False) where `_full` holds, body(True)
    on the partially visible tiles (diagonal, window edge, kv_len, segments)."""
    live, full = _live(spec, i, j), _full(spec, i, j)
    if full is False:
        pl.when(live)(functools.partial(body, True))
        return
    pl.when(jnp.logical_and(live, full))(functools.partial(body, False))
    pl.when(jnp.logical_and(live, jnp.logical_not(full)))(functools.partial(body, True))


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
    """Scaled scores [block_q, block_k] fp32; -inf where `mask` (None: none) is False."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * spec.scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _mask_if(masked, spec, i, j, qs_ref, ks_ref):
    return _mask(spec, i, j, qs_ref, ks_ref) if masked else None


def _split_refs(spec, refs, n_in):
    ins, rest = refs[:n_in], refs[n_in:]
    if spec.segments:
        return ins[:-2], ins[-2], ins[-1], rest
    return ins, None, None, rest


def _seg_specs(spec, q_map, kv_map):
    return [pl.BlockSpec((pl.squeezed, spec.block_q, LANES), q_map),
            pl.BlockSpec((pl.squeezed, SUBLANES, spec.block_k), kv_map)]


def _params(semantics, layout):
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=vmem.limit_bytes(_footprint(layout)))


def _footprint(layout):
    in_specs, in_dtypes, out_specs, out_dtypes, scratch = layout
    return vmem.footprint(list(zip(in_specs + out_specs, in_dtypes + out_dtypes)), scratch)


# ----------------------------------------------------------------------------- layouts

def _seg_dtypes(spec):
    return [jnp.int32, jnp.int32] if spec.segments else []


def fwd_layout(spec, dp, nk, dtype):
    """The forward call's blocks: (in_specs, in dtypes, out_specs, out dtypes, scratch)
    for q, k, v (and segment ids) of `dtype`, head dim padded to dp, nk key blocks."""
    q_map, kv_map = _q_major_maps(spec, nk)
    qo = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, dp), q_map)
    kv = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_k, dp), kv_map)
    in_specs = [qo, kv, kv]
    if spec.segments:
        def kvs_map(b_, h, i, j):
            return b_, 0, kv_map(b_, h, i, j)[2]
        in_specs += _seg_specs(spec, lambda b_, h, i, j: (b_, i, 0), kvs_map)
    out_specs = [qo, pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, LANES), q_map)]
    scratch = [pltpu.VMEM((spec.block_q, LANES), jnp.float32),  # running max
               pltpu.VMEM((spec.block_q, LANES), jnp.float32),  # denominator
               pltpu.VMEM((spec.block_q, dp), jnp.float32)]
    return (in_specs, [dtype] * 3 + _seg_dtypes(spec), out_specs, [dtype, jnp.float32],
            scratch)


def _bwd_specs(spec, dp, q_map, kv_map):
    """(q-block spec, kv-block spec, in_specs for q, k, v, do, lse, delta) of a backward
    kernel, given its grid's index maps."""
    qo = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, dp), q_map)
    kv = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_k, dp), kv_map)
    row = pl.BlockSpec((pl.squeezed, pl.squeezed, spec.block_q, LANES), q_map)
    return qo, kv, [qo, kv, kv, qo, row, row]


BWD_IN_DTYPES = lambda dtype: [dtype] * 4 + [jnp.float32] * 2  # noqa: E731


def dq_layout(spec, dp, nk, dtype):
    """The dq call's blocks, as `fwd_layout` (inputs q, k, v, do, lse, delta, segs)."""
    q_map, kv_map = _q_major_maps(spec, nk)
    qo, _, in_specs = _bwd_specs(spec, dp, q_map, kv_map)
    if spec.segments:
        def kvs_map(b_, h, i, j):
            return b_, 0, kv_map(b_, h, i, j)[2]
        in_specs += _seg_specs(spec, lambda b_, h, i, j: (b_, i, 0), kvs_map)
    return (in_specs, BWD_IN_DTYPES(dtype) + _seg_dtypes(spec), [qo], [dtype],
            [pltpu.VMEM((spec.block_q, dp), jnp.float32)])


def dkv_layout(spec, dp, nq, dtype):
    """The dk/dv call's blocks, as `fwd_layout`; grid (b, kv head, j, group, i)."""
    g = spec.groups

    def q_map(b_, h, j, gi, i):
        lo, hi = _q_range(spec, j, nq)
        return b_, h * g + gi, _clamp(i, lo, hi), 0

    def kv_map(b_, h, j, gi, i):
        return b_, h, j, 0

    _, kv, in_specs = _bwd_specs(spec, dp, q_map, kv_map)
    if spec.segments:
        in_specs += _seg_specs(spec, lambda b_, h, j, gi, i: (b_, q_map(b_, h, j, gi, i)[2], 0),
                               lambda b_, h, j, gi, i: (b_, 0, j))
    return (in_specs, BWD_IN_DTYPES(dtype) + _seg_dtypes(spec), [kv, kv], [dtype, dtype],
            [pltpu.VMEM((spec.block_k, dp), jnp.float32),
             pltpu.VMEM((spec.block_k, dp), jnp.float32)])


def vmem_bytes(spec, head_dim, dtype=jnp.bfloat16):
    """{"fwd", "dq", "dkv"}: VMEM footprint of each kernel at `spec`'s blocks."""
    dp = -(-head_dim // LANES) * LANES
    return {"fwd": _footprint(fwd_layout(spec, dp, 1, dtype)),
            "dq": _footprint(dq_layout(spec, dp, 1, dtype)),
            "dkv": _footprint(dkv_layout(spec, dp, 1, dtype))}


# ----------------------------------------------------------------------------- costs

def _live_tiles(spec, nq, nk):
    """How many (query block, key block) tiles are live (`_live` over the whole grid)."""
    i, j = np.arange(nq)[:, None], np.arange(nk)[None, :]
    with jax.ensure_compile_time_eval():
        live = np.asarray(_live(spec, i, j))
    return int(np.sum(np.broadcast_to(live, (nq, nk))))


def _spec_for(q_len, kv_len, causal, block_q, block_k):
    bq = min(block_q or DEFAULT_BLOCK, -(-q_len // LANES) * LANES)
    bk = min(block_k or DEFAULT_BLOCK, -(-kv_len // LANES) * LANES)
    return Spec(causal=bool(causal), window=None, sink=0, scale=1.0, q_len=q_len,
                kv_len=kv_len, offset=kv_len - q_len, block_q=bq, block_k=bk, groups=1,
                segments=False)


def _kernel_costs(spec, bh, nq, nk, dp, dtype_bytes):
    """{"fwd", "dq", "dkv"}: pl.CostEstimate of each kernel over bh (batch x heads)
    problems, counted per live tile: 2 flops per multiply-add of each matmul (2 in the
    forward, 3 in dq, 4 in dk/dv), one exp per score; the blocks a kernel streams are
    read once per live tile (K/V per query block in fwd/dq, Q/dO/lse/delta per key
    block in dk/dv), the resident ones once."""
    live = _live_tiles(spec, nq, nk)
    pair = spec.block_q * spec.block_k
    q_bytes = nq * spec.block_q * dp * dtype_bytes          # one [Lp, Dp] array
    row_bytes = nq * spec.block_q * LANES * 4               # lse or delta [Lp, 128]
    kv_tile = spec.block_k * dp * dtype_bytes
    q_tile = spec.block_q * dp * dtype_bytes + 2 * spec.block_q * LANES * 4
    kv_bytes = nk * kv_tile

    def est(matmuls, exps, nbytes):
        return pl.CostEstimate(flops=int(bh * live * pair * dp * 2 * matmuls),
                               transcendentals=int(bh * live * pair * exps),
                               bytes_accessed=int(bh * nbytes))

    return {"fwd": est(2, 1, 2 * q_bytes + row_bytes + 2 * live * kv_tile),
            "dq": est(3, 1, 3 * q_bytes + 2 * row_bytes + 2 * live * kv_tile),
            "dkv": est(4, 1, 4 * kv_bytes + 2 * live * q_tile)}


def cost_estimate(batch, heads, q_len, kv_len, head_dim, *, causal, backward, dtype_bytes,
                  block_q=None, block_k=None):
    """pl.CostEstimate of the forward kernel, or of the two backward kernels (dq plus
    dk/dv) together, for [batch, heads] problems of q_len x kv_len at head_dim, with
    blocks block_q x block_k (default DEFAULT_BLOCK, clipped to the 128-rounded
    lengths, as the op does). Only live tiles count (causal: the lower triangle of
    tiles)."""
    spec = _spec_for(q_len, kv_len, causal, block_q, block_k)
    nq, nk = -(-q_len // spec.block_q), -(-kv_len // spec.block_k)
    dp = -(-head_dim // LANES) * LANES
    c = _kernel_costs(spec, batch * heads, nq, nk, dp, dtype_bytes)
    if not backward:
        return c["fwd"]
    return pl.CostEstimate(**{f: getattr(c["dq"], f) + getattr(c["dkv"], f)
                              for f in ("flops", "transcendentals", "bytes_accessed")})


def _call_cost(spec, q, k, name):
    b, hq, lp, dp = q.shape
    nq, nk = lp // spec.block_q, k.shape[2] // spec.block_k
    return _kernel_costs(spec, b * hq, nq, nk, dp, q.dtype.itemsize)[name]


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

    def tile(masked):
        s = _scores(spec, q_ref[...], k_ref[...], _mask_if(masked, spec, i, j, qs_ref, ks_ref))
        m_prev = m_sc[:, 0:1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(alpha * l_sc[:, 0:1] + p.sum(axis=1, keepdims=True),
                                     l_sc.shape)
        pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv

    _branches(spec, i, j, tile)

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
    layout = fwd_layout(spec, dp, nk, q.dtype)
    in_specs, _, out_specs, _, scratch = layout
    args = [q, k, v] + ([q_seg, kv_seg] if spec.segments else [])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, spec, nk),
        grid=(b, hq, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, lp, LANES), jnp.float32)],
        scratch_shapes=scratch,
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary"), layout),
        cost_estimate=_call_cost(spec, q, k, "fwd"),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)


# ----------------------------------------------------------------------------- backward

def _probs(spec, q, k, lse_ref, mask):
    s = _scores(spec, q, k, mask)
    return jnp.exp(s - lse_ref[:, 0:1])


def _dq_kernel(spec, nk, *refs):
    n_in = 6 + 2 * spec.segments
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qs_ref, ks_ref, (dq_ref, acc_sc) = (
        _split_refs(spec, refs, n_in))
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def tile(masked):
        k = k_ref[...]
        p = _probs(spec, q_ref[...], k, lse_ref, _mask_if(masked, spec, i, j, qs_ref, ks_ref))
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[:, 0:1]) * spec.scale
        acc_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)

    _branches(spec, i, j, tile)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def flash_bwd_dq(q, k, v, do, lse, delta, q_seg, kv_seg, spec, *, interpret=False):
    """dq [B, Hq, Lp, Dp]. lse must have -inf replaced (e.g. by 0) for empty rows."""
    b, hq, lp, dp = q.shape
    nq, nk = lp // spec.block_q, k.shape[2] // spec.block_k
    layout = dq_layout(spec, dp, nk, q.dtype)
    in_specs, _, out_specs, _, scratch = layout
    args = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if spec.segments else [])
    return pl.pallas_call(
        functools.partial(_dq_kernel, spec, nk),
        grid=(b, hq, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs[0],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=scratch,
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary"), layout),
        cost_estimate=_call_cost(spec, q, k, "dq"),
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

    def tile(masked):
        q, do = q_ref[...], do_ref[...]
        p = _probs(spec, q, k_ref[...], lse_ref, _mask_if(masked, spec, i, j, qs_ref, ks_ref))
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[:, 0:1]) * spec.scale
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

    _branches(spec, i, j, tile)

    @pl.when(jnp.logical_and(g == spec.groups - 1, i == nq - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def flash_bwd_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, spec, *, interpret=False):
    """(dk, dv) [B, Hkv, Sp, Dp], summed over the query heads of each group."""
    b, hkv, sp, dp = k.shape
    nq, nk = q.shape[2] // spec.block_q, sp // spec.block_k
    layout = dkv_layout(spec, dp, nq, q.dtype)
    in_specs, _, out_specs, _, scratch = layout
    args = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if spec.segments else [])
    return pl.pallas_call(
        functools.partial(_dkv_kernel, spec, nq),
        grid=(b, hkv, nk, spec.groups, nq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=scratch,
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary",
                                 "arbitrary"), layout),
        cost_estimate=_call_cost(spec, q, k, "dkv"),
        interpret=interpret,
        name="flash_attention_bwd_dkv",
    )(*args)
