"""Mamba-1 selective scan: forward and backward Pallas kernels (GPU / Triton rules).

Layout (channels last, padded by the caller, see `jaxmix.ops.scan_pallas_gpu`):
  u, delta, z, y, dy      [B, L, Dp]      L unpadded (ragged is fine)
  b, c                    [B, L, Np]      B and C
  a                       [Dp, Np]        A
  dskip, bias             [Dp]            D skip and delta bias (zeros when absent)
  h0, h_last, dh0         [B, Dp, Np]
  hs                      [B, nC, Dp, Np] the state at the start of every chunk
  keep (optional)         [B, L]          fp32 decay mask (0: reset the state before
                                          this step; packed documents)
Dp is a multiple of block_d and block_d, Np are powers of two (Triton tensors must
have power-of-two sizes); nC = ceil(L / chunk). Padded channels and state entries
(A = B = C = 0) carry nothing into the real ones.

Grid (B, Dp / block_d), as mamba_ssm's CUDA kernel: each program owns a [block_d, Np]
fp32 state in registers (a fori_loop carry) and walks time inside the kernel,
loading and storing one time row (`ref[t, :]`) per step, so L needs no padding.
The forward saves the state at every chunk start. The backward walks the chunks
in reverse: it recomputes the chunk's states from the saved one into a
[chunk, block_d, Np] slice of `hbuf` [B, chunk, Dp, Np] (a kernel output used as
per-program scratch; never [B, L, Dp, Np]), then runs the reverse recurrence
    g_t = dLoss/dh_t,   g_{t-1} = exp(delta_t A) g_t + C_{t-1} dy_{t-1}
taking every gradient from g_t and h_t. dB and dC are sums over channels, written
as one partial row per channel block ([B, Dp / block_d, L, Np], reduced by the
caller); dA, dD and ddelta_bias are per-batch partials. Inputs may be bf16; all
maths is fp32.

reverse=True (h_t = a_t h_{t+1} + b_t, see ops.selective_scan) is a flag of both
kernels: the forward walks the chunks from the last (the ragged one) to the first
and each chunk's rows from its end (hs[:, ci] is then the state entering chunk ci
from the right); the backward recomputes a chunk in that same order and walks the
chunks and rows forwards. L is not padded, so no step needs masking either way.

With `keep` the decay is a_t = keep_t exp(delta_t A) in the forward, the recompute
and the g recurrence; the other gradient formulas hold unchanged with that a_t.
Without it the kernels take no such input and do no such product.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32
SQ = pl.squeezed


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _row(ref, t):
    """Time row t of an [L, F] block, as an fp32 [F] vector."""
    return ref[t, :].astype(f32)


def _delta(dl_ref, bias_D, t, softplus):
    """(delta + bias before the softplus, delta) for step t, [block_d] each."""
    raw_D = _row(dl_ref, t) + bias_D
    return raw_D, (_softplus(raw_D) if softplus else raw_D)


def _decay(a_DN, dl_D, keep_ref, t):
    """a_t = exp(delta_t A) [block_d, Np], times keep_t when there is a keep mask."""
    a = jnp.exp(dl_D[:, None] * a_DN)
    return a if keep_ref is None else a * keep_ref[t].astype(f32)


def _advance(h_DN, a_DN, dl_D, u_D, b_N, keep_ref, t):
    """h_t = a_t h_{t-1} + delta_t u_t B_t."""
    return _decay(a_DN, dl_D, keep_ref, t) * h_DN + (dl_D * u_D)[:, None] * b_N[None, :]


def _walk(lo, hi, k, backwards):
    """Step k of a walk over the rows lo..hi-1: lo + k, or hi-1-k when `backwards`."""
    return hi - 1 - k if backwards else lo + k


def _fwd_kernel(*refs, names, length, chunk, softplus, reverse):
    r = dict(zip(names, refs))
    has_z, keep_ref = "z" in r, r.get("keep")
    u_ref, dl_ref, b_ref, c_ref, y_ref, hs_ref = (r[k] for k in ("u", "dl", "b", "c", "y",
                                                                   "hs"))
    a_DN = r["a"][...].astype(f32)
    dskip_D = r["dskip"][...].astype(f32)
    bias_D = r["bias"][...].astype(f32)

    def step(t, h_DN):
        u_D = _row(u_ref, t)
        _, dl_D = _delta(dl_ref, bias_D, t, softplus)
        h_DN = _advance(h_DN, a_DN, dl_D, u_D, _row(b_ref, t), keep_ref, t)
        y_D = jnp.sum(h_DN * _row(c_ref, t)[None, :], axis=1) + dskip_D * u_D
        if has_z:
            z_D = _row(r["z"], t)
            y_D = y_D * (z_D * jax.nn.sigmoid(z_D))
        y_ref[t, :] = y_D.astype(y_ref.dtype)
        return h_DN

    n_chunks = pl.cdiv(length, chunk)

    def chunk_body(j, h_DN):
        ci = _walk(0, n_chunks, j, reverse)
        hs_ref[ci] = h_DN
        t0 = ci * chunk
        t1 = jnp.minimum(t0 + chunk, length)
        return jax.lax.fori_loop(0, t1 - t0, lambda k, h: step(_walk(t0, t1, k, reverse), h),
                                 h_DN)

    h_DN = jax.lax.fori_loop(0, n_chunks, chunk_body, r["h0"][...].astype(f32))
    r["hlast"][...] = h_DN


def _bwd_kernel(*refs, names, length, chunk, softplus, reverse, barrier):
    r = dict(zip(names, refs))
    has_z, keep_ref = "z" in r, r.get("keep")
    u_ref, dl_ref, b_ref, c_ref, dy_ref, hbuf_ref = (r[k] for k in ("u", "dl", "b", "c", "dy",
                                                                     "hbuf"))
    du_ref, ddl_ref, db_ref, dc_ref = (r[k] for k in ("du", "ddl", "db", "dc"))
    a_DN = r["a"][...].astype(f32)
    dskip_D = r["dskip"][...].astype(f32)
    bias_D = r["bias"][...].astype(f32)
    n_chunks = pl.cdiv(length, chunk)
    # hbuf rows are written and read back by different threads of the program.
    sync = pltriton.debug_barrier if barrier else (lambda: None)

    def chunk_body(j, carry):
        ci = _walk(0, n_chunks, j, not reverse)   # chunks against the scan's direction
        t0 = ci * chunk
        t1 = jnp.minimum(t0 + chunk, length)

        def recompute(k, h_DN):
            t = _walk(t0, t1, k, reverse)
            _, dl_D = _delta(dl_ref, bias_D, t, softplus)
            h_DN = _advance(h_DN, a_DN, dl_D, _row(u_ref, t), _row(b_ref, t), keep_ref, t)
            hbuf_ref[t - t0] = h_DN
            return h_DN

        jax.lax.fori_loop(0, t1 - t0, recompute, r["hs"][ci])
        sync()

        def backward(k, carry):
            g_DN, dA_DN, dD_D, dbias_D = carry        # g_DN = dLoss/dh_t, C_t dy_t not yet in
            t = _walk(t0, t1, k, not reverse)
            u_D = _row(u_ref, t)
            raw_D, dl_D = _delta(dl_ref, bias_D, t, softplus)
            b_N, c_N = _row(b_ref, t), _row(c_ref, t)
            h_DN = hbuf_ref[t - t0]
            dy_D = _row(dy_ref, t)
            if has_z:
                z_D = _row(r["z"], t)
                sz_D = jax.nn.sigmoid(z_D)
                y_D = jnp.sum(h_DN * c_N[None, :], axis=1) + dskip_D * u_D
                dz_D = dy_D * y_D * sz_D * (1.0 + z_D * (1.0 - sz_D))
                r["dz"][t, :] = dz_D.astype(r["dz"].dtype)
                dy_D = dy_D * (z_D * sz_D)
            g_DN = g_DN + dy_D[:, None] * c_N[None, :]
            dlu_D = dl_D * u_D
            s_DN = g_DN * (h_DN - dlu_D[:, None] * b_N[None, :])    # g_t a_t h_prev
            gb_D = jnp.sum(g_DN * b_N[None, :], axis=1)
            ddl_D = jnp.sum(s_DN * a_DN, axis=1) + u_D * gb_D
            if softplus:
                ddl_D = ddl_D * jax.nn.sigmoid(raw_D)
            du_ref[t, :] = (dl_D * gb_D + dskip_D * dy_D).astype(du_ref.dtype)
            ddl_ref[t, :] = ddl_D.astype(ddl_ref.dtype)
            db_ref[t, :] = jnp.sum(g_DN * dlu_D[:, None], axis=0)
            dc_ref[t, :] = jnp.sum(h_DN * dy_D[:, None], axis=0)
            return (_decay(a_DN, dl_D, keep_ref, t) * g_DN, dA_DN + s_DN * dl_D[:, None],
                    dD_D + u_D * dy_D, dbias_D + ddl_D)

        carry = jax.lax.fori_loop(0, t1 - t0, backward, carry)
        sync()
        return carry

    zeros_D = jnp.zeros(bias_D.shape, f32)
    init = (r["dhl"][...].astype(f32), jnp.zeros(a_DN.shape, f32), zeros_D, zeros_D)
    g_DN, dA_DN, dD_D, dbias_D = jax.lax.fori_loop(0, n_chunks, chunk_body, init)
    r["dh0"][...] = g_DN
    r["da"][...] = dA_DN
    r["dskip_out"][...] = dD_D
    r["dbias_out"][...] = dbias_D


def _is_pow2(x):
    return x > 0 and x & (x - 1) == 0


def _check(u, b, block_d, chunk):
    """(B, L, Dp, Np, number of channel blocks, number of chunks) after validation."""
    bsz, length, dp = u.shape
    n = b.shape[-1]
    if not _is_pow2(block_d) or dp % block_d:
        raise ValueError(f"selective_scan gpu kernel: block_d={block_d} must be a power "
                         f"of two dividing the padded D={dp}")
    if not _is_pow2(n):
        raise ValueError(f"selective_scan gpu kernel: padded N={n} must be a power of two")
    if chunk < 1 or length < 1:
        raise ValueError(f"selective_scan gpu kernel: need chunk >= 1 and L >= 1, got "
                         f"chunk={chunk}, L={length}")
    return bsz, length, dp, n, dp // block_d, -(-length // chunk)


def _specs(length, n, block_d, chunk, n_chunks):
    """BlockSpecs on the (batch, channel block) grid."""
    return dict(
        BLD=pl.BlockSpec((SQ, length, block_d), lambda i, d: (i, 0, d)),
        BLN=pl.BlockSpec((SQ, length, n), lambda i, d: (i, 0, 0)),
        DN=pl.BlockSpec((block_d, n), lambda i, d: (d, 0)),
        D=pl.BlockSpec((block_d,), lambda i, d: (d,)),
        BD=pl.BlockSpec((SQ, block_d), lambda i, d: (i, d)),
        BDN=pl.BlockSpec((SQ, block_d, n), lambda i, d: (i, d, 0)),
        HS=pl.BlockSpec((SQ, n_chunks, block_d, n), lambda i, d: (i, 0, d, 0)),
        BUF=pl.BlockSpec((SQ, chunk, block_d, n), lambda i, d: (i, 0, d, 0)),
        PART=pl.BlockSpec((SQ, SQ, length, n), lambda i, d: (i, d, 0, 0)),
        BL=pl.BlockSpec((SQ, length), lambda i, d: (i, 0)),
    )


def _inputs(named):
    """(names, arrays, specs) of the (name, array, spec) triples whose array is given."""
    named = [x for x in named if x[1] is not None]
    return tuple(x[0] for x in named), [x[1] for x in named], [x[2] for x in named]


STATIC = ("softplus", "block_d", "chunk", "interpret", "reverse", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep=None, *, softplus, block_d, chunk,
             interpret=False, reverse=False, num_warps=4, num_stages=1):
    """Returns y [B, L, Dp] (u's dtype), h_last [B, Dp, Np] fp32, hs [B, nC, Dp, Np] fp32
    (hs[:, ci]: the state entering chunk ci in the scan's direction). keep [B, L] fp32
    (or None: no input) multiplies the decay."""
    bsz, length, dp, n, n_d, n_chunks = _check(u, b, block_d, chunk)
    s = _specs(length, n, block_d, chunk, n_chunks)
    names, ins, in_specs = _inputs([
        ("u", u, s["BLD"]), ("dl", delta, s["BLD"]), ("z", z, s["BLD"]), ("b", b, s["BLN"]),
        ("c", c, s["BLN"]), ("a", a, s["DN"]), ("dskip", dskip, s["D"]),
        ("bias", bias, s["D"]), ("h0", h0, s["BDN"]), ("keep", keep, s["BL"])])
    kernel = functools.partial(_fwd_kernel, names=names + ("y", "hlast", "hs"), length=length,
                               chunk=chunk, softplus=softplus, reverse=reverse)
    return pl.pallas_call(
        kernel,
        grid=(bsz, n_d),
        in_specs=in_specs,
        out_specs=[s["BLD"], s["BDN"], s["HS"]],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((bsz, dp, n), f32),
                   jax.ShapeDtypeStruct((bsz, n_chunks, dp, n), f32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="selective_scan_fwd",
    )(*ins)


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_bwd(u, delta, z, b, c, a, dskip, bias, hs, dy, dh_last, keep=None, *, softplus,
             block_d, chunk, interpret=False, reverse=False, num_warps=4, num_stages=1):
    """Gradients: du, ddelta (before bias/softplus), dz (or None) [B, L, Dp] in the
    dtypes of u, delta, z; dB, dC partial sums [B, Dp / block_d, L, Np] fp32; dA
    [B, Dp, Np], dD [B, Dp], ddelta_bias [B, Dp] per batch row; dh0 [B, Dp, Np]."""
    bsz, length, dp, n, n_d, n_chunks = _check(u, b, block_d, chunk)
    if hs.shape != (bsz, n_chunks, dp, n):
        raise ValueError(f"selective_scan gpu kernel: hs has shape {hs.shape}, expected "
                         f"{(bsz, n_chunks, dp, n)} for chunk={chunk}")
    s = _specs(length, n, block_d, chunk, n_chunks)
    has_z = z is not None
    names, ins, in_specs = _inputs([
        ("u", u, s["BLD"]), ("dl", delta, s["BLD"]), ("z", z, s["BLD"]), ("b", b, s["BLN"]),
        ("c", c, s["BLN"]), ("a", a, s["DN"]), ("dskip", dskip, s["D"]),
        ("bias", bias, s["D"]), ("hs", hs, s["HS"]), ("dy", dy, s["BLD"]),
        ("dhl", dh_last, s["BDN"]), ("keep", keep, s["BL"])])
    names += ("du", "ddl") + (("dz",) if has_z else ()) + (
        "db", "dc", "da", "dskip_out", "dbias_out", "dh0", "hbuf")
    bld = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    part = jax.ShapeDtypeStruct((bsz, n_d, length, n), f32)
    bdn = jax.ShapeDtypeStruct((bsz, dp, n), f32)
    bd = jax.ShapeDtypeStruct((bsz, dp), f32)
    out_shape = [bld(u), bld(delta)] + ([bld(z)] if has_z else []) + [
        part, part, bdn, bd, bd, bdn, jax.ShapeDtypeStruct((bsz, chunk, dp, n), f32)]
    out_specs = [s["BLD"]] * (3 if has_z else 2) + [
        s["PART"], s["PART"], s["BDN"], s["BD"], s["BD"], s["BDN"], s["BUF"]]
    kernel = functools.partial(_bwd_kernel, names=names, length=length, chunk=chunk,
                               softplus=softplus, reverse=reverse, barrier=not interpret)
    outs = pl.pallas_call(
        kernel,
        grid=(bsz, n_d),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="selective_scan_bwd",
    )(*ins)
    outs = list(outs[:-1])                    # drop the recompute buffer
    if not has_z:
        outs = outs[:2] + [None] + outs[2:]
    return tuple(outs)
