"""KV caches as ring buffers with fixed sink slots.

A cache of N slots keeps token positions 0..sink-1 in slots 0..sink-1 for good and
every later position p in slot sink + (p - sink) % (N - sink), so it always holds the
sink tokens and the N - sink latest ones:
  - full attention: N = the longest sequence (sink 0); the ring never wraps, and a
    write past the end is an overflow (`overflowed`), not a silent clamp;
  - sliding window W with S sink keys: N = S + W, constant memory however long the
    sequence (a query sees exactly the tokens the mask allows);
  - DuoAttention streaming heads: N = sink + recent.
The slots' positions are a function of the number of tokens written so far (the
cache's "index"), so the cache stores no position array: `slot_positions` recomputes
them (EMPTY, far in the future, for slots not yet written, so causal masks drop them).
"""
import jax.numpy as jnp

EMPTY = 2 ** 30  # the position of a slot that holds no token yet


def slot_of(pos, n_slots, sink):
    """The slot of token position `pos` (int32 array)."""
    return jnp.where(pos < sink, pos, sink + (pos - sink) % (n_slots - sink))


def slot_positions(index, n_slots, sink):
    """int32 [N]: the token position each slot holds after `index` tokens were
    written (EMPTY where none)."""
    s = jnp.arange(n_slots, dtype=jnp.int32)
    last = jnp.asarray(index, jnp.int32) - 1
    ring = n_slots - sink
    pos = last - (last - s) % ring  # the latest position <= last that maps to slot s
    pos = jnp.where(s < sink, s, pos)
    return jnp.where((pos >= 0) & (pos <= last) & ((s < sink) | (pos >= sink)), pos, EMPTY)


def write(k_BNKD, v_BNKD, k_BLKD, v_BLKD, index, sink):
    """The cache's k, v with L new tokens (positions index..index+L-1) written into
    their slots. Of the new tokens only those the cache keeps are written (the sink
    ones and the latest N - sink), so no two writes hit one slot."""
    n_slots, length = k_BNKD.shape[1], k_BLKD.shape[1]
    pos = jnp.asarray(index, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    keep = (pos < sink) | (pos > pos[-1] - (n_slots - sink))
    slot = jnp.where(keep, slot_of(pos, n_slots, sink), n_slots)  # n_slots: dropped
    k = k_BNKD.at[:, slot].set(k_BLKD.astype(k_BNKD.dtype), mode="drop")
    v = v_BNKD.at[:, slot].set(v_BLKD.astype(v_BNKD.dtype), mode="drop")
    return k, v


def overflowed(index, length, n_slots):
    """Whether writing `length` tokens at `index` passes the end of a cache that must
    not wrap (full attention)."""
    return jnp.asarray(index, jnp.int32) + length > n_slots


def batch_positions(pos_N, batch):
    return jnp.broadcast_to(pos_N, (batch,) + pos_N.shape)


def poison(o, bad):
    """`o` replaced by NaN where `bad`: a full cache that overflowed inside jit (where no
    error can be raised) gives NaN logits instead of quietly wrong ones."""
    return jnp.where(bad, jnp.asarray(jnp.nan, o.dtype), o)

