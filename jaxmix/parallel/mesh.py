"""The device mesh ("data", "fsdp", "tensor", "sequence") and logical-axis rules."""
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from jaxmix.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "sequence")

# Logical name -> mesh axes. Kept in the config (`config.sharding.rules`); these are
# the defaults: batch over data and fsdp, params' embed dim over fsdp (FSDP/ZeRO-3),
# heads and inner channels over tensor, sequence over sequence.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("state", None),
)


def mesh_shape(mesh_cfg, n_devices):
    """Sizes of the four axes; one axis may be -1 (= the rest of the devices)."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data/fsdp/tensor/sequence may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: the fixed axes ({known} devices) do not divide the "
                              f"{n_devices} devices; change mesh.* so they do")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: mesh.data*fsdp*tensor*sequence = {math.prod(sizes)} but there "
                          f"are {n_devices} devices; make the product {n_devices} (or set one "
                          f"axis to -1)")
    return dict(zip(AXES, sizes))


def make_mesh(mesh_cfg, devices=None):
    """A Mesh over all devices, laid out for the real topology."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    sizes = tuple(shape[a] for a in AXES)
    auto = (AxisType.Auto,) * len(AXES)  # shardings propagate from the constraints we set
    if devices == jax.devices():
        return jax.make_mesh(sizes, AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=auto)


def rules_of(config):
    """The logical-axis rules of a full config (defaults if absent)."""
    sharding = config.get("sharding", None)
    rules = sharding.get("rules", None) if sharding is not None else None
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in (rules or DEFAULT_RULES))


def batch_sharding(mesh, rules, ndim=2):
    """Sharding of a token batch [batch, length + 1, ...]: split over the batch axes only.

    The length (seq_len + 1: inputs plus shifted targets) stays whole; the model's
    activation constraints split the sequence over `sequence` after the embedding.
    """
    import flax.linen as nn
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def process_batch_slice(sharding, global_batch):
    """(part, parts): this process feeds rows [part*B/parts, (part+1)*B/parts) of the batch.

    Derived from the devices this process owns, so it holds for any mesh: processes
    whose devices share batch rows (e.g. a pure tensor-parallel mesh) load the same rows.
    """
    index_map = sharding.addressable_devices_indices_map((global_batch, 1))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    start, stop = min(starts), max(stops)
    rows = stop - start
    if global_batch % rows or start % rows:
        raise ConfigError(f"mesh: this process's devices hold batch rows [{start}, {stop}) of "
                          f"{global_batch}, not an even slice; reorder mesh.* so each process "
                          f"owns whole data/fsdp shards")
    return start // rows, global_batch // rows
