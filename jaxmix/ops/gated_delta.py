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
  xla        the chunkwise-parallel form. With G the cumulative log decay inside a chunk
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
from jaxmix.ops.vma import match_vma
from kernels_pallas.gated_delta import unit_lower_inverse

HIGHEST = jax.lax.Precision.HIGHEST
NORM_EPS = 1e-6


def _einsum(spec, *args):
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


def _prepare(q, k, v, g, beta, normalize_qk, scale):
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
    q32, k32, v32, g32, b32 = _prepare(q, k, v, g, beta, normalize_qk, scale)
    runs = run_ids(segment_ids, b, length)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    s0 = start_state(q, v, initial_state)

    def step(state, xs):
        q_t, k_t, v_t, g_t, b_t, reset_t = xs  # [B, H, d], [B, H], [B]
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        state = state * jnp.exp(g_t)[..., None, None]
        v_new = b_t[..., None] * (v_t - _einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t[..., :, None] * v_new[..., None, :]
        return state, _einsum("bhkv,bhk->bhv", state, q_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q32, k32, v32, g32, b32, reset))
    state, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), state


def _chunk_terms(xs):
    """The state-free terms of one chunk (module docstring): D [B, H, C, C], the decay
    from the chunk start decay0 [B, H, C], and U = u0 - w S0 as (u0 [B, H, C, V],
    w [B, H, C, K]). xs: q, k [B, H, C, K], v [B, H, C, V], g, beta [B, H, C],
    runs [B, C] and the run of the token before the chunk [B]."""
    q, k, v, g, beta, runs, run_before = xs
    c = q.shape[2]
    G = jnp.cumsum(g, axis=-1)
    same = runs[:, :, None] == runs[:, None, :]                       # [B, C, C]
    causal = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    live = (same & causal)[:, None]                                   # [B, 1, C, C]
    diff = G[..., :, None] - G[..., None, :]
    D = jnp.where(live, jnp.exp(jnp.where(live, diff, 0.0)), 0.0)     # [B, H, C, C]
    from_start = (runs == run_before[:, None])[:, None]               # [B, 1, C]
    decay0 = jnp.where(from_start, jnp.exp(G), 0.0)                   # [B, H, C]
    strict = live & ~jnp.eye(c, dtype=bool)
    A = jnp.where(strict, beta[..., :, None] * _einsum("bhtd,bhid->bhti", k, k) * D, 0.0)
    inv = unit_lower_inverse(A)
    u0 = _einsum("bhti,bhiv->bhtv", inv, beta[..., None] * v)
    w = _einsum("bhti,bhik->bhtk", inv, (beta * decay0)[..., None] * k)
    return D, decay0, u0, w


def _chunk_end(state, k, D, decay0, u):
    """The state after the chunk: exp(G_C) S0 + (K * exp(G_C - G))^T U."""
    to_end = D[..., -1, :]                                            # exp(G_C - G_i)
    return (decay0[..., -1][..., None, None] * state
            + _einsum("bhck,bhcv->bhkv", k * to_end[..., None], u))


def _chunk_step(state, xs):
    """One chunk: (state [B, H, K, V], xs of `_chunk_terms`) -> (end state, outputs
    [B, H, C, V])."""
    q, k = xs[:2]
    D, decay0, u0, w = _chunk_terms(xs)
    u = u0 - _einsum("bhck,bhkv->bhcv", w, state)
    o = (decay0[..., None] * _einsum("bhck,bhkv->bhcv", q, state)
         + _einsum("bhti,bhiv->bhtv", _einsum("bhtd,bhid->bhti", q, k) * D, u))
    return _chunk_end(state, k, D, decay0, u), o


def _chunk_map(carry, xs):
    """Composes the chunk's affine map S -> P_c S + Q_c onto carry (P [B, H, K, K],
    Q [B, H, K, V]): the end state is linear in the start state."""
    P, Q = carry
    k = xs[1]
    D, decay0, u0, w = _chunk_terms(xs)
    P = _chunk_end(P, k, D, decay0, -_einsum("bhck,bhkj->bhcj", w, P))
    Q = _chunk_end(Q, k, D, decay0, u0 - _einsum("bhck,bhkv->bhcv", w, Q))
    return (P, Q), None


def _chunked(q, k, v, g, beta, segment_ids, normalize_qk, scale, chunk_size):
    """The per-chunk inputs [n, B, H, C, ...] of the chunked form (zero padded at the
    end: beta = 0 and g = 0 leave the state as it is)."""
    b, length, h, d_k = q.shape
    q32, k32, v32, g32, b32 = _prepare(q, k, v, g, beta, normalize_qk, scale)
    runs = run_ids(segment_ids, b, length)
    c = max(1, min(int(chunk_size), length))
    n = -(-length // c)
    pad = n * c - length

    def chunks(x):  # [B, L, H, ...] -> [n, B, H, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    runs = jnp.pad(runs, [(0, 0), (0, pad)], mode="edge")
    runs_n = jnp.moveaxis(runs.reshape(b, n, c), 1, 0)                # [n, B, C]
    before = jnp.concatenate([runs[:, :1], runs[:, c - 1:-1:c]], axis=1)[:, :n]
    return (chunks(q32), chunks(k32), chunks(v32), chunks(g32), chunks(b32), runs_n,
            jnp.moveaxis(before, 1, 0))


def gated_delta_rule_xla(q, k, v, g, beta, *, initial_state=None, segment_ids=None,
                         normalize_qk=True, scale=None, chunk_size=64):
    """The chunkwise-parallel form (module docstring); same results as the reference."""
    b, length, h, _ = q.shape
    d_v = v.shape[-1]
    xs = _chunked(q, k, v, g, beta, segment_ids, normalize_qk, scale, chunk_size)
    # Inside a shard_map the carry varies like the data.
    s0 = match_vma(start_state(q, v, initial_state), xs)
    state, o = jax.lax.scan(jax.checkpoint(_chunk_step), s0, xs)      # o [n, B, H, C, V]
    o = jnp.moveaxis(o, 0, 1)                                         # [B, n, H, C, V]
    o = jnp.moveaxis(o, 3, 2).reshape(b, -1, h, d_v)[:, :length]
    return o.astype(q.dtype), state


def gated_delta_rule_map(q, k, v, g, beta, *, segment_ids=None, normalize_qk=True,
                         scale=None, chunk_size=64):
    """(P [B, H, d_k, d_k], Q [B, H, d_k, d_v]), the sequence's effect on a state: from
    an initial state S0 it ends at P @ S0 + Q (per batch row and head), so Q is the
    final state from zeros. Sequence-parallel runs compose these maps across devices."""
    b, _, h, d_k = q.shape
    xs = _chunked(q, k, v, g, beta, segment_ids, normalize_qk, scale, chunk_size)
    eye = jnp.broadcast_to(jnp.eye(d_k, dtype=jnp.float32), (b, h, d_k, d_k))
    zero = start_state(q, v, None)
    carry = match_vma((eye, zero), xs)
    (P, Q), _ = jax.lax.scan(jax.checkpoint(_chunk_map), carry, xs)
    return P, Q


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
