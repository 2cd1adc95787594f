"""Gated delta rule, chunked forward: a Pallas kernel (TPU / Mosaic rules).

Layout (prepared by the caller, see `jaxmix.ops.gated_delta_pallas`):
  q, k     [B, H, Lp, d_k]   L2-normalised and scaled already, fp32
  v        [B, H, Lp, d_v]
  g, beta  [B, H, Lp, 1]     log decay and write strength (0 and 0 past the length)
  runs     [B, 1, Lp, 1]     the segment run index of every token, as fp32
  s0       [B, H, d_k, d_v]  the initial state
Lp is a multiple of the chunk C (a multiple of 8 sublanes). Grid (B, H, Lp / C):
batch and heads "parallel", chunks "arbitrary" (innermost), the [d_k, d_v] state
carried across chunks in an fp32 VMEM scratch. Per chunk, with G the in-chunk
cumulative log decay and D[t, i] = exp(G_t - G_i) for i <= t in one segment:
  A = strict_lower(beta_t D[t, i] k_t.k_i),   Inv = (I + A)^-1 (matmuls only),
  U = Inv (beta V) - Inv (beta exp(G) K) S,   O = exp(G) Q S + (Q K^T * D) U,
  S <- exp(G_C) S + (K * exp(G_C - G))^T U.
Column/row conversions of the [C, 1] vectors are masked reductions against the
identity, the in-chunk cumsum a masked row sum: no transposes of vectors, no
dynamic lane slices. The backward is not a kernel (the caller differentiates the
chunked XLA form, which recomputes this forward).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

f32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
SEMANTICS = ("parallel", "parallel", "arbitrary")


def _mm(a, b, contract=((1,), (0,))):
    return lax.dot_general(a, b, (contract, ((), ())), precision=HIGHEST,
                           preferred_element_type=f32)


def unit_lower_inverse(A, matmul=None):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], by matmuls only.

    A is nilpotent (A^C = 0), so (I + A)^-1 = sum_k (-A)^k = (I - A)(I + A^2)(I + A^4)...
    with ceil(log2 C) factors: 2 log2(C) small matmuls and no sequential substitution
    loop. `matmul` (default: a batched fp32 matmul at HIGHEST precision) multiplies
    [..., C, C] pairs."""
    if matmul is None:
        matmul = functools.partial(jnp.matmul, precision=HIGHEST)
    c = A.shape[-1]
    eye = (lax.broadcasted_iota(jnp.int32, (c, c), 0)
           == lax.broadcasted_iota(jnp.int32, (c, c), 1)).astype(A.dtype)
    power = -A
    inv = eye + power
    for _ in range(max(0, (c - 1).bit_length() - 1)):
        power = matmul(power, power)
        inv = inv + matmul(inv, power)
    return inv


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, r_ref, s0_ref, o_ref, s_out_ref,
                state, prev):
    j = pl.program_id(2)
    c = q_ref.shape[0]

    @pl.when(j == 0)
    def _():
        state[...] = s0_ref[...]
        prev[...] = r_ref[0:1, :]      # the initial state belongs to the first segment

    ti = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    ii = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    eye, causal = ti == ii, ti >= ii
    row = lambda col: jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)  # [C,1]->[1,C]
    col = lambda r: jnp.sum(jnp.where(eye, r, 0.0), axis=1, keepdims=True)      # [1,C]->[C,1]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    beta, runs = b_ref[...], r_ref[...]
    G = jnp.sum(jnp.where(causal, row(g_ref[...]), 0.0), axis=1, keepdims=True)  # [C, 1]
    live = causal & (runs == row(runs))
    D = jnp.where(live, jnp.exp(jnp.where(live, G - row(G), 0.0)), 0.0)
    decay0 = jnp.where(runs == prev[...], jnp.exp(G), 0.0)                      # [C, 1]
    kk = _mm(k, k, ((1,), (1,)))
    A = jnp.where(live & ~eye, beta * kk * D, 0.0)
    inv = unit_lower_inverse(A, _mm)
    s = state[...]
    u = _mm(inv, beta * v) - _mm(_mm(inv, beta * decay0 * k), s)
    o = decay0 * _mm(q, s) + _mm(_mm(q, k, ((1,), (1,))) * D, u)
    to_end = col(D[c - 1:c, :])                                                 # [C, 1]
    end = decay0[c - 1:c, :] * s + _mm(k * to_end, u, ((0,), (0,)))
    state[...] = end
    prev[...] = runs[c - 1:c, :]
    o_ref[...] = o.astype(o_ref.dtype)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        s_out_ref[...] = end


def delta_fwd(q, k, v, g, beta, runs, s0, *, chunk, interpret=False):
    """(o [B, H, Lp, d_v] fp32, final state [B, H, d_k, d_v] fp32); layout above."""
    b, h, lp, dk = q.shape
    dv = v.shape[-1]
    grid = (b, h, lp // chunk)
    tok = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
    runs_spec = pl.BlockSpec((None, None, chunk, 1), lambda i, j, n: (i, 0, n, 0))
    state_spec = pl.BlockSpec((None, None, dk, dv), lambda i, j, n: (i, j, 0, 0))
    return pl.pallas_call(
        _fwd_kernel,
        grid=grid,
        in_specs=[tok(dk), tok(dk), tok(dv), tok(1), tok(1), runs_spec, state_spec],
        out_specs=[tok(dv), state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, h, lp, dv), f32),
                   jax.ShapeDtypeStruct((b, h, dk, dv), f32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), f32), pltpu.VMEM((1, 1), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=interpret,
    )(q, k, v, g, beta, runs, s0)
