"""Sequence-parallel gated delta rule: the state crosses devices as composed affine maps.

A device's stretch of the sequence maps a state S arriving at its start to
P S + Q at its end (`ops.gated_delta.gated_delta_rule_map`; P [B, H, d_k, d_k], Q the
end state from zeros). Unlike the diagonal decay of the Mamba scan, P is a full
matrix, so the sequence-parallel form is:
  1. every device computes its (P_i, Q_i) from its own tokens (in parallel);
  2. the pairs are all-gathered ([B, H, d_k, d_k + d_v] per device) and each device
     folds the ones to its left onto the initial state: its incoming state;
  3. every device runs the chunked op on its tokens from that state.
Device i's result needs only the maps of the devices before it, so the work is about
twice a one-device op on L/N tokens plus one small all-gather, against N rounds of
the local op when states are passed device to device (`method="pass"`, kept for the
benchmark in benchmarks/bench_gated_delta.py). Segment ids: a segment that starts at a
device's first token drops the incoming state (the left neighbour's last id comes by
one ppermute). Gradients flow through the all-gather and both local passes.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxmix.ops import gated_delta as gd
from jaxmix.ops.vma import match_vma, vma
from jaxmix.parallel.zigzag import mesh_axis_size


def _to_right(x, axis_name):
    """x from the left neighbour (device i gets device i - 1's; zeros on device 0)."""
    n = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(i, i + 1) for i in range(n - 1)])


def _left_reset(segment_ids, axis_name):
    """[B] bool: this shard's first token starts a new segment (its id differs from the
    left neighbour's last one); False on device 0 and without ids."""
    if segment_ids is None:
        return None
    left = _to_right(segment_ids[:, -1], axis_name)
    return (lax.axis_index(axis_name) > 0) & (segment_ids[:, 0] != left)


def _apply(P_, Q_, S):
    return jnp.einsum("bhkj,bhjv->bhkv", P_, S, precision=gd.HIGHEST) + Q_


def gated_delta_rule_shard(q, k, v, g, beta, *, initial_state=None, segment_ids=None,
                           normalize_qk=True, scale=None, chunk_size=64,
                           axis_name="sequence", method="compose"):
    """`ops.gated_delta_rule` of the whole sequence, called on this device's contiguous
    shard ([B, L/N, ...]); initial_state [B, H, d_k, d_v] is replicated. Returns (this
    shard's outputs, the global final state, the same on every device)."""
    kw = dict(normalize_qk=normalize_qk, scale=scale, chunk_size=chunk_size)
    s0 = gd.start_state(q, v, initial_state)
    reset = _left_reset(segment_ids, axis_name)
    n, me = lax.axis_size(axis_name), lax.axis_index(axis_name)

    def run(state):
        if reset is not None:
            state = jnp.where(reset[:, None, None, None], 0.0, state)
        return gd.gated_delta_rule_xla(q, k, v, g, beta, initial_state=state,
                                       segment_ids=segment_ids, **kw)

    if method == "pass":  # N rounds: each device's end state goes to its right
        state = match_vma(s0, q, k, v)
        for _ in range(n - 1):
            _, end = run(state)
            state = jnp.where(me == 0, s0, _to_right(end, axis_name))
        o, end = run(state)
        final = lax.psum(jnp.where(me == n - 1, end, 0.0), axis_name)
        return o, final
    P_, Q_ = gd.gated_delta_rule_map(q, k, v, g, beta, segment_ids=segment_ids, **kw)
    if reset is not None:  # a segment starting here ignores what comes in
        P_ = jnp.where(reset[:, None, None, None], 0.0, P_)
    to = "invarying" if axis_name in vma(P_) else "varying"
    P_all = lax.all_gather(P_, axis_name, to=to)
    Q_all = lax.all_gather(Q_, axis_name, to=to)
    states = [s0]  # states[j]: the state arriving at device j
    for j in range(n):
        states.append(_apply(P_all[j], Q_all[j], states[-1]))
    incoming = jnp.stack(states[:n])[me]
    o, _ = run(match_vma(incoming, q, k, v))
    return o, states[n]


def sequence_parallel_gated_delta_rule(q, k, v, g, beta, *, initial_state=None,
                                       segment_ids=None, normalize_qk=True, scale=None,
                                       chunk_size=64, impl="auto", axis_name="sequence",
                                       method="compose"):
    """`ops.gated_delta_rule` on global arrays, sequence-parallel over the ambient mesh's
    `axis_name` when it is > 1 (only that axis goes manual; batch and heads keep their
    automatic sharding; every shard runs the chunked xla form); otherwise exactly the
    one-device op with `impl`."""
    n = mesh_axis_size(axis_name)
    kw = dict(normalize_qk=normalize_qk, scale=scale, chunk_size=chunk_size)
    if n == 1:
        return gd.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                   segment_ids=segment_ids, impl=impl, **kw)
    gd._check(q, k, v, g, beta, initial_state, segment_ids)
    if q.shape[1] % n:
        raise ValueError(f"sequence_parallel_gated_delta_rule: length {q.shape[1]} must be "
                         f"a multiple of mesh.{axis_name}={n}; change train.seq_len")
    seq, rep = P(None, axis_name), P()
    sharded = dict(q=q, k=k, v=v, g=g, beta=beta)
    if segment_ids is not None:
        sharded["segment_ids"] = jnp.asarray(segment_ids)
    replicated = {} if initial_state is None else {"initial_state": initial_state}

    def body(sharded, replicated):
        return gated_delta_rule_shard(**sharded, **replicated, axis_name=axis_name,
                                      method=method, **kw)

    fn = jax.shard_map(body, in_specs=(seq, rep), out_specs=(seq, rep),
                       axis_names={axis_name})
    return fn(sharded, replicated)
