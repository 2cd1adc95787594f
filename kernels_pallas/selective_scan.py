"""Mamba-1 selective scan: forward and backward Pallas kernels (TPU / Mosaic rules).

Layout (all padded by the caller, see `jaxmix.ops.scan_pallas`):
  u, delta, z, dy        [B, Lp, Dp]   channels on lanes, time on sublanes
  bT, cT                 [B, N, Lp]    B and C transposed: time on lanes
  aT                     [N, Dp]       A transposed: the state is [N, Dt] (N sublanes)
  dskip, bias            [1, Dp]       D skip and delta bias (zeros when absent)
  h0, h_last, dh0        [B, N, Dp]
  hs                     [B, nL, N, Dp] the state at the start of every time tile
  keepT (optional)       [B, 1, Lp]    fp32 decay mask (0: reset the state before
                                       this step; packed documents), time on lanes
Lp is a multiple of block_l and Dp of block_d (a multiple of 128). Steps at or
past `length` are masked (delta forced to 0, so the state passes through), so
ragged L is padded, not rejected; padded channels are cut off by the caller.

Grid (B, Dp / block_d, Lp / block_l): batch and channel tiles "parallel", time
tiles "arbitrary" (innermost), the [N, block_d] state carried across time tiles
in an fp32 VMEM scratch. The backward walks the time tiles in reverse, recomputes
the block_l states of one tile from its saved start state into a VMEM buffer and
runs the reverse recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}; nothing of size
[B, L, D, N] is ever written to HBM.

reverse=True (h_t = a_t h_{t+1} + b_t, see ops.selective_scan) is the same pair of
kernels walking time the other way: the forward maps grid step j to time tile
n_l-1-j and runs each tile's steps from the last row to the first (hs then holds the
state entering each tile from the right), the backward walks the tiles and the rows
forwards. Padded steps sit at the end, so the reverse scan meets them first; with
delta = 0 they leave the state (and, backward, g) unchanged either way.

With keepT the decay is a_t = keep_t exp(delta_t A), forward, recompute and in the
backward's g recurrence alike; every other gradient formula holds unchanged with that
a_t. Without it the kernels take no such input and do no such product.

Inputs may be bf16; all maths is fp32 (tiles of the [B, L, D] operands are cast into
an fp32 VMEM buffer once per grid step, so the per-step row accesses never touch
packed bf16 rows). The kernels use TPU-only pieces (pltpu.VMEM scratch,
pltpu.CompilerParams), which the GPU Pallas backends do not take, so `ops` picks the
xla path on GPU.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

f32 = jnp.float32
SEMANTICS = ("parallel", "parallel", "arbitrary")


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _column(xT_NL, lane_1L, t):
    """Column t of an [N, Lt] block as [N, 1] (a masked lane sum; no dynamic lane slice)."""
    return jnp.sum(jnp.where(lane_1L == t, xT_NL, 0.0), axis=1, keepdims=True)


def _delta(io, bias_1D, t, valid, softplus):
    """(delta before softplus, delta) for row t, [1, Dt]; delta = 0 past the length."""
    raw = io[DL, pl.ds(t, 1), :] + bias_1D
    dl = _softplus(raw) if softplus else raw
    return raw, jnp.where(valid, dl, 0.0)


# Rows of the [B, L, D] operands are read and written one time step at a time. They
# are staged through an fp32 VMEM buffer `io` [K, block_l, block_d] (whole-tile casts
# in and out), so bf16 operands never need dynamic single-row (packed) accesses.
U, DL, Z, Y = 0, 1, 2, 3                  # forward rows: u, delta, z | y
DY, DU, DDL, DZ = 3, 4, 5, 6              # backward rows: u, delta, z, dy | du, ddelta, dz


def _stage_tile(io, rows, r, block_l):
    """Copies this tile's [L, D] rows into the fp32 `io` scratch; returns the fp32
    per-tile operands (A^T, D skip, delta bias, B^T, C^T, keep^T or None) and a lane
    iota. `r`: the kernel's refs by name."""
    for k, ref in rows:
        if ref is not None:
            io[k] = ref[0].astype(f32)
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, block_l), 1)
    kT = r["keepT"][0].astype(f32) if "keepT" in r else None
    return (r["aT"][...].astype(f32), r["dskip"][...].astype(f32), r["bias"][...].astype(f32),
            r["bT"][0].astype(f32), r["cT"][0].astype(f32), kT, lane)


def _decay(dl, a_ND, kT, lane, t):
    """a_t = exp(delta * A) [N, Dt], times keep_t when there is a keep mask."""
    a = jnp.exp(dl * a_ND)
    return a if kT is None else a * _column(kT, lane, t)


def _advance(h_ND, dl, u, a_ND, bT, kT, lane, t):
    """One step of the recurrence: h = a_t * h + delta * u * B_t."""
    return _decay(dl, a_ND, kT, lane, t) * h_ND + (dl * u) * _column(bT, lane, t)


def _order(reverse, n):
    """Step k of a walk over 0..n-1: k, or n-1-k when `reverse`."""
    return (lambda k: n - 1 - k) if reverse else (lambda k: k)


def _fwd_kernel(*refs, names, length, block_l, n_l, softplus, reverse):
    r = dict(zip(names, refs))
    has_z = "z" in r
    y_ref, hlast_ref, hs_ref, h_scr, io = (r[k] for k in ("y", "hlast", "hs", "h_scr", "io"))
    j = pl.program_id(2)
    l = _order(reverse, n_l)(j)           # this grid step's time tile
    row = _order(reverse, block_l)        # scan step k of the tile -> its row

    @pl.when(j == 0)
    def _():
        h_scr[...] = r["h0"][0].astype(f32)

    hs_ref[0, 0] = h_scr[...]
    a_ND, dskip, bias, bT, cT, kT, lane = _stage_tile(
        io, ((U, r["u"]), (DL, r["dl"]), (Z, r.get("z"))), r, block_l)

    def step(k, h_ND):
        t = row(k)
        valid = l * block_l + t < length
        u = io[U, pl.ds(t, 1), :]
        _, dl = _delta(io, bias, t, valid, softplus)
        h_ND = _advance(h_ND, dl, u, a_ND, bT, kT, lane, t)
        y = jnp.sum(_column(cT, lane, t) * h_ND, axis=0, keepdims=True) + dskip * u
        if has_z:
            z = io[Z, pl.ds(t, 1), :]
            y = y * (z * jax.nn.sigmoid(z))
        io[Y, pl.ds(t, 1), :] = y
        return h_ND

    h_ND = jax.lax.fori_loop(0, block_l, step, h_scr[...])
    h_scr[...] = h_ND
    y_ref[0] = io[Y].astype(y_ref.dtype)

    @pl.when(j == n_l - 1)
    def _():
        hlast_ref[0] = h_ND


def _bwd_kernel(*refs, names, length, block_l, n_l, softplus, reverse):
    r = dict(zip(names, refs))
    has_z = "z" in r
    dz_ref = r.get("dz")
    dA_ref, dD_ref, dbias_ref = r["dA"], r["dD"], r["dbias"]
    g_scr, hbuf_scr, io = r["g_scr"], r["hbuf"], r["io"]
    j = pl.program_id(2)
    l = _order(not reverse, n_l)(j)       # time tiles against the scan's direction
    row = _order(reverse, block_l)        # scan step k of the tile -> its row

    @pl.when(j == 0)
    def _():
        g_scr[...] = r["dhl"][0].astype(f32)
        dA_ref[...] = jnp.zeros_like(dA_ref)
        dD_ref[...] = jnp.zeros_like(dD_ref)
        dbias_ref[...] = jnp.zeros_like(dbias_ref)

    a_ND, dskip, bias, bT, cT, kT, lane = _stage_tile(
        io, ((U, r["u"]), (DL, r["dl"]), (Z, r.get("z")), (DY, r["dy"])), r, block_l)

    def recompute(k, h_ND):
        t = row(k)
        valid = l * block_l + t < length
        _, dl = _delta(io, bias, t, valid, softplus)
        h_ND = _advance(h_ND, dl, io[U, pl.ds(t, 1), :], a_ND, bT, kT, lane, t)
        hbuf_scr[t] = h_ND
        return h_ND

    jax.lax.fori_loop(0, block_l, recompute, r["hs"][0, 0])

    def backward(k, carry):
        g_ND, dA_ND, dD_1D, db_1D, dbT_NL, dcT_NL = carry
        t = row(block_l - 1 - k)
        valid = l * block_l + t < length
        u = io[U, pl.ds(t, 1), :]
        raw, dl = _delta(io, bias, t, valid, softplus)
        b_N1, c_N1 = _column(bT, lane, t), _column(cT, lane, t)
        h_ND = hbuf_scr[t]
        dy = io[DY, pl.ds(t, 1), :]
        if has_z:
            z = io[Z, pl.ds(t, 1), :]
            sz = jax.nn.sigmoid(z)
            y = jnp.sum(c_N1 * h_ND, axis=0, keepdims=True) + dskip * u
            io[DZ, pl.ds(t, 1), :] = dy * y * sz * (1.0 + z * (1.0 - sz))
            dy = dy * z * sz
        g_ND = g_ND + c_N1 * dy
        dlu = dl * u
        s_ND = g_ND * (h_ND - dlu * b_N1)           # g_t * a_t * h_prev
        r2 = jnp.sum(g_ND * b_N1, axis=0, keepdims=True)
        ddl = jnp.sum(s_ND * a_ND, axis=0, keepdims=True) + u * r2
        if softplus:
            ddl = ddl * jax.nn.sigmoid(raw)
        ddl = jnp.where(valid, ddl, 0.0)
        io[DU, pl.ds(t, 1), :] = dl * r2 + dskip * dy
        io[DDL, pl.ds(t, 1), :] = ddl
        sel = lane == t
        dbT_NL = jnp.where(sel, jnp.sum(g_ND * dlu, axis=1, keepdims=True), dbT_NL)
        dcT_NL = jnp.where(sel, jnp.sum(h_ND * dy, axis=1, keepdims=True), dcT_NL)
        return (_decay(dl, a_ND, kT, lane, t) * g_ND, dA_ND + s_ND * dl, dD_1D + u * dy,
                db_1D + ddl, dbT_NL, dcT_NL)

    zeros_NL = jnp.zeros(bT.shape, f32)
    init = (g_scr[...], jnp.zeros(a_ND.shape, f32), jnp.zeros(dskip.shape, f32),
            jnp.zeros(bias.shape, f32), zeros_NL, zeros_NL)
    g_ND, dA_ND, dD_1D, db_1D, dbT_NL, dcT_NL = jax.lax.fori_loop(0, block_l, backward, init)
    g_scr[...] = g_ND
    for k, ref in ((DU, r["du"]), (DDL, r["ddl"]), (DZ, dz_ref)):
        if ref is not None:
            ref[0] = io[k].astype(ref.dtype)
    r["dbT"][0, 0] = dbT_NL
    r["dcT"][0, 0] = dcT_NL
    dA_ref[0] += dA_ND
    dD_ref[0] += dD_1D
    dbias_ref[0] += db_1D

    @pl.when(j == n_l - 1)
    def _():
        r["dh0"][0] = g_ND


def _specs(b, n, block_l, block_d, n_l, reverse):
    """BlockSpecs for the (b, d, l) grid; `reverse` maps grid step j to tile n_l-1-j."""
    lt = _order(reverse, n_l)
    return dict(
        BLD=pl.BlockSpec((1, block_l, block_d), lambda i, d, j: (i, lt(j), d)),
        BNL=pl.BlockSpec((1, n, block_l), lambda i, d, j: (i, 0, lt(j))),
        ND=pl.BlockSpec((n, block_d), lambda i, d, j: (0, d)),
        OD=pl.BlockSpec((1, block_d), lambda i, d, j: (0, d)),
        BND=pl.BlockSpec((1, n, block_d), lambda i, d, j: (i, 0, d)),
        B1D=pl.BlockSpec((1, 1, block_d), lambda i, d, j: (i, 0, d)),
        HS=pl.BlockSpec((1, 1, n, block_d), lambda i, d, j: (i, lt(j), 0, d)),
        PART=pl.BlockSpec((1, 1, n, block_l), lambda i, d, j: (i, d, 0, lt(j))),
        B1L=pl.BlockSpec((1, 1, block_l), lambda i, d, j: (i, 0, lt(j))),
    )


def _check(u, bT, block_l, block_d):
    b, lp, dp = u.shape
    if lp % block_l or dp % block_d or block_d % 128 or block_l % 8:
        raise ValueError(f"selective_scan kernel: padded shape {u.shape} must be tiled by "
                         f"block_l={block_l} (multiple of 8) and block_d={block_d} "
                         f"(multiple of 128)")
    if block_l % 128 and block_l != lp:
        raise ValueError(f"selective_scan kernel: block_l={block_l} must be a multiple of "
                         f"128 or the whole padded length {lp} (B and C keep time on lanes)")
    return b, lp, dp, bT.shape[1]


STATIC = ("length", "softplus", "block_l", "block_d", "interpret", "reverse")


def _inputs(named):
    """(names, arrays, specs) of the (name, array, spec) triples whose array is given."""
    named = [x for x in named if x[1] is not None]
    return tuple(x[0] for x in named), [x[1] for x in named], [x[2] for x in named]


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_fwd(u, delta, z, bT, cT, aT, dskip, bias, h0, keepT=None, *, length, softplus,
             block_l, block_d, interpret=False, reverse=False):
    """Returns y [B, Lp, Dp] (u's dtype), h_last [B, N, Dp] fp32, hs [B, nL, N, Dp] fp32
    (hs[:, l]: the state entering time tile l in the scan's direction). keepT [B, 1, Lp]
    fp32 (or None: no input) multiplies the decay."""
    b, lp, dp, n = _check(u, bT, block_l, block_d)
    n_l = lp // block_l
    s = _specs(b, n, block_l, block_d, n_l, reverse=reverse)
    names, ins, in_specs = _inputs([
        ("u", u, s["BLD"]), ("dl", delta, s["BLD"]), ("z", z, s["BLD"]),
        ("bT", bT, s["BNL"]), ("cT", cT, s["BNL"]), ("aT", aT, s["ND"]),
        ("dskip", dskip, s["OD"]), ("bias", bias, s["OD"]), ("h0", h0, s["BND"]),
        ("keepT", keepT, s["B1L"])])
    names += ("y", "hlast", "hs", "h_scr", "io")
    kernel = functools.partial(_fwd_kernel, names=names, length=length, block_l=block_l,
                               n_l=n_l, softplus=softplus, reverse=reverse)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, dp // block_d, n_l), in_specs=in_specs,
            out_specs=[s["BLD"], s["BND"], s["HS"]],
            scratch_shapes=[pltpu.VMEM((n, block_d), f32),
                            pltpu.VMEM((4, block_l, block_d), f32)]),
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((b, n, dp), f32),
                   jax.ShapeDtypeStruct((b, n_l, n, dp), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=interpret,
    )(*ins)


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_bwd(u, delta, z, bT, cT, aT, dskip, bias, hs, dy, dh_last, keepT=None, *, length,
             softplus, block_l, block_d, interpret=False, reverse=False):
    """Gradients: du, ddelta (before bias/softplus), dz (or None) [B, Lp, Dp] in the
    dtypes of u, delta, z;
    dbT, dcT partial sums [B, Dp / block_d, N, Lp]; dA^T, dD, dbias per batch row
    ([B, N, Dp], [B, 1, Dp], [B, 1, Dp]); dh0 [B, N, Dp]."""
    b, lp, dp, n = _check(u, bT, block_l, block_d)
    n_l, n_d = lp // block_l, dp // block_d
    s = _specs(b, n, block_l, block_d, n_l, reverse=not reverse)
    has_z = z is not None
    names, ins, in_specs = _inputs([
        ("u", u, s["BLD"]), ("dl", delta, s["BLD"]), ("z", z, s["BLD"]),
        ("bT", bT, s["BNL"]), ("cT", cT, s["BNL"]), ("aT", aT, s["ND"]),
        ("dskip", dskip, s["OD"]), ("bias", bias, s["OD"]), ("hs", hs, s["HS"]),
        ("dy", dy, s["BLD"]), ("dhl", dh_last, s["BND"]), ("keepT", keepT, s["B1L"])])
    names += ("du", "ddl") + (("dz",) if has_z else ()) + (
        "dbT", "dcT", "dA", "dD", "dbias", "dh0", "g_scr", "hbuf", "io")
    bld = lambda x: jax.ShapeDtypeStruct((b, lp, dp), x.dtype)
    part = jax.ShapeDtypeStruct((b, n_d, n, lp), f32)
    b1d = jax.ShapeDtypeStruct((b, 1, dp), f32)
    bnd = jax.ShapeDtypeStruct((b, n, dp), f32)
    out_shape = [bld(u), bld(delta)] + ([bld(z)] if has_z else []) + [
        part, part, bnd, b1d, b1d, bnd]
    out_specs = [s["BLD"], s["BLD"]] + ([s["BLD"]] if has_z else []) + [
        s["PART"], s["PART"], s["BND"], s["B1D"], s["B1D"], s["BND"]]
    kernel = functools.partial(_bwd_kernel, names=names, length=length, block_l=block_l,
                               n_l=n_l, softplus=softplus, reverse=reverse)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, n_d, n_l), in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((n, block_d), f32),
                            pltpu.VMEM((block_l, n, block_d), f32),
                            pltpu.VMEM((7, block_l, block_d), f32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=interpret,
    )(*ins)
    if not has_z:
        outs = list(outs[:2]) + [None] + list(outs[2:])
    return tuple(outs)
