"""The gated delta rule (Gated DeltaNet's memory update), per head:

  S <- S * exp(g_t)                    decay (g_t <= 0, log space)
  v' = beta_t * (v_t - S^T k_t)        the delta correction, against the decayed state
  S <- S + k_t v'^T                    S [d_k, d_v]
  o_t = S^T q_t

Shapes: q, k [B, L, H, d_k], v [B, L, H, d_v] (the layout of ops.attention), g and beta
[B, L, H], states [B, H, d_k, d_v]. q and k are L2-normalised over d_k unless
`normalize_qk=False`; q is scaled by d_k^-1/2 unless `scale` is given. Segment ids
[B, L] reset the state where the id changes (the initial state belongs to the first
segment). All maths in fp32; the output has q's dtype, the final state is fp32.

Implementations:
  reference  the token-by-token recurrence (the oracle).
  pallas     the chunked forward below as a Pallas TPU kernel (jaxmix.ops.gated_delta_pallas).
  xla        the chunkwise-parallel form (jaxmix.ops.gated_delta_xla). With G the cumulative log decay inside a chunk
             of C tokens, D[t, i] = exp(G_t - G_i) for i <= t in one segment, and
             A[t, i] = beta_t D[t, i] k_t.k_i for i < t, the chunk's corrected values are
             U = (I + A)^-1 (beta V - beta exp(G) K S0) (the WY form of the chunk's
             Householder products; the inverse by `unit_lower_inverse`), its outputs
             O = exp(G) Q S0 + (Q K^T * D) U and its end state
             S_C = exp(G_C) S0 + (K * exp(G_C - G))^T U. Chunks run in a lax.scan whose
             step is rematerialised, so the backward pass keeps only the states at
             chunk boundaries ([B, H, d_k, d_v] per chunk), never one per token.
"""
import jax
import jax.numpy as jnp

from jaxmix.errors import ConfigError
from jaxmix.ops import _impl
from jaxmix.ops.gated_delta_common import (  # noqa: F401  (HIGHEST re-exported)
    HIGHEST, einsum_f32, prepare_inputs, run_ids, start_state)
from jaxmix.ops.gated_delta_xla import (  # noqa: F401  (gated_delta_rule_map re-exported)
    gated_delta_rule_map, gated_delta_rule_xla)


def _check(q, k, v, g, beta, initial_state, segment_ids):
    b, length, h, d_k = q.shape
    if k.shape != q.shape or v.shape[:3] != (b, length, h):
        raise ConfigError(f"gated_delta_rule: q {q.shape}, k {k.shape}, v {v.shape}: want "
                          f"q and k [B, L, H, d_k] and v [B, L, H, d_v]")
    if g.shape != (b, length, h) or beta.shape != (b, length, h):
        raise ConfigError(f"gated_delta_rule: g {g.shape} and beta {beta.shape} must be "
                          f"[B, L, H] = {(b, length, h)}")
    want = (b, h, d_k, v.shape[-1])
    if initial_state is not None and initial_state.shape != want:
        raise ConfigError(f"gated_delta_rule: initial_state {initial_state.shape}, want {want}")
    if segment_ids is not None and jnp.shape(segment_ids) != (b, length):
        raise ConfigError(f"gated_delta_rule: segment_ids {jnp.shape(segment_ids)}, "
                          f"want {(b, length)}")


def gated_delta_rule_reference(q, k, v, g, beta, *, initial_state=None, segment_ids=None,
                               normalize_qk=True, scale=None):
    """(o [B, L, H, d_v], final state [B, H, d_k, d_v]) by the plain recurrence."""
    b, length = q.shape[:2]
    q32, k32, v32, g32, b32 = prepare_inputs(q, k, v, g, beta, normalize_qk, scale)
    runs = run_ids(segment_ids, b, length)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    s0 = start_state(q, v, initial_state)

    def step(state, xs):
        q_t, k_t, v_t, g_t, b_t, reset_t = xs  # [B, H, d], [B, H], [B]
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        state = state * jnp.exp(g_t)[..., None, None]
        v_new = b_t[..., None] * (v_t - einsum_f32("bhkv,bhk->bhv", state, k_t))
        state = state + k_t[..., :, None] * v_new[..., None, :]
        return state, einsum_f32("bhkv,bhk->bhv", state, q_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q32, k32, v32, g32, b32, reset))
    state, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), state


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None,
                     normalize_qk=True, scale=None, impl="auto", chunk_size=64):
    """(o [B, L, H, d_v], final state [B, H, d_k, d_v] fp32): see the module docstring.
    impl: reference | xla | pallas (the chunked forward as a TPU kernel, interpreted off
    TPU; chunk_size a multiple of 8) | auto (the chunked xla form on every backend)."""
    _check(q, k, v, g, beta, initial_state, segment_ids)
    impl = "xla" if impl == "auto" else _impl.resolve(impl, "gated_delta_rule")
    kw = dict(initial_state=initial_state, segment_ids=segment_ids,
              normalize_qk=normalize_qk, scale=scale)
    if impl == "reference":
        return gated_delta_rule_reference(q, k, v, g, beta, **kw)
    if impl == "pallas":
        from jaxmix.ops.gated_delta_pallas import gated_delta_rule_pallas
        return gated_delta_rule_pallas(q, k, v, g, beta, chunk_size=chunk_size, **kw)
    return gated_delta_rule_xla(q, k, v, g, beta, chunk_size=chunk_size, **kw)
