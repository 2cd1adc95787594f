"""Running a Pallas kernel per device: a shard_map over the mesh axes that split its operands.

A `pallas_call` is an opaque custom call to XLA's SPMD partitioner: under jit with
sharded operands it would gather them and run the whole global problem on every chip.
`per_device` wraps a kernel entry point in a `jax.shard_map` so that every device calls
it on its own shard. Which mesh axes split which operand dim follows the logical-axis
rules in effect (`flax.linen.logical_axis_rules`, as the models set them), by logical
name: the dims the kernel is given as `"batch"`, `"heads"`, `"mlp"`, ... are split
exactly as the model's activations with those names are, so no data moves around the
kernel. Without rules, batch dims are split over every free mesh axis that divides them.

Only free axes count: those of the ambient mesh (`jax.set_mesh`) larger than 1 and not
already manual (inside an enclosing shard_map, e.g. the sequence-parallel scan, the
kernel shards over the axes that remain). The shard_map goes manual over all of them;
a dim that an axis does not divide stays whole on that axis (the kernel then runs
replicated over it, which is correct, only redundant). Without a mesh, or with no free
axis, the kernel is called directly.
"""
import math

import flax.linen as nn
import jax
from jax.sharding import AxisType, PartitionSpec as P


def _auto_axes():
    """{mesh axis: size} of the ambient mesh's axes that are not manual yet."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return {}
    return {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes,
                                                   mesh.axis_types)
            if kind != AxisType.Manual}


def free_axes():
    """{mesh axis: size} of the ambient mesh's axes larger than 1 that are not manual."""
    return {name: size for name, size in _auto_axes().items() if size > 1}


def _rule_axes(logical):
    """Mesh axes the active logical-axis rules map `logical` to (a tuple, maybe empty)."""
    rules = nn.get_logical_axis_rules()
    if not rules:
        return tuple(free_axes()) if logical == "batch" else ()
    entry = nn.logical_to_mesh_axes((logical,), rules)[0]
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def mesh_axes(logical, *sizes):
    """The free mesh axes splitting a dim named `logical` whose size(s) are `sizes`: the
    rules' axes in order, as many as keep dividing every size."""
    free, kept = free_axes(), ()
    for axis in _rule_axes(logical):
        parts = math.prod(free[a] for a in kept + (axis,)) if axis in free else 0
        if parts and all(s % parts == 0 for s in sizes):
            kept += (axis,)
    return kept


def tpu_kernel_interpret():
    """The `interpret=` for a TPU (Mosaic) kernel on the default backend: compiled on
    TPU; off TPU, TPU interpret mode (`pltpu.InterpretParams()`: simulated VMEM, DMAs
    and grid) when the kernel runs on one device, and the generic Pallas interpreter
    (`True`) inside a shard_map over several devices, where TPU interpret mode would
    wait at a barrier for every device's kernel to run at once, which XLA:CPU's
    thread pool does not guarantee (the processes hang)."""
    if jax.default_backend() == "tpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    several = mesh is not None and not mesh.empty and any(
        size > 1 and kind == AxisType.Manual
        for size, kind in zip(mesh.axis_sizes, mesh.axis_types))
    if jax.default_backend() == "cpu" and not several:
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.InterpretParams()
    return True


def spec(*dims):
    """A PartitionSpec from per-dim mesh-axis tuples (empty tuple or None: whole)."""
    return P(*[(d if len(d) > 1 else d[0]) if d else None for d in dims])


def per_device(fn, in_specs, out_specs):
    """`fn` run by every device on its shard: a shard_map manual over all free axes, or
    `fn` itself when there is none. `None` operands take a `None` spec."""
    if not free_axes():
        return fn
    # Manual over every remaining axis, size-1 ones included: interpret-mode kernels run
    # host callbacks, which XLA allows only when no mesh axis is left automatic.
    # check_vma=False: with jax 0.10 a pallas_call (even interpret mode) inside a
    # vma-checked shard_map fails with "Primitive ... requires varying manual axes to match".
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(_auto_axes()), check_vma=False)
