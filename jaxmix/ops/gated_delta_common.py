"""Helpers the gated delta rule's implementations share, below the dispatcher
(jaxmix.ops.gated_delta) and the implementations (gated_delta_xla,
gated_delta_pallas): fp32 einsums, q/k normalisation and scaling, segment run
indices and the starting state."""
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
NORM_EPS = 1e-6


def einsum_f32(spec, *args):
    """jnp.einsum at HIGHEST precision with fp32 results."""
    return jnp.einsum(spec, *args, precision=HIGHEST, preferred_element_type=jnp.float32)


def l2_normalise(x):
    """x / ||x|| over the last axis (rsqrt of the sum of squares plus 1e-6), fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + NORM_EPS)


def run_ids(segment_ids, batch, length):
    """[B, L] int32: the index of each token's run of equal segment ids (0 without ids),
    so a reset is exactly where the run index changes."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    seg = jnp.asarray(segment_ids)
    change = jnp.concatenate([jnp.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jnp.cumsum(change, axis=1, dtype=jnp.int32)


def prepare_inputs(q, k, v, g, beta, normalize_qk, scale):
    """fp32 (q, k, v, g, beta): q and k L2-normalised when `normalize_qk`, q scaled
    by `scale` (d_k^-1/2 when None)."""
    d_k = q.shape[-1]
    q32, k32 = (l2_normalise(q), l2_normalise(k)) if normalize_qk else (
        q.astype(jnp.float32), k.astype(jnp.float32))
    scale = d_k ** -0.5 if scale is None else float(scale)
    return (q32 * scale, k32, v.astype(jnp.float32), g.astype(jnp.float32),
            beta.astype(jnp.float32))


def start_state(q, v, initial_state):
    """The fp32 state [B, H, d_k, d_v] the recurrence starts from: `initial_state`, or
    zeros when it is None."""
    b, _, h, d_k = q.shape
    if initial_state is None:
        return jnp.zeros((b, h, d_k, v.shape[-1]), jnp.float32)
    return initial_state.astype(jnp.float32)
