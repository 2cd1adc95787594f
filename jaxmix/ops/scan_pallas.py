"""selective_scan(impl="pallas"): the Pallas kernels of kernels_pallas.selective_scan
wrapped with a custom_vjp (gradients for u, delta, A, B, C, D, z, delta_bias and the
initial state).

This layer pads and lays out the arrays for the kernels: L up to a multiple of the
time tile (masked inside the kernel), D up to a multiple of the channel tile
(`tiles`: up to 1536 lanes, sized by the kernels' VMEM model; cut off afterwards),
B and C transposed to [B, N, L] and A to [N, D] so the state is [N, D] with channels
on lanes. Off TPU the kernels run interpreted
(`per_device.tpu_kernel_interpret`), which is slow and meant for tests.
reverse=True (the scan from the last step to the first, see ops.selective_scan) is
a flag of the kernels, which walk the time tiles and the steps inside them the other
way; the padding stays at the end.
Segment ids become the kernels' keep mask [B, 1, Lp] (time on lanes, as B and C; the
padding keeps), which multiplies the decay; without ids the kernels get no mask.
"""
import functools

import jax
import jax.numpy as jnp

from jaxmix.ops import residuals
from jaxmix.ops.per_device import tpu_kernel_interpret
from jaxmix.ops.scan_common import keep_mask
from kernels_pallas import selective_scan as kernel
from kernels_pallas import vmem

LANES = 128
MAX_BLOCK_D = 1536     # channel tile cap: 24 vregs of state per step at N = 16


def tiles(length, d, n=16, block_l=None, block_d=None, dtype=jnp.bfloat16):
    """(block_l, Lp, block_d, Dp): the time tile is 128 steps (or all of a short
    sequence, rounded up to 16 sublanes, bf16's tile); the channel tile is the widest
    multiple of 128 lanes up to MAX_BLOCK_D that divides the 128-padded D and keeps
    both kernels' VMEM footprints (kernels_pallas.selective_scan.fwd_vmem_bytes /
    bwd_vmem_bytes, from their BlockSpecs) within kernels_pallas.vmem.BUDGET."""
    if block_l is None:
        block_l = 128 if length > 128 else -(-length // 16) * 16
    lp = -(-length // block_l) * block_l
    dp = -(-d // LANES) * LANES
    if block_d is None:
        fits = [bd for bd in range(min(dp, MAX_BLOCK_D), 0, -LANES)
                if dp % bd == 0 and max(
                    kernel.fwd_vmem_bytes(n, block_l, bd, dtype=dtype, has_keep=True),
                    kernel.bwd_vmem_bytes(n, block_l, bd, dtype=dtype, has_keep=True))
                <= vmem.BUDGET]
        block_d = fits[0] if fits else LANES
    dp = -(-dp // block_d) * block_d
    return block_l, lp, block_d, dp


def make_core(kernel):
    """The custom_vjp over a scan kernel module's `scan_fwd` / `scan_bwd` (the TPU and
    GPU kernels share their signatures: the forward saves the chunk-start states, the
    backward returns per-channel-block partials of dB, dC (summed here over axis 1) and
    per-batch partials of dA, dD, dbias (over axis 0)). `keep` (the decay mask, or None)
    is passed through to both kernels and gets no gradient."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
    def core(u, delta, z, b, c, a, dskip, bias, h0, keep, static):
        y, h_last, _ = kernel.scan_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep,
                                       **dict(static))
        return y, h_last

    def core_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep, static):
        y, h_last, hs = kernel.scan_fwd(u, delta, z, b, c, a, dskip, bias, h0, keep,
                                        **dict(static))
        # What the kernel computed is tagged: a remat policy keeps it, not rerun it.
        y, h_last, hs = residuals.keep((y, h_last, hs))
        return (y, h_last), (u, delta, z, b, c, a, dskip, bias, hs, h0, keep)

    def core_bwd(static, res, cts):
        u, delta, z, b, c, a, dskip, bias, hs, h0, keep = res
        dy, dh_last = cts
        du, ddl, dz, db, dc, da, dD, dbias, dh0 = kernel.scan_bwd(
            u, delta, z, b, c, a, dskip, bias, hs, dy.astype(u.dtype), dh_last, keep,
            **dict(static))
        cast = lambda g, like: None if like is None else g.astype(like.dtype)
        return (cast(du, u), cast(ddl, delta), cast(dz, z), cast(jnp.sum(db, 1), b),
                cast(jnp.sum(dc, 1), c), cast(jnp.sum(da, 0), a),
                cast(jnp.sum(dD, 0), dskip), cast(jnp.sum(dbias, 0), bias), cast(dh0, h0),
                None)

    core.defvjp(core_fwd, core_bwd)
    return core


_core = make_core(kernel)


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, initial_state=None, return_last_state=False,
                          reverse=False, segment_ids=None, interpret=None, block_l=None,
                          block_d=None):
    bsz, length, d = u.shape
    n = A.shape[-1]
    block_l, lp, block_d, dp = tiles(length, d, n, block_l, block_d, u.dtype)
    interpret = tpu_kernel_interpret() if interpret is None else interpret
    pad_ld = lambda x: jnp.pad(x, ((0, 0), (0, lp - length), (0, dp - d)))
    pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])
    transpose_bl = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, lp - length)))
    f32 = jnp.float32
    dskip = pad_d((jnp.zeros((d,), f32) if D is None else D.astype(f32))[None])
    bias = pad_d((jnp.zeros((d,), f32) if delta_bias is None else delta_bias.astype(f32))[None])
    h0 = (jnp.zeros((bsz, n, dp), f32) if initial_state is None
          else pad_d(jnp.swapaxes(initial_state.astype(f32), 1, 2)))
    keep = keep_mask(segment_ids, reverse)
    if keep is not None:      # [B, 1, Lp], time on lanes; padded steps keep
        keep = jnp.pad(keep, ((0, 0), (0, lp - length)), constant_values=1.0)[:, None]
    static = (("length", length), ("softplus", bool(delta_softplus)), ("block_l", block_l),
              ("block_d", block_d), ("interpret", interpret), ("reverse", bool(reverse)))
    y, h_last = _core(pad_ld(u), pad_ld(delta), None if z is None else pad_ld(z),
                      transpose_bl(B), transpose_bl(C), pad_d(A.astype(f32).T), dskip, bias,
                      h0, keep, static)
    y = y[:, :length, :d]
    if return_last_state:
        return y, jnp.swapaxes(h_last[:, :, :d], 1, 2)
    return y
