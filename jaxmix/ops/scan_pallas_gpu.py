"""Selective scan on GPU: the Triton-backend Pallas kernels of
kernels_pallas.selective_scan_gpu wrapped with a custom_vjp (gradients for u, delta,
A, B, C, D, z, delta_bias and the initial state).

The kernels run on a (batch row, block of block_d channels) grid; each program keeps
its [block_d, N] fp32 state in registers and walks time in chunks of `chunk` steps,
each chunk unrolled with all of its rows loaded (the next chunk's prefetched) before
its recurrence. The forward saves the state at every chunk start; the backward
recomputes one chunk at a time from those in registers and adds its dB, dC rows
into complete [B, L, N] fp32 sums with atomic adds. Besides the [B, L, D] operands
and gradients that is B (L / chunk) D N fp32 for the saved states and 2 B L N for dB
and dC: never a [B, L, D, N] array.

Launch settings (block_d, chunk, num_warps, num_stages, prefetch) come from the
per-device table of kernels_pallas.scan_gpu_tuning (`TUNING`, `settings(device_kind)`, keyed
by substrings of the device kind; provisional until a GPU sweep sets them); every
one can be overridden per call.

This layer pads and lays out the arrays for the kernels: D up to a multiple of
block_d (a power of two) and N up to a power of two (at least MIN_N), with zeros
in A, B, C, the skip, the bias and the initial state, so padded entries stay zero
and are cut off afterwards; L is not padded. reverse=True (the scan from the last
step to the first, see ops.selective_scan) is a flag of the kernels, which then walk
the chunks and the steps inside them the other way. Segment ids become the
kernels' keep mask [B, L] (multiplying the decay; no mask without ids). The custom
backward sums the kernels' per-batch partials of dA, dD and ddelta_bias. Off GPU
the kernels run in the generic Pallas interpreter, which is slow and meant for tests.
"""
import functools

import jax
import jax.numpy as jnp

from jaxmix.ops import residuals
from jaxmix.ops.scan_common import check_shapes, keep_mask
from kernels_pallas import selective_scan_gpu as kernel
from kernels_pallas.scan_gpu_tuning import DEFAULT, TUNING, settings  # noqa: F401

MIN_N = 16          # state width padded to a power of two, at least this
MIN_BLOCK_D = 16    # narrowest channel block


def default_interpret():
    """False on GPU (compile with Triton); the generic Pallas interpreter elsewhere."""
    return jax.default_backend() != "gpu"


def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def tiles(length, d, n, block_d=None, chunk=None, device_kind=None):
    """(block_d, Dp, Np, chunk): block_d and chunk default to the device's `settings`
    (block_d lowered to the next power of two above a smaller D, at least
    MIN_BLOCK_D; chunk at most L); Dp is D rounded up to a multiple of block_d, Np is
    N rounded up to a power of two >= MIN_N."""
    table = settings(device_kind)
    if block_d is None:
        block_d = min(table["block_d"], max(MIN_BLOCK_D, _next_pow2(d)))
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"selective_scan_pallas_gpu: block_d={block_d} must be a power of two")
    chunk = min(table["chunk"], length) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"selective_scan_pallas_gpu: chunk={chunk} must be positive")
    return block_d, -(-d // block_d) * block_d, max(MIN_N, _next_pow2(n)), chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _core(u, delta, z, b, c, a, dskip, bias, h0, keep, static):
    y, h_last, _ = kernel.scan_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep, **dict(static))
    return y, h_last


def _core_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep, static):
    y, h_last, hs = kernel.scan_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep,
                                    **dict(static))
    # What the kernel computed is tagged: a remat policy keeps it rather than rerun it.
    y, h_last, hs = residuals.keep((y, h_last, hs))
    return (y, h_last), (u, delta, z, b, c, a, dskip, bias, hs, h0, keep)


def _core_bwd(static, res, cts):
    """The backward kernel's gradients in the inputs' dtypes: dB, dC come complete,
    dA, dD, ddelta_bias are summed over the batch here; `keep` gets none."""
    u, delta, z, b, c, a, dskip, bias, hs, h0, keep = res
    dy, dh_last = cts
    du, ddl, dz, db, dc, da, dD, dbias, dh0 = kernel.scan_bwd(
        u, delta, z, b, c, a, dskip, bias, hs, dy.astype(u.dtype), dh_last, keep,
        **dict(static))
    cast = lambda g, like: None if like is None else g.astype(like.dtype)
    return (cast(du, u), cast(ddl, delta), cast(dz, z), cast(db, b), cast(dc, c),
            cast(jnp.sum(da, 0), a), cast(jnp.sum(dD, 0), dskip),
            cast(jnp.sum(dbias, 0), bias), cast(dh0, h0), None)


_core.defvjp(_core_fwd, _core_bwd)


def selective_scan_pallas_gpu(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, initial_state=None,
                              return_last_state=False, reverse=False, segment_ids=None,
                              interpret=None, block_d=None, chunk=None, num_warps=None,
                              num_stages=None, prefetch=None):
    """Selective scan (semantics of `selective_scan_reference`): y [B, L, D] in u's
    dtype, and the last state [B, D, N] fp32 when return_last_state. block_d, chunk,
    num_warps, num_stages and prefetch override the device's `settings`."""
    check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
    bsz, length, d = u.shape
    n = A.shape[-1]
    table = settings()
    block_d, dp, np_, chunk = tiles(length, d, n, block_d, chunk)
    interpret = default_interpret() if interpret is None else bool(interpret)
    pick = lambda v, k: table[k] if v is None else v
    f32 = jnp.float32
    pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])
    pad_n = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, np_ - n)])
    vec = lambda v: pad_d(jnp.zeros((d,), f32) if v is None else v.astype(f32))
    h0 = (jnp.zeros((bsz, dp, np_), f32) if initial_state is None
          else jnp.pad(initial_state.astype(f32), ((0, 0), (0, dp - d), (0, np_ - n))))
    static = (("softplus", bool(delta_softplus)), ("block_d", block_d), ("chunk", chunk),
              ("interpret", interpret), ("reverse", bool(reverse)),
              ("num_warps", int(pick(num_warps, "num_warps"))),
              ("num_stages", int(pick(num_stages, "num_stages"))),
              ("prefetch", bool(pick(prefetch, "prefetch"))))
    y, h_last = _core(pad_d(u), pad_d(delta), None if z is None else pad_d(z), pad_n(B),
                      pad_n(C), jnp.pad(A.astype(f32), ((0, dp - d), (0, np_ - n))),
                      vec(D), vec(delta_bias), h0, keep_mask(segment_ids, reverse), static)
    y = y[:, :, :d]
    if return_last_state:
        return y, h_last[:, :d, :n]
    return y
