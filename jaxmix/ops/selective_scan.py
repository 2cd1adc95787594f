"""Mamba-1 selective scan: public entry point and the plain-jnp reference.

Maths as mamba_ssm's `selective_scan_ref`, channels-last layout:
  delta = softplus(delta + delta_bias)            (each optional)
  h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
  y_t   = C_t . h_t + D * u_t,   y = y * silu(z)
Shapes: u, delta, z [B, L, D]; A [D, N]; B, C [B, L, N]; state [B, D, N].
reverse=True runs the recurrence from the last step to the first,
  h_t = exp(delta_t * A) * h_{t+1} + delta_t * B_t * u_t,
with `initial_state` entering after step L-1 and the returned last state the one
after step 0: exactly flip(scan(flip(inputs))) along time, done natively by every
implementation (no flipped copies).
Packed documents: `segment_ids` [B, L] (ints) reset the state where a new segment
starts, h_{t-1} taken as 0 at every t > 0 with seg[t] != seg[t-1] (reverse: h_{t+1}
at every t < L-1 with seg[t] != seg[t+1]); `initial_state` still enters at the first
scanned step. Every implementation takes the ids as a fp32 keep mask aligned with
the scan (`keep_mask`: 1 carry, 0 reset) multiplying the decay, a_t = keep_t
exp(delta_t A); without ids nothing changes (no extra kernel inputs).
Everything is computed in fp32 and the output is cast back to u's dtype.
"""
import jax
import jax.numpy as jnp

from jaxmix.ops import _impl, per_device
from jaxmix.ops.scan_common import (  # noqa: F401  (softplus_f32 re-exported)
    check_shapes, finish_output, keep_mask, prepare_delta, softplus_f32)


def selective_state_update(state_BDN, u_BD, delta_BD, A, B_BN, C_BN, D=None, z_BD=None,
                           delta_bias=None, delta_softplus=False):
    """One time step of the scan (decoding): (y [B, D] in u's dtype, new state [B, D, N]
    fp32). Plain jnp whatever the backend: a kernel launch padded to a tile for a single
    step would cost far more than these few elementwise ops."""
    dl_BD = prepare_delta(delta_BD, delta_bias, delta_softplus, softplus=jax.nn.softplus)
    h_BDN = (jnp.exp(dl_BD[..., None] * A.astype(jnp.float32)) * state_BDN.astype(jnp.float32)
             + (dl_BD * u_BD.astype(jnp.float32))[..., None]
             * B_BN.astype(jnp.float32)[:, None, :])
    y_BD = jnp.einsum("bdn,bn->bd", h_BDN, C_BN.astype(jnp.float32))
    return finish_output(y_BD, u_BD, D, z_BD), h_BDN


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, initial_state=None,
                             return_last_state=False, reverse=False, segment_ids=None):
    """The oracle: a lax.scan over time (backwards when `reverse`) holding the full
    [B, L, D, N] terms."""
    delta_BLD = prepare_delta(delta, delta_bias, delta_softplus, softplus=jax.nn.softplus)
    u_BLD = u.astype(jnp.float32)
    A_DN = A.astype(jnp.float32)
    dA_BLDN = jnp.exp(delta_BLD[..., None] * A_DN)
    keep_BL = keep_mask(segment_ids, reverse)
    if keep_BL is not None:
        dA_BLDN = dA_BLDN * keep_BL[:, :, None, None]
    dBu_BLDN = (delta_BLD * u_BLD)[..., None] * B.astype(jnp.float32)[:, :, None, :]
    bsz, _, d = u.shape
    h0_BDN = (jnp.zeros((bsz, d, A.shape[-1]), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))

    def step(h_BDN, xs):
        dA, dBu, c_BN = xs
        h_BDN = dA * h_BDN + dBu
        return h_BDN, jnp.einsum("bdn,bn->bd", h_BDN, c_BN)

    xs = (jnp.moveaxis(dA_BLDN, 1, 0), jnp.moveaxis(dBu_BLDN, 1, 0),
          jnp.moveaxis(C.astype(jnp.float32), 1, 0))
    h_BDN, y_LBD = jax.lax.scan(step, h0_BDN, xs, reverse=reverse)
    out = finish_output(jnp.moveaxis(y_LBD, 0, 1), u, D, z)
    return (out, h_BDN) if return_last_state else out


def _pallas_fn():
    """The Pallas scan for the default backend: the Triton kernel on GPU, the Mosaic
    kernel elsewhere (TPU interpret mode off TPU)."""
    if jax.default_backend() == "gpu":
        from jaxmix.ops.scan_pallas_gpu import selective_scan_pallas_gpu
        return selective_scan_pallas_gpu
    from jaxmix.ops.scan_pallas import selective_scan_pallas
    return selective_scan_pallas


def selective_scan_per_device(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, initial_state=None,
                              return_last_state=False, reverse=False, segment_ids=None,
                              fn=None):
    """The Pallas scan run by every device on its shard (`per_device.per_device`):
    batch over the mesh axes of the logical name "batch", channels over those of
    "mlp" (the Mamba mixer's names for these dims); time is never split here (the
    sequence-parallel scan splits it around this call)."""
    fn = _pallas_fn() if fn is None else fn
    b_ax = per_device.mesh_axes("batch", u.shape[0])
    d_ax = per_device.mesh_axes("mlp", u.shape[2])
    s = per_device.spec
    bld, dn, d_, bdn = s(b_ax, (), d_ax), s(d_ax, ()), s(d_ax), s(b_ax, d_ax, ())
    bln = s(b_ax)
    opt = lambda x, sp: None if x is None else sp

    def body(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids):
        return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                  delta_softplus=delta_softplus, initial_state=initial_state,
                  return_last_state=return_last_state, reverse=reverse,
                  segment_ids=segment_ids)

    in_specs = (bld, bld, dn, bln, bln, opt(D, d_), opt(z, bld), opt(delta_bias, d_),
                opt(initial_state, bdn), opt(segment_ids, bln))
    out_specs = (bld, bdn) if return_last_state else bld
    return per_device.per_device(body, in_specs, out_specs)(
        u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)


def resolve_impl(impl):
    """The implementation `selective_scan(impl=impl)` runs on the default backend
    ("auto": the Pallas kernels on TPU and GPU, the chunked xla path on CPU)."""
    return _impl.resolve(impl, "selective_scan", gpu="pallas")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, initial_state=None, return_last_state=False,
                   impl="auto", reverse=False, segment_ids=None):
    """Selective scan (see module docstring). Returns y [B, L, D] (and h [B, D, N]);
    reverse=True scans from the last step to the first; segment_ids [B, L] reset the
    state at segment boundaries.

    impl="pallas" runs the kernel per device under a mesh (see `per_device`)."""
    check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
    impl = resolve_impl(impl)
    if impl == "reference":
        fn = selective_scan_reference
    elif impl == "xla":
        from jaxmix.ops.scan_xla import selective_scan_xla as fn
    else:
        fn = selective_scan_per_device
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
              delta_softplus=delta_softplus, initial_state=initial_state,
              return_last_state=return_last_state, reverse=reverse,
              segment_ids=segment_ids)
