"""The gated delta rule's chunkwise-parallel form (`gated_delta_rule_xla`, the
"xla" implementation of jaxmix.ops.gated_delta, whose docstring gives the maths) and
the sequence's affine map on the state (`gated_delta_rule_map`) that
sequence-parallel runs compose across devices."""
import jax
import jax.numpy as jnp

from jaxmix.ops.gated_delta_common import einsum_f32, prepare_inputs, run_ids, start_state
from jaxmix.ops.vma import match_vma
from kernels_pallas.gated_delta import unit_lower_inverse


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
    A = jnp.where(strict, beta[..., :, None] * einsum_f32("bhtd,bhid->bhti", k, k) * D, 0.0)
    inv = unit_lower_inverse(A)
    u0 = einsum_f32("bhti,bhiv->bhtv", inv, beta[..., None] * v)
    w = einsum_f32("bhti,bhik->bhtk", inv, (beta * decay0)[..., None] * k)
    return D, decay0, u0, w


def _chunk_end(state, k, D, decay0, u):
    """The state after the chunk: exp(G_C) S0 + (K * exp(G_C - G))^T U."""
    to_end = D[..., -1, :]                                            # exp(G_C - G_i)
    return (decay0[..., -1][..., None, None] * state
            + einsum_f32("bhck,bhcv->bhkv", k * to_end[..., None], u))


def _chunk_step(state, xs):
    """One chunk: (state [B, H, K, V], xs of `_chunk_terms`) -> (end state, outputs
    [B, H, C, V])."""
    q, k = xs[:2]
    D, decay0, u0, w = _chunk_terms(xs)
    u = u0 - einsum_f32("bhck,bhkv->bhcv", w, state)
    o = (decay0[..., None] * einsum_f32("bhck,bhkv->bhcv", q, state)
         + einsum_f32("bhti,bhiv->bhtv", einsum_f32("bhtd,bhid->bhti", q, k) * D, u))
    return _chunk_end(state, k, D, decay0, u), o


def _chunk_map(carry, xs):
    """Composes the chunk's affine map S -> P_c S + Q_c onto carry (P [B, H, K, K],
    Q [B, H, K, V]): the end state is linear in the start state."""
    P, Q = carry
    k = xs[1]
    D, decay0, u0, w = _chunk_terms(xs)
    P = _chunk_end(P, k, D, decay0, -einsum_f32("bhck,bhkj->bhcj", w, P))
    Q = _chunk_end(Q, k, D, decay0, u0 - einsum_f32("bhck,bhkv->bhcv", w, Q))
    return (P, Q), None


def _chunked(q, k, v, g, beta, segment_ids, normalize_qk, scale, chunk_size):
    """The per-chunk inputs [n, B, H, C, ...] of the chunked form (zero padded at the
    end: beta = 0 and g = 0 leave the state as it is)."""
    b, length, h, d_k = q.shape
    q32, k32, v32, g32, b32 = prepare_inputs(q, k, v, g, beta, normalize_qk, scale)
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
