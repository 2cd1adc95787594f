"""Gated delta rule, chunked forward: a Pallas kernel (TPU / Mosaic rules).

Layout (prepared by the caller, see `jaxmix.ops.gated_delta_pallas`):
  q, k     [B, H, Lp, d_k]   L2-normalised and scaled already, fp32
  v        [B, H, Lp, d_v]
  rows     [B, H, Lp / C, 8, C] fp32, one lane-dense [8, C] block per chunk: row G_ROW
                             the log decay g, row BETA_ROW the write strength beta (0 and
                             0 past the length), row RUN_ROW the segment run index of
                             every token; the other rows are zero padding
  s0       [B, H, d_k, d_v]  the initial state
Lp is a multiple of the chunk C (a multiple of 8 sublanes). Grid (B, H, Lp / C):
batch and heads "parallel", chunks "arbitrary" (innermost), the [d_k, d_v] state
carried across chunks in an fp32 VMEM scratch. Per chunk, with G the in-chunk
cumulative log decay and D[t, i] = exp(G_t - G_i) for i <= t in one segment:
  A = strict_lower(beta_t D[t, i] k_t.k_i),   Inv = (I + A)^-1 (matmuls only),
  U = Inv (beta V) - Inv (beta exp(G) K) S,   O = exp(G) Q S + (Q K^T * D) U,
  S <- exp(G_C) S + (K * exp(G_C - G))^T U.
g, beta and the run index arrive as rows (time on lanes), so one [8, C] block carries
all three instead of three [C, 1] blocks each padded to 128 lanes; the columns the
maths needs ([C, 1]: G, beta, runs) are masked reductions against the identity, the
in-chunk cumsum a masked row sum: no transposes of vectors, no dynamic lane slices.

Precision follows the caller's dtype (`matmul_dtype`): for bf16 (or fp16) inputs every
matmul takes bf16 operands with fp32 accumulation (preferred_element_type=f32), one
MXU pass each; the operands (q, k, v, the state S, the [C, C] score/inverse factors)
are rounded to bf16 just before each product, while everything else (decays, the
cumsum, the state carried between chunks, the accumulations) stays fp32. That costs
about 3 significant digits against an fp32 computation (tests/test_gated_delta.py
records the measured error), which bf16 inputs do not have anyway. For fp32 inputs the
matmuls are fp32 at Precision.HIGHEST (six bf16 passes), as exact as the xla path. `unit_lower_inverse` keeps
its fp32 HIGHEST default for the xla path, which calls it without `matmul`.

Block shapes come from `fwd_layout`, shared by the pallas_call and the VMEM model
(kernels_pallas.vmem, `vmem_bytes`); the call asks Mosaic for `vmem.limit_bytes` of
its footprint and passes `cost_estimate`. The backward is not a kernel (the caller
differentiates the chunked XLA form, which recomputes this forward).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import vmem

f32 = jnp.float32
bf16 = jnp.bfloat16
HIGHEST = lax.Precision.HIGHEST
SEMANTICS = ("parallel", "parallel", "arbitrary")
G_ROW, BETA_ROW, RUN_ROW, N_ROWS = 0, 1, 2, 8


def _mm(a, b, contract=((1,), (0,)), dtype=bf16):
    """a . b with fp32 accumulation: bf16 operands (one MXU pass), or with dtype fp32
    fp32 operands at HIGHEST precision."""
    precision = HIGHEST if dtype == f32 else None
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                           precision=precision, preferred_element_type=f32)


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


def _fwd_kernel(q_ref, k_ref, v_ref, rows_ref, s0_ref, o_ref, s_out_ref, state, prev, *,
                matmul_dtype):
    _mm_ = functools.partial(_mm, dtype=matmul_dtype)
    j = pl.program_id(2)
    c = q_ref.shape[0]
    g_row = rows_ref[G_ROW:G_ROW + 1, :]                                         # [1, C]
    beta_row = rows_ref[BETA_ROW:BETA_ROW + 1, :]
    runs_row = rows_ref[RUN_ROW:RUN_ROW + 1, :]

    @pl.when(j == 0)
    def _():
        state[...] = s0_ref[...]
        prev[...] = runs_row[:, 0:1]   # the initial state belongs to the first segment

    ti = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    ii = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    eye, causal = ti == ii, ti >= ii
    row = lambda col: jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)  # [C,1]->[1,C]
    col = lambda r: jnp.sum(jnp.where(eye, r, 0.0), axis=1, keepdims=True)      # [1,C]->[C,1]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    beta, runs = col(beta_row), col(runs_row)                                   # [C, 1]
    G = jnp.sum(jnp.where(causal, g_row, 0.0), axis=1, keepdims=True)          # [C, 1]
    live = causal & (runs == runs_row)
    D = jnp.where(live, jnp.exp(jnp.where(live, G - row(G), 0.0)), 0.0)
    decay0 = jnp.where(runs == prev[...], jnp.exp(G), 0.0)                      # [C, 1]
    kk = _mm_(k, k, ((1,), (1,)))
    A = jnp.where(live & ~eye, beta * kk * D, 0.0)
    inv = unit_lower_inverse(A, _mm_)
    s = state[...]
    u = _mm_(inv, beta * v) - _mm_(_mm_(inv, beta * decay0 * k), s)
    o = decay0 * _mm_(q, s) + _mm_(_mm_(q, k, ((1,), (1,))) * D, u)
    to_end = col(D[c - 1:c, :])                                                 # [C, 1]
    end = decay0[c - 1:c, :] * s + _mm_(k * to_end, u, ((0,), (0,)))
    state[...] = end
    prev[...] = runs_row[:, c - 1:c]
    o_ref[...] = o.astype(o_ref.dtype)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        s_out_ref[...] = end


def fwd_layout(chunk, d_k, d_v):
    """The pallas_call's blocks: (in_specs, in dtypes, out_specs, out dtypes, scratch)
    for q, k, v, rows, s0 -> o, final state (all fp32)."""
    tok = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
    rows = pl.BlockSpec((None, None, None, N_ROWS, chunk), lambda i, j, n: (i, j, n, 0, 0))
    state = pl.BlockSpec((None, None, d_k, d_v), lambda i, j, n: (i, j, 0, 0))
    in_specs = [tok(d_k), tok(d_k), tok(d_v), rows, state]
    out_specs = [tok(d_v), state]
    scratch = [pltpu.VMEM((d_k, d_v), f32), pltpu.VMEM((1, 1), f32)]
    return in_specs, [f32] * 5, out_specs, [f32] * 2, scratch


def _footprint(layout):
    in_specs, in_dtypes, out_specs, out_dtypes, scratch = layout
    return vmem.footprint(list(zip(in_specs + out_specs, in_dtypes + out_dtypes)), scratch)


def vmem_bytes(chunk, d_k, d_v):
    """VMEM footprint of the kernel at these blocks (kernels_pallas.vmem)."""
    return _footprint(fwd_layout(chunk, d_k, d_v))


def _chunk_macs(chunk, d_k, d_v):
    """Multiply-adds of one chunk: K K^T, the inverse's 2 (log2 C - 1) products,
    Inv (beta V), Inv (beta K), its product with S, Q S, Q K^T, (..) U, K^T U."""
    c = chunk
    inv = 2 * max(0, (c - 1).bit_length() - 1) * c ** 3
    return (c * c * d_k + inv + c * c * d_v + c * c * d_k + c * d_k * d_v + c * d_k * d_v
            + c * c * d_k + c * c * d_v + c * d_k * d_v)


def cost_estimate(batch, heads, length, d_k, d_v, *, chunk, backward, dtype_bytes):
    """pl.CostEstimate of the forward kernel (2 flops per multiply-add of its matmuls,
    C^2 + C exps per chunk; reads q, k, v once at dtype_bytes, the [8, C] rows block
    and the fp32 state, writes o and the final state). backward=True: the chunked xla
    form that differentiates it (recomputed forward plus about twice its matmuls), as
    the cost of the same blocks; it is not a Pallas call."""
    n_c = -(-length // chunk)
    bh = batch * heads
    flops = 2 * bh * n_c * _chunk_macs(chunk, d_k, d_v)
    exps = bh * n_c * (chunk * chunk + chunk)
    tokens = bh * n_c * chunk
    nbytes = (tokens * (2 * d_k + 2 * d_v) * dtype_bytes + bh * n_c * N_ROWS * chunk * 4
              + 2 * bh * d_k * d_v * 4)
    if backward:
        return pl.CostEstimate(flops=int(3 * flops), transcendentals=int(2 * exps),
                               bytes_accessed=int(2 * nbytes + tokens * (2 * d_k + d_v) * 4))
    return pl.CostEstimate(flops=int(flops), transcendentals=int(exps),
                           bytes_accessed=int(nbytes))


def delta_fwd(q, k, v, rows, s0, *, chunk, matmul_dtype=bf16, interpret=False):
    """(o [B, H, Lp, d_v] fp32, final state [B, H, d_k, d_v] fp32); layout above;
    `matmul_dtype` the matmuls' operand dtype (bf16, or fp32 at HIGHEST)."""
    b, h, lp, dk = q.shape
    dv = v.shape[-1]
    layout = fwd_layout(chunk, dk, dv)
    in_specs, _, out_specs, _, scratch = layout
    return pl.pallas_call(
        functools.partial(_fwd_kernel, matmul_dtype=jnp.dtype(matmul_dtype)),
        grid=(b, h, lp // chunk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, h, lp, dv), f32),
                   jax.ShapeDtypeStruct((b, h, dk, dv), f32)],
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=SEMANTICS,
            vmem_limit_bytes=vmem.limit_bytes(_footprint(layout))),
        cost_estimate=cost_estimate(b, h, lp, dk, dv, chunk=chunk, backward=False,
                                    dtype_bytes=q.dtype.itemsize),
        interpret=interpret,
    )(q, k, v, rows, s0)
