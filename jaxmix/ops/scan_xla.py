"""Chunked selective scan in plain XLA with a hand-written backward (custom_vjp).

Memory: the forward keeps only the [B, N, D] state at the start of every chunk of
T steps; the backward walks the chunks in reverse, recomputes the T states of one
chunk from its start state into a [B, T, N, D] buffer, then runs the reverse
recurrence over the chunk
    g_{t-1} = a_t g_t + C_{t-1} dy_{t-1}        (g_t = dLoss/dh_t)
and takes every gradient from g_t and the recomputed h_t as it goes:
    s_t = g_t a_t h_{t-1} = g_t (h_t - b_t),   dA = sum_bt delta s,
    ddelta = sum_n A s + u sum_n g B,  du = delta sum_n g B,
    dB = sum_d g delta u,  dC = sum_d h dy,  dh_0 = a_0 g_0.
Nothing of size [B, L, D, N] is held, forward or backward; ragged L is padded with
delta = 0 steps (a = 1, no input), which leave the state unchanged.

reverse=True (h_t = a_t h_{t+1} + b_t, see ops.selective_scan) is the same code
walking the other way: both loops count scan steps p = 0, 1, ... and read time
position t = L-1-p (`_time`), so the forward walks the chunks and their steps from
the end, the saved states are those entering each chunk from the right, and the
backward walks from the start, g_{t+1} = a_t g_t + C_{t+1} dy_{t+1}. The padding
stays at the end, where the reverse scan meets it first: still a = 1, no input.

Segment ids come in as a keep mask k_t (1 carry, 0 reset; `scan_common.keep_mask`)
folded into the decay, a_t = k_t exp(delta_t A): every identity above holds as
written with that a_t (s_t = g_t (h_t - b_t) is 0 at a reset, so nothing flows into
A or delta there). Without ids the mask is absent and no step multiplies by it.

Speed on CPU: every time step is a handful of fused, state-sized loops over
[B, N, D] (channels minor: the sums over N are written as adds of slices so they
fuse with their producers; the sums over D are batched matrix-vector products),
and the state stays in cache. The decay exp(delta A) is the hot spot (evaluated
three times per element: forward, recompute and reverse), so it is computed as
2^x with a degree-5 polynomial (`_exp2`: exact at 0, relative error < 6e-7 for
|delta A| < 10 and < 4e-6 down to 2^-126), about a third cheaper than XLA:CPU's exp.
On TPU/GPU (where "auto" runs the Pallas kernels, but "xla" stays available) the
decay is XLA's exp2 and the chunk length is set for memory, not cache (`chunk_size`).
"""
import functools
import math

import jax
import jax.numpy as jnp

from jaxmix import cpu
from jaxmix.ops import residuals
from jaxmix.ops.scan_common import finish_output, keep_mask, prepare_delta
from jaxmix.ops.vma import match_vma, unify_vma

f32 = jnp.float32
LOG2E = 1.4426950408889634
# 2^f on [0, 1]: degree 5, fitted to the relative error (max 1.9e-7 in fp32) with
# p(0) = 1 and p(1) = 2 exactly, so delta = 0 (padding, or A = 0) keeps a = 1 and a
# decay close to 1 carries no bias that would compound over long sequences.
_EXP2_COEFFS = (1.0, 0.6931517124176025, 0.240159273147583, 0.05581867694854736,
                0.008990994654595852, 0.001879318617284298)
# CPU: a chunk's [B, T, N, D] buffers should stay cache resident; T is clipped to this range.
CHUNK_BYTES = 1 << 20
MIN_CHUNK, MAX_CHUNK = 4, 64
# TPU/GPU: T ~ sqrt(L), clipped to this range (see chunk_size).
ACCEL_MIN_CHUNK, ACCEL_MAX_CHUNK = 16, 256


def chunk_size(bsz, d, n, length, backend=None):
    """Time steps per chunk on `backend` (default: JAX's default backend).

    CPU: one fp32 [B, T, N, D] buffer fills CHUNK_BYTES, so a chunk's recomputed
    states stay in cache. TPU/GPU: every time step is at least one kernel launch
    whatever T is, and what T decides is memory: the forward saves L / T states and
    the backward recomputes T, so T = sqrt(L) (a power of two) keeps both at about
    sqrt(L) [B, N, D] states."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        t = CHUNK_BYTES // max(1, 4 * bsz * d * n)
        return int(max(1, min(length, max(MIN_CHUNK, min(MAX_CHUNK, t)))))
    t = 1 << max(0, round(math.log2(max(1, length)) / 2))
    return int(max(1, min(length, max(ACCEL_MIN_CHUNK, min(ACCEL_MAX_CHUNK, t)))))


def _decay(x):
    """2^x: the polynomial `_exp2` on the CPU backend (measured faster there), XLA's
    exp2 elsewhere."""
    return _exp2(x) if cpu.on_cpu() else jnp.exp2(x)


def _exp2(x):
    """2^x in fp32 for x in [-126, 126]: 2^floor(x) from the exponent bits times a
    polynomial for the fraction. Cheaper than XLA's general exp on CPU."""
    x = jnp.clip(x, -126.0, 126.0)
    k = jnp.floor(x)
    f = x - k
    p = _EXP2_COEFFS[-1]
    for c in _EXP2_COEFFS[-2::-1]:
        p = p * f + c
    return p * jax.lax.bitcast_convert_type((k.astype(jnp.int32) + 127) << 23, f32)


def _u32(i):
    """Loop indices as uint32: never negative, so no index-wrapping op per step."""
    return jnp.asarray(i).astype(jnp.uint32)


def _at(x_BLF, t, axis=1):
    """The time-t slice [B, F] of a [B, L, F] array (or of another axis)."""
    return jax.lax.dynamic_index_in_dim(x_BLF, _u32(t), axis=axis, keepdims=False)


def _put(buf_BLF, t, v_BF, axis=1):
    return jax.lax.dynamic_update_index_in_dim(buf_BLF, v_BF, _u32(t), axis=axis)


def _time(length, reverse):
    """Scan step p -> time position: p, or length-1-p for the reverse scan."""
    return (lambda p: length - 1 - p) if reverse else (lambda p: p)


def _sum_n(n, term):
    """sum over i < n of term(i), [B, D] terms built from slices of the state axis: the
    slices come before the arithmetic, so XLA fuses the whole sum into one loop."""
    return functools.reduce(lambda acc, i: acc + term(i), range(1, n), term(0))


def _bdot(x_BND, w_BD):
    """sum_d x[b, n, d] w[b, d] as a batched matrix-vector product: [B, N]."""
    return jax.lax.dot_general(x_BND, w_BD, (((2,), (1,)), ((0,), (0,))))


def _decay_kept(dl_BD, A2_ND, keep_BL, t):
    """a_t = keep_t exp(delta_t A) [B, N, D] (A2 = A log2 e; no mask: no product)."""
    a_BND = _decay(dl_BD[:, None, :] * A2_ND)
    return a_BND if keep_BL is None else a_BND * _at(keep_BL, t)[:, None, None]


def _step(h_BND, A2_ND, dl_BD, u_BD, b_BN, keep_BL, t):
    """h_t = a_t h_{t-1} + delta u B."""
    a_BND = _decay_kept(dl_BD, A2_ND, keep_BL, t)
    return a_BND * h_BND + (dl_BD * u_BD)[:, None, :] * b_BN[:, :, None]


def _scan_forward(u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, h0_BND, keep_BL, chunk, reverse):
    """y [B, L, D] (without the D skip), the last state, and the states entering every
    chunk (in scan order: chunk c holds scan steps c*chunk ... (c+1)*chunk-1). It runs
    as a jit of its own (inlined by XLA), so a jaxpr names every run of the forward
    (`_scan_forward_loop`); the backend check of `_decay` is one of its static
    arguments, so its trace cache follows that check."""
    return _scan_forward_loop(u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, h0_BND, keep_BL, chunk,
                              reverse, cpu.on_cpu())


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _scan_forward_loop(u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, h0_BND, keep_BL, chunk, reverse,
                       on_cpu):
    del on_cpu  # a cache key only: `_decay` makes the same check while tracing
    nc = u_BLD.shape[1] // chunk
    time = _time(u_BLD.shape[1], reverse)

    def step(p, carry):
        h_BND, y_BLD = carry
        t = time(p)
        h_BND = _step(h_BND, A2_ND, _at(dl_BLD, t), _at(u_BLD, t), _at(B_BLN, t), keep_BL, t)
        c_BN = _at(C_BLN, t)
        y_BD = _sum_n(h_BND.shape[1], lambda i: h_BND[:, i] * c_BN[:, i, None])
        return h_BND, _put(y_BLD, t, y_BD)

    def chunk_body(c, carry):
        h_BND, y_BLD, hs_CBND = carry
        hs_CBND = _put(hs_CBND, c, h_BND, axis=0)
        h_BND, y_BLD = jax.lax.fori_loop(c * chunk, (c + 1) * chunk, step, (h_BND, y_BLD))
        return h_BND, y_BLD, hs_CBND

    # Inside shard_map the carries vary like the inputs (see ops.vma).
    y0, hs0 = match_vma((jnp.zeros(u_BLD.shape, f32), jnp.zeros((nc,) + h0_BND.shape, f32)),
                        u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, h0_BND)
    return jax.lax.fori_loop(0, nc, chunk_body, (h0_BND, y0, hs0))


def _scan_backward(u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, hs_CBND, keep_BL, dy_BLD, dh_BND,
                   chunk, reverse):
    """Gradients (du, ddelta, dA [N, D], dB, dC, dh0) by the recurrence run backwards
    over the scan steps (p: scan step, t = time(p): its position)."""
    bsz, length, d = u_BLD.shape
    n = A2_ND.shape[0]
    nc, T = hs_CBND.shape[0], chunk
    A_ND = A2_ND / LOG2E
    time = _time(length, reverse)

    def chunk_body(j, carry):
        g_BND, dA_BND, H, du_BLD, ddl_BLD, dB_BLN, dC_BLN = carry
        t0 = (nc - 1 - j) * T
        h0_BND = _at(hs_CBND, nc - 1 - j, axis=0)

        def recompute(i, hc):
            h_BND, H, dC_BLN = hc
            t = time(t0 + i)
            h_BND = _step(h_BND, A2_ND, _at(dl_BLD, t), _at(u_BLD, t), _at(B_BLN, t),
                          keep_BL, t)
            dC_BN = _bdot(h_BND, _at(dy_BLD, t))
            return h_BND, _put(H, i, h_BND), _put(dC_BLN, t, dC_BN)

        _, H, dC_BLN = jax.lax.fori_loop(0, T, recompute, (h0_BND, H, dC_BLN))

        def reverse(k, rc):
            g_BND, dA_BND, du_BLD, ddl_BLD, dB_BLN = rc      # g_BND = dLoss/dh_t
            i = T - 1 - k
            p = t0 + i
            t = time(p)
            dl_BD, u_BD, b_BN = _at(dl_BLD, t), _at(u_BLD, t), _at(B_BLN, t)
            dlu_BD = dl_BD * u_BD
            h_BND = _at(H, i)
            ah = lambda j: h_BND[:, j] - dlu_BD * b_BN[:, j, None]     # a_t h_prev(t)
            ddl_BD = _sum_n(n, lambda j: g_BND[:, j] * (ah(j) * A_ND[j] + u_BD * b_BN[:, j, None]))
            du_BD = _sum_n(n, lambda j: g_BND[:, j] * b_BN[:, j, None]) * dl_BD
            s_BND = g_BND * (h_BND - dlu_BD[:, None, :] * b_BN[:, :, None])
            # g_prev = a_t g_t + C_prev dy_prev (prev: the step before p); at p = 0 only
            # a_t g_t (= dLoss/dh_init).
            prev = time(jnp.maximum(p, 1) - 1)
            cdy_BND = _at(C_BLN, prev)[:, :, None] * (_at(dy_BLD, prev)
                                                      * (p > 0).astype(f32))[:, None, :]
            return (_decay_kept(dl_BD, A2_ND, keep_BL, t) * g_BND + cdy_BND,
                    dA_BND + s_BND * dl_BD[:, None, :],
                    _put(du_BLD, t, du_BD), _put(ddl_BLD, t, ddl_BD),
                    _put(dB_BLN, t, _bdot(g_BND, dlu_BD)))

        g_BND, dA_BND, du_BLD, ddl_BLD, dB_BLN = jax.lax.fori_loop(
            0, T, reverse, (g_BND, dA_BND, du_BLD, ddl_BLD, dB_BLN))
        return g_BND, dA_BND, H, du_BLD, ddl_BLD, dB_BLN, dC_BLN

    zeros_BLD = jnp.zeros((bsz, length, d), f32)
    zeros_BLN = jnp.zeros((bsz, length, n), f32)
    last = time(length - 1)
    g_BND = dh_BND + _at(C_BLN, last)[:, :, None] * _at(dy_BLD, last)[:, None, :]
    carry = (g_BND, jnp.zeros_like(dh_BND), jnp.zeros((bsz, T, n, d), f32),
             zeros_BLD, zeros_BLD, zeros_BLN, zeros_BLN)
    # Inside shard_map every carry varies like the data (see ops.vma).
    carry = match_vma(carry, u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, hs_CBND, dy_BLD, dh_BND)
    g_BND, dA_BND, _, du, ddl, dB, dC = jax.lax.fori_loop(0, nc, chunk_body, carry)
    return du, ddl, jnp.sum(dA_BND, axis=0), dB, dC, g_BND


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def scan_core(u_BLD, dl_BLD, A_ND, B_BLN, C_BLN, h0_BND, keep_BL, chunk, reverse=False):
    """(y [B, L, D] without the D skip, last state [B, N, D]); fp32, L a multiple of
    chunk; `reverse` scans from the last step to the first; keep [B, L] (or None)
    multiplies the decay (0: reset)."""
    h_BND, y_BLD, _ = _scan_forward(u_BLD, dl_BLD, A_ND * LOG2E, B_BLN, C_BLN, h0_BND,
                                    keep_BL, chunk, reverse)
    return y_BLD, h_BND


def _core_fwd(u_BLD, dl_BLD, A_ND, B_BLN, C_BLN, h0_BND, keep_BL, chunk, reverse):
    A2_ND = A_ND * LOG2E
    h_BND, y_BLD, hs_CBND = _scan_forward(u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, h0_BND,
                                          keep_BL, chunk, reverse)
    # What the scan computes is tagged, so a policy can keep it rather than rerun the
    # scan; its inputs come from cheap projections and are recomputed.
    y_BLD, h_BND, hs_CBND = residuals.keep((y_BLD, h_BND, hs_CBND))
    return (y_BLD, h_BND), (u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, hs_CBND, keep_BL)


def _core_bwd(chunk, reverse, res, cts):
    u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, hs_CBND, keep_BL = res
    dy_BLD, dh_BND = cts
    grads = _scan_backward(u_BLD, dl_BLD, A2_ND, B_BLN, C_BLN, hs_CBND, keep_BL, dy_BLD,
                           dh_BND, chunk, reverse)
    return grads + (None,)      # the keep mask comes from integer ids: no gradient


scan_core.defvjp(_core_fwd, _core_bwd)


def selective_scan_xla(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None,
                       return_last_state=False, reverse=False, segment_ids=None, chunk=None):
    bsz, length, d = u.shape
    n = A.shape[-1]
    dl_BLD = prepare_delta(delta, delta_bias, delta_softplus)
    h0_BND = (jnp.zeros((bsz, n, d), f32) if initial_state is None
              else jnp.swapaxes(initial_state.astype(f32), 1, 2))
    chunk = int(chunk or chunk_size(bsz, d, n, length))
    pad = (-length) % chunk
    # Padded steps have delta = 0: a = 1 and no input, so the state passes through (the
    # reverse scan meets them first, before any real step).
    padder = lambda x: jnp.pad(x.astype(f32), ((0, 0), (0, pad), (0, 0)))
    # One varying type for scan_core's inputs inside shard_map (e.g. a replicated A next
    # to a sharded u), so its cotangents match them; A's gradient is then psummed.
    core_in = unify_vma(padder(u), padder(dl_BLD), A.astype(f32).T, padder(B), padder(C),
                        h0_BND)
    keep_BL = keep_mask(segment_ids, reverse)
    if keep_BL is not None:   # padded steps keep (a = 1): the state passes through them
        keep_BL = match_vma(jnp.pad(keep_BL, ((0, 0), (0, pad)), constant_values=1.0),
                            *core_in)
    y_BLD, h_BND = scan_core(*core_in, keep_BL, chunk, bool(reverse))
    out = finish_output(y_BLD[:, :length], u, D, z)
    return (out, jnp.swapaxes(h_BND, 1, 2)) if return_last_state else out
