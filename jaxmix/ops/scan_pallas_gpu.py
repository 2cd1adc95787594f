"""Selective scan on GPU: the Triton-backend Pallas kernels of
kernels_pallas.selective_scan_gpu wrapped with a custom_vjp (gradients for u, delta,
A, B, C, D, z, delta_bias and the initial state).

The kernels follow mamba_ssm's CUDA design: one program per (batch row, block of
block_d channels) keeps its [block_d, N] fp32 state in registers and walks time
inside the kernel one row at a time. The forward saves the state at the start of
every chunk of `chunk` steps; the backward recomputes one chunk at a time from
those into a [B, chunk, D, N] buffer. Besides the [B, L, D] operands and gradients
that is B (L / chunk + chunk) D N fp32 for the states and 2 B (D / block_d) L N for
the dB, dC partial sums: never a [B, L, D, N] array.

This layer pads and lays out the arrays for the kernels: D up to a multiple of
block_d (a power of two) and N up to a power of two (at least MIN_N), with zeros
in A, B, C, the skip, the bias and the initial state, so padded entries stay zero
and are cut off afterwards; L is not padded. reverse=True (the scan from the last
step to the first, see ops.selective_scan) is a flag of the kernels, which then walk
the chunks and the steps inside them the other way. Segment ids become the
kernels' keep mask [B, L] (multiplying the decay; no mask without ids). It also
reduces the kernels' per-channel-block partial sums (dB, dC) and per-batch partials
(dA, dD, ddelta_bias). Off GPU the kernels run in the generic Pallas interpreter, which is
slow and meant for tests.
"""
import jax
import jax.numpy as jnp

from jaxmix.ops.scan_pallas import make_core
from jaxmix.ops.selective_scan import check_shapes, keep_mask
from kernels_pallas import selective_scan_gpu as kernel

BLOCK_D = 32        # channels per program: a [32, 16] fp32 state is 4 registers a thread
MIN_N = 16          # state width padded to a power of two, at least this
CHUNK = 64          # steps per saved state / per backward recompute


def default_interpret():
    """False on GPU (compile with Triton); the generic Pallas interpreter elsewhere."""
    return jax.default_backend() != "gpu"


def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def tiles(length, d, n, block_d=None, chunk=None):
    """(block_d, Dp, Np, chunk): block_d defaults to BLOCK_D (or the next power of two
    above a smaller D, at least 16); Dp is D rounded up to a multiple of block_d, Np is
    N rounded up to a power of two >= MIN_N; chunk defaults to min(CHUNK, L)."""
    if block_d is None:
        block_d = min(BLOCK_D, max(16, _next_pow2(d)))
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"selective_scan_pallas_gpu: block_d={block_d} must be a power of two")
    chunk = min(CHUNK, length) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"selective_scan_pallas_gpu: chunk={chunk} must be positive")
    return block_d, -(-d // block_d) * block_d, max(MIN_N, _next_pow2(n)), chunk


_core = make_core(kernel)  # the custom_vjp shared with the TPU kernel


def selective_scan_pallas_gpu(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, initial_state=None,
                              return_last_state=False, reverse=False, segment_ids=None,
                              interpret=None, block_d=None, chunk=None):
    """Selective scan (semantics of `selective_scan_reference`): y [B, L, D] in u's
    dtype, and the last state [B, D, N] fp32 when return_last_state."""
    check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
    bsz, length, d = u.shape
    n = A.shape[-1]
    block_d, dp, np_, chunk = tiles(length, d, n, block_d, chunk)
    interpret = default_interpret() if interpret is None else bool(interpret)
    f32 = jnp.float32
    pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])
    pad_n = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, np_ - n)])
    vec = lambda v: pad_d(jnp.zeros((d,), f32) if v is None else v.astype(f32))
    h0 = (jnp.zeros((bsz, dp, np_), f32) if initial_state is None
          else jnp.pad(initial_state.astype(f32), ((0, 0), (0, dp - d), (0, np_ - n))))
    static = (("softplus", bool(delta_softplus)), ("block_d", block_d), ("chunk", chunk),
              ("interpret", interpret), ("reverse", bool(reverse)))
    y, h_last = _core(pad_d(u), pad_d(delta), None if z is None else pad_d(z), pad_n(B),
                      pad_n(C), jnp.pad(A.astype(f32), ((0, dp - d), (0, np_ - n))),
                      vec(D), vec(delta_bias), h0, keep_mask(segment_ids, reverse), static)
    y = y[:, :, :d]
    if return_last_state:
        return y, h_last[:, :d, :n]
    return y
