"""Mamba-1 selective scan: forward and backward Pallas kernels (GPU / Triton rules).

Layout (channels last, padded by the caller, see `jaxmix.ops.scan_pallas_gpu`):
  u, delta, z, y, dy      [B, L, Dp]      L unpadded (ragged is fine)
  b, c                    [B, L, Np]      B and C
  a                       [Dp, Np]        A
  dskip, bias             [Dp]            D skip and delta bias (zeros when absent)
  h0, h_last, dh0         [B, Dp, Np]
  hs                      [B, nC, Dp, Np] the state at the start of every chunk
  db, dc                  [B, L, Np]      fp32, accumulated with atomic adds
  keep (optional)         [B, L]          fp32 decay mask (0: reset the state before
                                          this step; packed documents)
Dp is a multiple of block_d; block_d and Np are powers of two (Triton tensors have
power-of-two sizes); nC = ceil(L / chunk). Padded channels and state entries
(A = B = C = 0) carry nothing into the real ones.

Grid (B, Dp / block_d): each program owns a [block_d, Np] fp32 state in registers
and walks time in chunks of `chunk` steps (the last one ragged: L % chunk steps).
A chunk is a static Python loop, so its steps are unrolled and nothing inside it is
a loop: the rows of all its steps (u, delta, z, dy as [block_d] rows, B and C as
[Np] rows, keep) are loaded first, in one go, and with `prefetch` the full chunks
run in a fori_loop whose body loads the next chunk's rows before the current
chunk's recurrence, so no load waits on the state. Rows are loaded one by one rather
than as [chunk, block_d] tiles: Triton has no register indexing, and splitting a
tile into its rows goes through shared-memory layout conversions. The softplus,
delta*u, the silu(z) gate and the D skip are computed per row ahead of the
recurrence; the decay is exp2(delta_t * A log2(e)). The steps themselves are
    h_t = a_t h_{t-1} + (delta_t u_t) B_t,   y_t = sum_n h_t C_t    (+ skip, gate)
and each y row is stored as soon as it is known. The forward saves the state at
every chunk start (hs).

The backward walks the chunks against the scan's direction. For each chunk it
recomputes the chunk's states from the saved one into a Python list of chunk + 1
[block_d, Np] values (registers: no scratch buffer, no barrier), then runs the
reverse recurrence over the chunk's steps,
    g_t = dLoss/dh_t,   g_{t-1} = a_t (g_t + C_t dy_t)    (g_t before C_t dy_t here)
taking every gradient from g_t and the states. dB and dC are sums over channels:
each program adds its [Np] row of step t into the one fp32 [B, L, Np] output with
an atomic add of relaxed ordering (kernels_pallas.triton_atomics; the outputs are
zero inputs aliased to them). dA, dD and ddelta_bias
are per-batch partials [B, Dp, Np] / [B, Dp] summed by the caller. Inputs may be
bf16; all maths is fp32.

reverse=True (h_t = a_t h_{t+1} + b_t, see ops.selective_scan) is a flag of both
kernels: chunk boundaries stay at multiples of `chunk`; the forward walks the chunks
from the last (the ragged one) to the first and each chunk's steps from its end
(hs[:, ci] is then the state entering chunk ci from the right); the backward
recomputes a chunk in that same order and walks the chunks forwards.

With `keep` the decay is a_t = keep_t exp(delta_t A) in the forward, the recompute
and the g recurrence; the other gradient formulas hold unchanged with that a_t.
Without it the kernels take no such input and do no such product.

`cost_estimate` gives XLA the flops, transcendentals and bytes of each call from
the blocks the kernels move.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.scan_gpu_tuning import DEFAULT
from kernels_pallas.triton_atomics import atomic_add

f32 = jnp.float32
SQ = pl.squeezed
LOG2E = math.log2(math.e)
ROWS_D = ("u", "dl", "z", "dy")     # [L, block_d] blocks, loaded one [block_d] row a step
ROWS_N = ("b", "c")                 # [L, Np] blocks, one [Np] row a step


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _times(t0, size, reverse):
    """The times of a chunk's `size` steps from t0, in the scan's order."""
    return [t0 + (size - 1 - k if reverse else k) for k in range(size)]


def _load_chunk(r, times, ci):
    """Every row the chunk's steps use, loaded before any of them runs: lists (one
    entry a step, scan order) per input present in r; the backward's chunk-start
    state `h` too."""
    rows = {k: [r[k][t, :] for t in times] for k in ROWS_D + ROWS_N if k in r}
    if "keep" in r:
        rows["keep"] = [r["keep"][t] for t in times]
    if "hs_in" in r:
        rows["h"] = r["hs_in"][ci]
    return rows


def _walk_chunks(length, chunk, backwards, prefetch, load, run, carry):
    """carry = run(ci, size, rows, carry) over the chunks ci in order (from the last
    when `backwards`), rows = load(ci, size). The full chunks run in a fori_loop;
    with `prefetch` its body loads chunk j+1's rows (clamped to the last full chunk)
    before running chunk j on the rows loaded one iteration earlier. The ragged
    chunk (L % chunk steps, index L // chunk) runs outside the loop."""
    n_full, rem = divmod(length, chunk)
    if rem and backwards:
        carry = run(n_full, rem, load(n_full, rem), carry)
    if n_full:
        index = (lambda j: n_full - 1 - j) if backwards else (lambda j: j)
        if prefetch:
            def body(j, state):
                carry, rows = state
                ahead = load(index(jnp.minimum(j + 1, n_full - 1)), chunk)
                return run(index(j), chunk, rows, carry), ahead

            carry, _ = jax.lax.fori_loop(0, n_full, body, (carry, load(index(0), chunk)))
        else:
            def body(j, carry):
                return run(index(j), chunk, load(index(j), chunk), carry)

            carry = jax.lax.fori_loop(0, n_full, body, carry)
    if rem and not backwards:
        carry = run(n_full, rem, load(n_full, rem), carry)
    return carry


def _params(r):
    """The program's constants: A [block_d, Np] (and A log2 e for exp2), skip, bias."""
    a_DN = r["a"][...].astype(f32)
    return dict(a=a_DN, a2=a_DN * LOG2E, dskip=r["dskip"][...].astype(f32),
                bias=r["bias"][...].astype(f32))


def _prepare(rows, p, softplus, grads=False):
    """Per-step rows in fp32, computed ahead of the recurrence: u, raw (delta + bias),
    dl (after the softplus), dlu = dl u, b, c, keep, and z, sz = sigmoid(z), dy when
    present; with `grads` also sig = sigmoid(raw) (softplus' derivative)."""
    x = {k: [v.astype(f32) for v in rows[k]] for k in ROWS_D + ROWS_N + ("keep",)
         if k in rows and k != "dl"}
    x["raw"] = [v.astype(f32) + p["bias"] for v in rows["dl"]]
    x["dl"] = [_softplus(v) for v in x["raw"]] if softplus else x["raw"]
    x["sig"] = [jax.nn.sigmoid(v) for v in x["raw"]] if softplus and grads else None
    x["dlu"] = [dl * u for dl, u in zip(x["dl"], x["u"], strict=True)]
    if "z" in x:
        x["sz"] = [jax.nn.sigmoid(v) for v in x["z"]]
    return x


def _decay(p, x, k):
    """a_k = exp2(dl_k A log2 e) [block_d, Np], times keep_k with a keep mask."""
    a_DN = jnp.exp2(x["dl"][k][:, None] * p["a2"])
    return a_DN if "keep" not in x else a_DN * x["keep"][k]


def _step(p, x, k, h_DN):
    """h_k = a_k h_{k-1} + dlu_k B_k."""
    return _decay(p, x, k) * h_DN + x["dlu"][k][:, None] * x["b"][k][None, :]


def _fwd_kernel(*refs, names, length, chunk, softplus, reverse, prefetch):
    r = dict(zip(names, refs))
    p = _params(r)
    y_ref = r["y"]

    def run(ci, size, rows, h_DN):
        r["hs"][ci] = h_DN
        x = _prepare(rows, p, softplus)
        skip = [p["dskip"] * u_D for u_D in x["u"]]
        gate = [z_D * s_D for z_D, s_D in zip(x["z"], x["sz"])] if "z" in x else None
        for k, t in enumerate(_times(ci * chunk, size, reverse)):
            h_DN = _step(p, x, k, h_DN)
            y_D = jnp.sum(h_DN * x["c"][k][None, :], axis=1) + skip[k]
            if gate is not None:
                y_D = y_D * gate[k]
            y_ref[t, :] = y_D.astype(y_ref.dtype)
        return h_DN

    load = lambda ci, size: _load_chunk(r, _times(ci * chunk, size, reverse), ci)
    r["hlast"][...] = _walk_chunks(length, chunk, reverse, prefetch, load, run,
                                   r["h0"][...].astype(f32))


def _bwd_kernel(*refs, names, length, chunk, softplus, reverse, prefetch):
    r = dict(zip(names, refs))
    p = _params(r)
    has_z = "z" in r

    def run(ci, size, rows, carry):
        g_DN, dA_DN, dD_D, dbias_D = carry           # g_DN = dLoss/dh, C dy not yet in
        times = _times(ci * chunk, size, reverse)
        x = _prepare(rows, p, softplus, grads=True)
        dyg = ([dy * z * s for dy, z, s in zip(x["dy"], x["z"], x["sz"])] if has_z
               else x["dy"])                         # dLoss/d(C.h + D u)
        states = [rows["h"]]                         # states[k + 1]: after step k
        for k, t in enumerate(times):
            states.append(_step(p, x, k, states[-1]))
            if has_z:
                y_D = jnp.sum(states[-1] * x["c"][k][None, :], axis=1) + p["dskip"] * x["u"][k]
                s_D = x["sz"][k]
                dz_D = x["dy"][k] * y_D * s_D * (1.0 + x["z"][k] * (1.0 - s_D))
                r["dz"][t, :] = dz_D.astype(r["dz"].dtype)
        for k in reversed(range(size)):
            t = jnp.asarray(times[k], jnp.int32)     # atomics take array indices only
            g_DN = g_DN + dyg[k][:, None] * x["c"][k][None, :]
            ga_DN = g_DN * _decay(p, x, k)
            s_DN = ga_DN * states[k]                 # g_k a_k h_{k-1}
            gb_D = jnp.sum(g_DN * x["b"][k][None, :], axis=1)
            ddl_D = jnp.sum(s_DN * p["a"], axis=1) + x["u"][k] * gb_D
            if softplus:
                ddl_D = ddl_D * x["sig"][k]
            r["du"][t, :] = (x["dl"][k] * gb_D + p["dskip"] * dyg[k]).astype(r["du"].dtype)
            r["ddl"][t, :] = ddl_D.astype(r["ddl"].dtype)
            atomic_add(r["db"], (t, slice(None)), jnp.sum(g_DN * x["dlu"][k][:, None], axis=0))
            atomic_add(r["dc"], (t, slice(None)), jnp.sum(states[k + 1] * dyg[k][:, None],
                                                          axis=0))
            dA_DN = dA_DN + s_DN * x["dl"][k][:, None]
            dD_D = dD_D + x["u"][k] * dyg[k]
            dbias_D = dbias_D + ddl_D
            g_DN = ga_DN
        return g_DN, dA_DN, dD_D, dbias_D

    load = lambda ci, size: _load_chunk(r, _times(ci * chunk, size, reverse), ci)
    zeros_D = jnp.zeros(p["bias"].shape, f32)
    init = (r["dhl"][...].astype(f32), jnp.zeros(p["a"].shape, f32), zeros_D, zeros_D)
    g_DN, dA_DN, dD_D, dbias_D = _walk_chunks(length, chunk, not reverse, prefetch, load,
                                              run, init)
    r["dh0"][...] = g_DN
    r["da"][...] = dA_DN
    r["dskip_out"][...] = dD_D
    r["dbias_out"][...] = dbias_D


def cost_estimate(batch, length, d, n, *, backward, dtype_bytes, block_d=None, chunk=None,
                  has_z=True, has_keep=False):
    """pl.CostEstimate of one forward (backward=False) or backward kernel call on padded
    sizes d, n, from the blocks it moves: every program streams its [L, block_d]
    columns of u, delta (z, y / dy, du, ddelta, dz) once and all of B and C ([L, n]
    rows, shared by the D / block_d programs of a batch row, counted for each), its
    chunk-start states (written by the forward, read by the backward), its A, skip,
    bias, initial / last state blocks, keep; the backward's atomic adds move one [n]
    row of dB and of dC per step and program. block_d and chunk default to DEFAULT's."""
    block_d = DEFAULT["block_d"] if block_d is None else block_d
    chunk = DEFAULT["chunk"] if chunk is None else chunk
    programs = batch * -(-d // block_d)
    bld = batch * length * d * dtype_bytes
    rows_n = 2 * programs * length * n * dtype_bytes
    states = batch * -(-length // chunk) * d * n * 4
    consts = programs * block_d * (n + 2) * 4 + 2 * batch * d * n * 4
    keep = programs * length * 4 if has_keep else 0
    elems = batch * length * d * n
    bld_elems = batch * length * d
    if not backward:
        moved = (3 + has_z) * bld + rows_n + states + consts + keep
        flops = 7 * elems + 8 * bld_elems
        transcendentals = elems + (3 + has_z) * bld_elems
    else:
        atomics = 2 * programs * length * n * 4
        moved = (5 + 2 * has_z) * bld + rows_n + states + consts + keep + atomics + (
            batch * d * (n + 2) * 4)
        flops = (24 + 2 * has_z) * elems + 16 * bld_elems
        transcendentals = 2 * elems + (4 + has_z) * bld_elems
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                           bytes_accessed=int(moved))


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


def _specs(length, n, block_d, n_chunks):
    """BlockSpecs on the (batch, channel block) grid."""
    return dict(
        BLD=pl.BlockSpec((SQ, length, block_d), lambda i, d: (i, 0, d)),
        BLN=pl.BlockSpec((SQ, length, n), lambda i, d: (i, 0, 0)),
        DN=pl.BlockSpec((block_d, n), lambda i, d: (d, 0)),
        D=pl.BlockSpec((block_d,), lambda i, d: (d,)),
        BD=pl.BlockSpec((SQ, block_d), lambda i, d: (i, d)),
        BDN=pl.BlockSpec((SQ, block_d, n), lambda i, d: (i, d, 0)),
        HS=pl.BlockSpec((SQ, n_chunks, block_d, n), lambda i, d: (i, 0, d, 0)),
        BL=pl.BlockSpec((SQ, length), lambda i, d: (i, 0)),
    )


def _inputs(named):
    """(names, arrays, specs) of the (name, array, spec) triples whose array is given."""
    named = [x for x in named if x[1] is not None]
    return tuple(x[0] for x in named), [x[1] for x in named], [x[2] for x in named]


def _common_inputs(s, u, delta, z, b, c, a, dskip, bias):
    return [("u", u, s["BLD"]), ("dl", delta, s["BLD"]), ("z", z, s["BLD"]),
            ("b", b, s["BLN"]), ("c", c, s["BLN"]), ("a", a, s["DN"]),
            ("dskip", dskip, s["D"]), ("bias", bias, s["D"])]


STATIC = ("softplus", "block_d", "chunk", "interpret", "reverse", "num_warps", "num_stages",
          "prefetch", "debug")


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep=None, *, softplus, block_d, chunk,
             interpret=False, reverse=False, num_warps=4, num_stages=1, prefetch=True,
             debug=False):
    """Returns y [B, L, Dp] (u's dtype), h_last [B, Dp, Np] fp32, hs [B, nC, Dp, Np] fp32
    (hs[:, ci]: the state entering chunk ci in the scan's direction). keep [B, L] fp32
    (or None: no input) multiplies the decay. debug=True prints the kernel's Triton IR
    when lowered for GPU."""
    bsz, length, dp, n, n_d, n_chunks = _check(u, b, block_d, chunk)
    s = _specs(length, n, block_d, n_chunks)
    names, ins, in_specs = _inputs(_common_inputs(s, u, delta, z, b, c, a, dskip, bias) + [
        ("h0", h0, s["BDN"]), ("keep", keep, s["BL"])])
    kernel = functools.partial(_fwd_kernel, names=names + ("y", "hlast", "hs"), length=length,
                               chunk=chunk, softplus=softplus, reverse=reverse,
                               prefetch=prefetch)
    cost = cost_estimate(bsz, length, dp, n, backward=False, dtype_bytes=u.dtype.itemsize,
                         block_d=block_d, chunk=chunk, has_z=z is not None,
                         has_keep=keep is not None)
    return pl.pallas_call(
        kernel,
        grid=(bsz, n_d),
        in_specs=in_specs,
        out_specs=[s["BLD"], s["BDN"], s["HS"]],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((bsz, dp, n), f32),
                   jax.ShapeDtypeStruct((bsz, n_chunks, dp, n), f32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=cost,
        interpret=interpret,
        debug=debug,
        name="selective_scan_fwd",
    )(*ins)


@functools.partial(jax.jit, static_argnames=STATIC)
def scan_bwd(u, delta, z, b, c, a, dskip, bias, hs, dy, dh_last, keep=None, *, softplus,
             block_d, chunk, interpret=False, reverse=False, num_warps=4, num_stages=1,
             prefetch=True, debug=False):
    """Gradients: du, ddelta (before bias/softplus), dz (or None) [B, L, Dp] in the
    dtypes of u, delta, z; dB, dC [B, L, Np] fp32 (complete sums over channels); dA
    [B, Dp, Np], dD [B, Dp], ddelta_bias [B, Dp] per batch row; dh0 [B, Dp, Np]."""
    bsz, length, dp, n, n_d, n_chunks = _check(u, b, block_d, chunk)
    if hs.shape != (bsz, n_chunks, dp, n):
        raise ValueError(f"selective_scan gpu kernel: hs has shape {hs.shape}, expected "
                         f"{(bsz, n_chunks, dp, n)} for chunk={chunk}")
    s = _specs(length, n, block_d, n_chunks)
    has_z = z is not None
    zeros_bln = jnp.zeros((bsz, length, n), f32)
    names, ins, in_specs = _inputs(_common_inputs(s, u, delta, z, b, c, a, dskip, bias) + [
        ("hs_in", hs, s["HS"]), ("dy", dy, s["BLD"]), ("dhl", dh_last, s["BDN"]),
        ("keep", keep, s["BL"]), ("db_zero", zeros_bln, s["BLN"]),
        ("dc_zero", zeros_bln, s["BLN"])])
    names += ("du", "ddl") + (("dz",) if has_z else ()) + (
        "db", "dc", "da", "dskip_out", "dbias_out", "dh0")
    bld = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    bln = jax.ShapeDtypeStruct((bsz, length, n), f32)
    bdn = jax.ShapeDtypeStruct((bsz, dp, n), f32)
    bd = jax.ShapeDtypeStruct((bsz, dp), f32)
    n_bld = 3 if has_z else 2
    out_shape = [bld(u), bld(delta)] + ([bld(z)] if has_z else []) + [bln, bln, bdn, bd, bd,
                                                                       bdn]
    out_specs = [s["BLD"]] * n_bld + [s["BLN"], s["BLN"], s["BDN"], s["BD"], s["BD"],
                                      s["BDN"]]
    n_in = len(ins)
    aliases = {n_in - 2: n_bld, n_in - 1: n_bld + 1}     # the zero inputs become dB, dC
    kernel = functools.partial(_bwd_kernel, names=names, length=length, chunk=chunk,
                               softplus=softplus, reverse=reverse, prefetch=prefetch)
    cost = cost_estimate(bsz, length, dp, n, backward=True, dtype_bytes=u.dtype.itemsize,
                         block_d=block_d, chunk=chunk, has_z=has_z,
                         has_keep=keep is not None)
    outs = pl.pallas_call(
        kernel,
        grid=(bsz, n_d),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=cost,
        interpret=interpret,
        debug=debug,
        name="selective_scan_bwd",
    )(*ins)
    outs = list(outs)
    if not has_z:
        outs = outs[:2] + [None] + outs[2:]
    return tuple(outs)
