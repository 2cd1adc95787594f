"""Sequence layouts for ring attention: contiguous and zigzag (load-balanced causal).

With N devices on the sequence axis the sequence is cut into 2N equal chunks.
`contiguous`: device i holds chunks 2i and 2i+1 (the plain split of axis 1).
`zigzag`:     device i holds chunks i and 2N-1-i, so under a causal mask every
device owns one early and one late chunk and does the same amount of work.

Global-array helpers (outside shard_map): `to_zigzag(x, n)` reorders axis 1 so
that a plain contiguous split over n devices gives the zigzag shards;
`from_zigzag(x, n)` undoes it.

Per-shard helpers (inside shard_map over `axis_name`): `shard_positions` gives the
true token positions of this device's shard, and `contiguous_to_zigzag` /
`zigzag_to_contiguous` move shards between the two layouts with two
collective-permutes of half a shard each (every token moves at most once).
"""
import jax
import jax.numpy as jnp
from jax import lax

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"ring attention: layout must be one of {LAYOUTS}, got {layout!r}")


def zigzag_order(n):
    """Chunk ids in zigzag order: [0, 2n-1, 1, 2n-2, ..., n-1, n]."""
    order = []
    for i in range(n):
        order += [i, 2 * n - 1 - i]
    return order


def _chunks(x, n, axis):
    length = x.shape[axis]
    if length % (2 * n):
        raise ValueError(f"zigzag: axis {axis} has length {length}, which must be a multiple "
                         f"of 2 * n = {2 * n}; pad the sequence")
    return jnp.split(x, 2 * n, axis=axis)


def to_zigzag(x, n, axis=1):
    """Reorders axis `axis` of a global array into zigzag order for n devices."""
    parts = _chunks(x, n, axis)
    return jnp.concatenate([parts[c] for c in zigzag_order(n)], axis=axis)


def from_zigzag(x, n, axis=1):
    """Inverse of `to_zigzag`."""
    parts = _chunks(x, n, axis)
    order = zigzag_order(n)
    inverse = [order.index(c) for c in range(2 * n)]
    return jnp.concatenate([parts[j] for j in inverse], axis=axis)


def shard_positions(layout, axis_name, batch, shard_len):
    """int32 [batch, shard_len] true positions of this device's tokens (inside shard_map)."""
    check_layout(layout)
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    if layout == "contiguous":
        pos = idx * shard_len + jnp.arange(shard_len, dtype=jnp.int32)
    else:
        if shard_len % 2:
            raise ValueError(f"zigzag: the per-device length {shard_len} must be even")
        c = shard_len // 2
        ar = jnp.arange(c, dtype=jnp.int32)
        pos = jnp.concatenate([idx * c + ar, (2 * n - 1 - idx) * c + ar])
    return jnp.broadcast_to(pos.astype(jnp.int32), (batch, shard_len))


def _zigzag_owner(chunk, n):
    return chunk if chunk < n else 2 * n - 1 - chunk


def _halves(x, axis):
    length = x.shape[axis]
    if length % 2:
        raise ValueError(f"zigzag: the per-device length {length} must be even")
    return jnp.split(x, 2, axis=axis)


def contiguous_to_zigzag(x, axis_name, axis=1):
    """This device's contiguous shard -> its zigzag shard (inside shard_map)."""
    n = lax.axis_size(axis_name)
    if n == 1:
        return x
    lo, hi = _halves(x, axis)
    # Chunk 2d (even) and 2d+1 (odd) of device d go to their zigzag owners; the even
    # chunks land on distinct devices, and so do the odd ones.
    even = lax.ppermute(lo, axis_name, [(d, _zigzag_owner(2 * d, n)) for d in range(n)])
    odd = lax.ppermute(hi, axis_name, [(d, _zigzag_owner(2 * d + 1, n)) for d in range(n)])
    first_even = lax.axis_index(axis_name) % 2 == 0  # device j's first chunk is j
    return jnp.concatenate([jnp.where(first_even, even, odd), jnp.where(first_even, odd, even)],
                           axis=axis)


def zigzag_to_contiguous(x, axis_name, axis=1):
    """This device's zigzag shard -> its contiguous shard (inside shard_map)."""
    n = lax.axis_size(axis_name)
    if n == 1:
        return x
    first, second = _halves(x, axis)
    first_even = lax.axis_index(axis_name) % 2 == 0
    even = jnp.where(first_even, first, second)
    odd = jnp.where(first_even, second, first)

    def even_chunk(j):
        return j if j % 2 == 0 else 2 * n - 1 - j

    lo = lax.ppermute(even, axis_name, [(j, even_chunk(j) // 2) for j in range(n)])
    hi = lax.ppermute(odd, axis_name, [(j, (2 * n - 1 - even_chunk(j)) // 2) for j in range(n)])
    return jnp.concatenate([lo, hi], axis=axis)


def mesh_axis_size(axis_name):
    """Size of `axis_name` in the ambient (abstract) mesh; 1 when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or axis_name not in mesh.axis_names:
        return 1
    return mesh.shape[axis_name]
