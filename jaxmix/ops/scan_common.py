"""Helpers every selective-scan implementation shares, below the dispatcher
(jaxmix.ops.selective_scan) and the implementations (scan_xla, scan_pallas,
scan_pallas_gpu): delta's bias and softplus, the D skip and silu(z) gate, the
segment-id keep mask and the shape check."""
import jax
import jax.numpy as jnp

from jaxmix import cpu


# log1p(e) / e on [0, 1]: degree 8, fitted to the relative error (max 3e-8; 2e-7 with
# fp32 rounding, the same as log1p itself). p(0) = 1 to fp32 precision.
_LOG1P_COEFFS = (0.99999994, -0.49999493, 0.33319098, -0.24842979, 0.19105993,
                 -0.13663214, 0.07822556, -0.029504986, 0.0052326294)
# sigmoid = -expm1(-y) for y < _SERIES_BELOW from its Taylor series (degree 5: truncation
# below 5e-8 relative), above it 1 - exp(-y) loses at most 3 bits to cancellation.
_SERIES_BELOW = 0.125


def _log1p_unit(e):
    """log1p(e) for e in [0, 1] in fp32 (a polynomial: XLA:CPU's log1p is 4x slower)."""
    p = _LOG1P_COEFFS[-1]
    for c in _LOG1P_COEFFS[-2::-1]:
        p = p * e + c
    return e * p


def _one_minus_exp_neg(y):
    """1 - exp(-y) for y >= 0 without expm1 (slow in XLA:CPU) or cancellation near 0."""
    series = y * (1 - y * (1 / 2 - y * (1 / 6 - y * (1 / 24 - y * (1 / 120)))))
    return jnp.where(y < _SERIES_BELOW, series, 1 - jnp.exp(-y))


@jax.custom_vjp
def softplus_f32(x):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)), whose backward needs only the output:
    softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)). One exp and a polynomial forward,
    one exp backward, nothing but the output kept; relative error within 2.5e-7 of the
    exact value, like jax.nn.softplus, which costs about 5x as much on CPU."""
    return jnp.maximum(x, 0.0) + _log1p_unit(jnp.exp(-jnp.abs(x)))


def _softplus_fwd(x):
    y = softplus_f32(x)
    return y, y


def _softplus_bwd(y, g):
    return (g * _one_minus_exp_neg(y),)


softplus_f32.defvjp(_softplus_fwd, _softplus_bwd)


def prepare_delta(delta_BLD, delta_bias_D, delta_softplus, softplus=None):
    """delta in fp32 after the optional bias and softplus (by default `softplus_f32` on
    the CPU backend, where it was measured faster, and jax.nn.softplus elsewhere)."""
    if softplus is None:
        softplus = softplus_f32 if cpu.on_cpu() else jax.nn.softplus
    delta_BLD = delta_BLD.astype(jnp.float32)
    if delta_bias_D is not None:
        delta_BLD = delta_BLD + delta_bias_D.astype(jnp.float32)
    if delta_softplus:
        delta_BLD = softplus(delta_BLD)
    return delta_BLD


def finish_output(y_BLD, u_BLD, D_D, z_BLD):
    """Adds the D skip and the silu(z) gate (fp32), casts to u's dtype."""
    if D_D is not None:
        y_BLD = y_BLD + u_BLD.astype(jnp.float32) * D_D.astype(jnp.float32)
    if z_BLD is not None:
        y_BLD = y_BLD * jax.nn.silu(z_BLD.astype(jnp.float32))
    return y_BLD.astype(u_BLD.dtype)


def keep_mask(segment_ids_BL, reverse=False):
    """fp32 [B, L] (or None without ids): 0 where the scan resets its state before
    step t (a new segment starts at t, or with `reverse` ends at t), 1 elsewhere; the
    first scanned step always keeps (the initial state enters there)."""
    if segment_ids_BL is None:
        return None
    seg = jnp.asarray(segment_ids_BL)
    same_BL = seg[:, 1:] == seg[:, :-1]
    one_B1 = jnp.ones((seg.shape[0], 1), bool)
    parts = (same_BL, one_B1) if reverse else (one_B1, same_BL)
    return jnp.concatenate(parts, axis=1).astype(jnp.float32)


def check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids=None):
    b, l, d = u.shape
    n = A.shape[-1]
    want = {"delta": (delta, (b, l, d)), "A": (A, (d, n)), "B": (B, (b, l, n)),
            "C": (C, (b, l, n)), "D": (D, (d,)), "z": (z, (b, l, d)),
            "delta_bias": (delta_bias, (d,)), "initial_state": (initial_state, (b, d, n)),
            "segment_ids": (segment_ids, (b, l))}
    for name, (arr, shape) in want.items():
        if arr is not None and tuple(arr.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(arr.shape)}, "
                             f"expected {shape} for u {tuple(u.shape)} and A {tuple(A.shape)}")
