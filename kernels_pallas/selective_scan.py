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
in an fp32 VMEM scratch. Channel tiles are wide (up to 1536 lanes, see
`jaxmix.ops.scan_pallas.tiles`), so one recurrence step updates N * block_d / 1024
vregs (24 at N 16, block_d 1536) rather than a handful.

Inside a time tile the steps run in sub-chunks of `sub` rows (32 when it divides
block_l), each in three passes:
  1. vector pass (no dependence between steps): a_t = exp(delta_t A) (times keep_t)
     into `a_scr` [sub, N, Dt] and b_t = delta_t u_t B_t into `hb_scr` [sub, N, Dt];
  2. the sequential pass, nothing but h = a_t * h + b_t, writing h_t over b_t
     (unrolled by 8, so the loads of the next steps overlap the multiply-add chain);
  3. vector pass: y_t = sum_n C_t h_t + D u_t (times silu(z_t)) from the stored h_t.
So the loop-carried chain is one multiply-add per step; the exps, the B/C column
extraction and the C reduction sit in passes whose iterations are independent.
The backward walks the time tiles in reverse, recomputes the block_l states of one
tile from its saved start state into `hbuf` [block_l, N, Dt] with the same passes 1
and 2, then runs the reverse recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} in
sub-chunks the same way: a vector pass (the z gate's dz and gated dy, a_t into
`a_scr`, C_t dy_t into `gbuf` [sub, N, Dt]), the sequential pass (one add and one
multiply per step, g_t written over C_t dy_t), and a gradient pass taking du, ddelta,
dA, dD, dbias and the dB / dC columns from g_t and h_t. Nothing of size
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
packed bf16 rows). Block shapes come from `fwd_layout` / `bwd_layout`, which the
pallas_calls and the VMEM model (`fwd_vmem_bytes` / `bwd_vmem_bytes`, kernels_pallas.
vmem) share; each call asks Mosaic for `vmem.limit_bytes` of its footprint and passes
`cost_estimate`. The kernels use TPU-only pieces (pltpu.VMEM scratch,
pltpu.CompilerParams), which the GPU Pallas backends do not take, so `ops` picks the
xla path on GPU.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import vmem

f32 = jnp.float32
SEMANTICS = ("parallel", "parallel", "arbitrary")
DEFAULT_BLOCK_L = 128     # the time tile of cost_estimate's hs / dB partial sizes
UNROLL = 8                # unroll of the sequential passes (sub is a multiple of 8)


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


def sub_rows(block_l):
    """Rows of one sub-chunk of a time tile: 32, 16 or 8, the largest dividing block_l."""
    return next(s for s in (32, 16, 8) if block_l % s == 0)


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


def _order(reverse, n):
    """Step k of a walk over 0..n-1: k, or n-1-k when `reverse`."""
    return (lambda k: n - 1 - k) if reverse else (lambda k: k)


def _scan_tile(h_ND, tile, a_scr, hb, hb_index, *, sub, block_l, row, after=None):
    """Runs the recurrence over one time tile, `sub` steps at a time, and returns the
    state after its last step. Per sub-chunk: a vector pass fills a_scr[kk] = a_t and
    hb[hb_index(kk, t)] = b_t, the sequential pass replaces each b_t by h_t =
    a_t h_{t-1} + b_t, then `after(s)` (if given) reads the sub-chunk's states.
    `tile` = (a_ND, bias, bT, kT, lane, l, length, softplus); `row(k)`: step k's row."""
    a_ND, bias, bT, kT, lane, l, length, softplus, io = tile

    def chunk(s, h_ND):
        def prep(kk, carry):
            t = row(s * sub + kk)
            valid = l * block_l + t < length
            _, dl = _delta(io, bias, t, valid, softplus)
            a_scr[kk] = _decay(dl, a_ND, kT, lane, t)
            hb[hb_index(kk, t)] = (dl * io[U, pl.ds(t, 1), :]) * _column(bT, lane, t)
            return carry

        jax.lax.fori_loop(0, sub, prep, 0)

        def step(kk, h_ND):
            i = hb_index(kk, row(s * sub + kk))
            h_ND = a_scr[kk] * h_ND + hb[i]
            hb[i] = h_ND
            return h_ND

        h_ND = jax.lax.fori_loop(0, sub, step, h_ND, unroll=UNROLL)
        if after is not None:
            after(s)
        return h_ND

    return jax.lax.fori_loop(0, block_l // sub, chunk, h_ND)


def _fwd_kernel(*refs, names, length, block_l, n_l, softplus, reverse):
    r = dict(zip(names, refs))
    has_z = "z" in r
    y_ref, hlast_ref, hs_ref, h_scr, io = (r[k] for k in ("y", "hlast", "hs", "h_scr", "io"))
    a_scr, hb_scr = r["a_scr"], r["hb_scr"]
    sub = a_scr.shape[0]
    j = pl.program_id(2)
    l = _order(reverse, n_l)(j)           # this grid step's time tile
    row = _order(reverse, block_l)        # scan step k of the tile -> its row

    @pl.when(j == 0)
    def _():
        h_scr[...] = r["h0"][0].astype(f32)

    hs_ref[0, 0] = h_scr[...]
    a_ND, dskip, bias, bT, cT, kT, lane = _stage_tile(
        io, ((U, r["u"]), (DL, r["dl"]), (Z, r.get("z"))), r, block_l)

    def outputs(s):
        def out(kk, carry):
            t = row(s * sub + kk)
            u = io[U, pl.ds(t, 1), :]
            y = jnp.sum(_column(cT, lane, t) * hb_scr[kk], axis=0, keepdims=True) + dskip * u
            if has_z:
                z = io[Z, pl.ds(t, 1), :]
                y = y * (z * jax.nn.sigmoid(z))
            io[Y, pl.ds(t, 1), :] = y
            return carry

        jax.lax.fori_loop(0, sub, out, 0)

    tile = (a_ND, bias, bT, kT, lane, l, length, softplus, io)
    h_ND = _scan_tile(h_scr[...], tile, a_scr, hb_scr, lambda kk, t: kk, sub=sub,
                      block_l=block_l, row=row, after=outputs)
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
    g_scr, hbuf_scr, io, a_scr = r["g_scr"], r["hbuf"], r["io"], r["a_scr"]
    gbuf = r["gbuf"]
    sub = a_scr.shape[0]
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

    tile = (a_ND, bias, bT, kT, lane, l, length, softplus, io)
    _scan_tile(r["hs"][0, 0], tile, a_scr, hbuf_scr, lambda kk, t: t, sub=sub,
               block_l=block_l, row=row)
    back = lambda s, kk: row(block_l - 1 - (s * sub + kk))   # backward step -> its row

    def chunk(s, carry):
        def prep(kk, c):
            t = back(s, kk)
            valid = l * block_l + t < length
            c_N1 = _column(cT, lane, t)
            dy = io[DY, pl.ds(t, 1), :]
            if has_z:
                u, z = io[U, pl.ds(t, 1), :], io[Z, pl.ds(t, 1), :]
                sz = jax.nn.sigmoid(z)
                y = jnp.sum(c_N1 * hbuf_scr[t], axis=0, keepdims=True) + dskip * u
                io[DZ, pl.ds(t, 1), :] = dy * y * sz * (1.0 + z * (1.0 - sz))
                dy = dy * z * sz
                io[DY, pl.ds(t, 1), :] = dy         # the gated dy, for the gradient pass
            _, dl = _delta(io, bias, t, valid, softplus)
            a_scr[kk] = _decay(dl, a_ND, kT, lane, t)
            gbuf[kk] = c_N1 * dy
            return c

        jax.lax.fori_loop(0, sub, prep, 0)

        def step(kk, g_ND):                         # g_t = a_{t'} g_{t'} + C_t dy_t
            g_ND = g_ND + gbuf[kk]
            gbuf[kk] = g_ND
            return a_scr[kk] * g_ND

        g_in = jax.lax.fori_loop(0, sub, step, carry[0], unroll=UNROLL)

        def grads(kk, acc):
            dA_ND, dD_1D, db_1D, dbT_NL, dcT_NL = acc
            t = back(s, kk)
            valid = l * block_l + t < length
            u, dy = io[U, pl.ds(t, 1), :], io[DY, pl.ds(t, 1), :]
            raw, dl = _delta(io, bias, t, valid, softplus)
            b_N1 = _column(bT, lane, t)
            g_ND, h_ND = gbuf[kk], hbuf_scr[t]
            dlu = dl * u
            s_ND = g_ND * (h_ND - dlu * b_N1)       # g_t * a_t * h_prev
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
            return dA_ND + s_ND * dl, dD_1D + u * dy, db_1D + ddl, dbT_NL, dcT_NL

        return g_in, jax.lax.fori_loop(0, sub, grads, carry[1])

    zeros_NL = jnp.zeros(bT.shape, f32)
    acc = (jnp.zeros(a_ND.shape, f32), jnp.zeros(dskip.shape, f32),
           jnp.zeros(bias.shape, f32), zeros_NL, zeros_NL)
    g_ND, (dA_ND, dD_1D, db_1D, dbT_NL, dcT_NL) = jax.lax.fori_loop(
        0, block_l // sub, chunk, (g_scr[...], acc))
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


def _specs(n, block_l, block_d, n_l, reverse):
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


def fwd_layout(n, block_l, block_d, n_l, *, dtypes, reverse=False):
    """The forward pallas_call's blocks: (input names, in_specs, in dtypes, out_specs,
    out dtypes, scratch shapes). `dtypes`: name -> dtype of every input given (u, dl,
    bT, cT, aT, dskip, bias, h0; z and keepT when present)."""
    s = _specs(n, block_l, block_d, n_l, reverse)
    ins = [(k, sp) for k, sp in (
        ("u", s["BLD"]), ("dl", s["BLD"]), ("z", s["BLD"]), ("bT", s["BNL"]),
        ("cT", s["BNL"]), ("aT", s["ND"]), ("dskip", s["OD"]), ("bias", s["OD"]),
        ("h0", s["BND"]), ("keepT", s["B1L"])) if k in dtypes]
    sub = sub_rows(block_l)
    scratch = [pltpu.VMEM((n, block_d), f32), pltpu.VMEM((4, block_l, block_d), f32),
               pltpu.VMEM((sub, n, block_d), f32), pltpu.VMEM((sub, n, block_d), f32)]
    return (tuple(k for k, _ in ins), [sp for _, sp in ins], [dtypes[k] for k, _ in ins],
            [s["BLD"], s["BND"], s["HS"]], [dtypes["u"], f32, f32], scratch)


def bwd_layout(n, block_l, block_d, n_l, *, dtypes, reverse=False):
    """The backward pallas_call's blocks, as `fwd_layout` (inputs u, dl, z?, bT, cT,
    aT, dskip, bias, hs, dy, dhl, keepT?)."""
    s = _specs(n, block_l, block_d, n_l, not reverse)
    ins = [(k, sp) for k, sp in (
        ("u", s["BLD"]), ("dl", s["BLD"]), ("z", s["BLD"]), ("bT", s["BNL"]),
        ("cT", s["BNL"]), ("aT", s["ND"]), ("dskip", s["OD"]), ("bias", s["OD"]),
        ("hs", s["HS"]), ("dy", s["BLD"]), ("dhl", s["BND"]), ("keepT", s["B1L"]))
        if k in dtypes]
    has_z = "z" in dtypes
    out_specs = [s["BLD"], s["BLD"]] + ([s["BLD"]] if has_z else []) + [
        s["PART"], s["PART"], s["BND"], s["B1D"], s["B1D"], s["BND"]]
    out_dtypes = [dtypes["u"], dtypes["dl"]] + ([dtypes["z"]] if has_z else []) + [f32] * 6
    sub = sub_rows(block_l)
    scratch = [pltpu.VMEM((n, block_d), f32), pltpu.VMEM((block_l, n, block_d), f32),
               pltpu.VMEM((7, block_l, block_d), f32), pltpu.VMEM((sub, n, block_d), f32),
               pltpu.VMEM((sub, n, block_d), f32)]
    return (tuple(k for k, _ in ins), [sp for _, sp in ins], [dtypes[k] for k, _ in ins],
            out_specs, out_dtypes, scratch)


def _model_dtypes(dtype, backward, has_z=True, has_keep=False):
    names = ["u", "dl", "bT", "cT", "aT", "dskip", "bias"] + (
        ["hs", "dy", "dhl"] if backward else ["h0"])
    names += (["z"] if has_z else []) + (["keepT"] if has_keep else [])
    return {k: (dtype if k in ("u", "dl", "z", "dy", "bT", "cT") else f32) for k in names}


def _footprint(layout):
    _, in_specs, in_dtypes, out_specs, out_dtypes, scratch = layout
    return vmem.footprint(list(zip(in_specs + out_specs, in_dtypes + out_dtypes)), scratch)


def fwd_vmem_bytes(n, block_l, block_d, *, dtype=jnp.bfloat16, has_z=True, has_keep=False):
    """VMEM footprint of the forward kernel at these blocks (kernels_pallas.vmem)."""
    return _footprint(fwd_layout(n, block_l, block_d, 1,
                                 dtypes=_model_dtypes(dtype, False, has_z, has_keep)))


def bwd_vmem_bytes(n, block_l, block_d, *, dtype=jnp.bfloat16, has_z=True, has_keep=False):
    """VMEM footprint of the backward kernel at these blocks (kernels_pallas.vmem)."""
    return _footprint(bwd_layout(n, block_l, block_d, 1,
                                 dtypes=_model_dtypes(dtype, True, has_z, has_keep)))


def cost_estimate(batch, length, d, n, *, backward, dtype_bytes, block_l=DEFAULT_BLOCK_L,
                  block_d=None):
    """pl.CostEstimate of the forward (or backward) kernel over [batch, length, d] with
    state size n: per (step, channel, state) the forward does the decay's product and
    exp, b's product, the multiply-add and y's product-sum (7 flops, 1 exp), per (step,
    channel) softplus, skip and gate (about 10 flops, 3 transcendentals); the backward
    recomputes the states (4) and runs the gradient step (about 16), 2 exps. Bytes: the
    [B, L, D] operands once each (u, delta, z, y; backward also dy, du, ddelta, dz),
    B and C once, the tile-start states hs (fp32, one [N, D] per time tile) and, in
    the backward, the fp32 dB / dC partial sums per channel block."""
    block_d = d if block_d is None else block_d
    tdn, td = batch * length * d * n, batch * length * d
    n_l, n_d = -(-length // block_l), -(-d // block_d)
    bc = 2 * batch * length * n * dtype_bytes
    hs = batch * n_l * n * d * 4
    if not backward:
        return pl.CostEstimate(flops=int(7 * tdn + 10 * td), transcendentals=int(tdn + 3 * td),
                               bytes_accessed=int(4 * td * dtype_bytes + bc + hs))
    parts = 2 * batch * n_d * n * length * 4
    return pl.CostEstimate(flops=int(20 * tdn + 20 * td), transcendentals=int(2 * tdn + 4 * td),
                           bytes_accessed=int(7 * td * dtype_bytes + bc + hs + parts))


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


def _params(layout):
    return pltpu.CompilerParams(dimension_semantics=SEMANTICS,
                                vmem_limit_bytes=vmem.limit_bytes(_footprint(layout)))


def _dtypes(**arrays):
    return {k: x.dtype for k, x in arrays.items() if x is not None}


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_fwd(u, delta, z, bT, cT, aT, dskip, bias, h0, keepT=None, *, length, softplus,
             block_l, block_d, interpret=False, reverse=False):
    """Returns y [B, Lp, Dp] (u's dtype), h_last [B, N, Dp] fp32, hs [B, nL, N, Dp] fp32
    (hs[:, l]: the state entering time tile l in the scan's direction). keepT [B, 1, Lp]
    fp32 (or None: no input) multiplies the decay."""
    b, lp, dp, n = _check(u, bT, block_l, block_d)
    n_l = lp // block_l
    arrays = dict(u=u, dl=delta, z=z, bT=bT, cT=cT, aT=aT, dskip=dskip, bias=bias, h0=h0,
                  keepT=keepT)
    layout = fwd_layout(n, block_l, block_d, n_l, dtypes=_dtypes(**arrays), reverse=reverse)
    names, in_specs, _, out_specs, _, scratch = layout
    names += ("y", "hlast", "hs", "h_scr", "io", "a_scr", "hb_scr")
    kernel = functools.partial(_fwd_kernel, names=names, length=length, block_l=block_l,
                               n_l=n_l, softplus=softplus, reverse=reverse)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, dp // block_d, n_l), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((b, n, dp), f32),
                   jax.ShapeDtypeStruct((b, n_l, n, dp), f32)],
        compiler_params=_params(layout),
        cost_estimate=cost_estimate(b, lp, dp, n, backward=False,
                                    dtype_bytes=u.dtype.itemsize, block_l=block_l,
                                    block_d=block_d),
        interpret=interpret,
    )(*(arrays[k] for k in layout[0]))


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_bwd(u, delta, z, bT, cT, aT, dskip, bias, hs, dy, dh_last, keepT=None, *, length,
             softplus, block_l, block_d, interpret=False, reverse=False):
    """Gradients: du, ddelta (before bias/softplus), dz (or None) [B, Lp, Dp] in the
    dtypes of u, delta, z;
    dbT, dcT partial sums [B, Dp / block_d, N, Lp]; dA^T, dD, dbias per batch row
    ([B, N, Dp], [B, 1, Dp], [B, 1, Dp]); dh0 [B, N, Dp]."""
    b, lp, dp, n = _check(u, bT, block_l, block_d)
    n_l, n_d = lp // block_l, dp // block_d
    has_z = z is not None
    arrays = dict(u=u, dl=delta, z=z, bT=bT, cT=cT, aT=aT, dskip=dskip, bias=bias, hs=hs,
                  dy=dy, dhl=dh_last, keepT=keepT)
    layout = bwd_layout(n, block_l, block_d, n_l, dtypes=_dtypes(**arrays), reverse=reverse)
    names, in_specs, _, out_specs, out_dtypes, scratch = layout
    names += ("du", "ddl") + (("dz",) if has_z else ()) + (
        "dbT", "dcT", "dA", "dD", "dbias", "dh0", "g_scr", "hbuf", "io", "a_scr", "gbuf")
    part = (b, n_d, n, lp)
    shapes = [u.shape, u.shape] + ([u.shape] if has_z else []) + [
        part, part, (b, n, dp), (b, 1, dp), (b, 1, dp), (b, n, dp)]
    kernel = functools.partial(_bwd_kernel, names=names, length=length, block_l=block_l,
                               n_l=n_l, softplus=softplus, reverse=reverse)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, n_d, n_l), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct(s, dt) for s, dt in zip(shapes, out_dtypes)],
        compiler_params=_params(layout),
        cost_estimate=cost_estimate(b, lp, dp, n, backward=True,
                                    dtype_bytes=u.dtype.itemsize, block_l=block_l,
                                    block_d=block_d),
        interpret=interpret,
    )(*(arrays[k] for k in layout[0]))
    if not has_z:
        outs = list(outs[:2]) + [None] + list(outs[2:])
    return tuple(outs)
