"""Train state and its shardings, derived from the params' logical axis names."""
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmix.errors import ConfigError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _boxed_init(model, tx, seq_len, rng):
    args, kwargs = model.example_inputs(seq_len)
    params = model.init(rng, *args, **kwargs)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def check_divisible(abstract, shardings, mesh):
    """One-line error for a param dim that its mesh axes do not divide."""
    flat = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings.params)):
        for dim, axes in zip(leaf.shape, tuple(sharding.spec)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if dim % size:
                name = "/".join(str(getattr(p, "key", p)) for p in path)
                raise ConfigError(
                    f"mesh: param {name} has a dim of {dim} split over mesh axes "
                    f"{'x'.join(axes)}={size}, which does not divide it; change mesh.{axes[0]} "
                    f"or the model width (model.d_model, n_heads, n_kv_heads, expand, d_ff)")


def create(model, tx, mesh, rules, seq_len, seed):
    """(init_fn, state_shardings, abstract_state) for the model under the mesh/rules.

    init_fn() materialises the state directly with its shardings (no host copy).
    abstract_state holds ShapeDtypeStructs carrying those shardings (orbax restore target).
    """
    rng = jax.random.PRNGKey(seed)
    boxed = lambda r: _boxed_init(model, tx, seq_len, r)
    abstract_boxed = jax.eval_shape(boxed, rng)
    specs = nn.get_partition_spec(abstract_boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract_boxed), shardings)
    check_divisible(abstract, shardings, mesh)

    def init_fn():
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jax.jit(lambda r: nn.unbox(boxed(r)), out_shardings=shardings)(rng)

    return init_fn, shardings, abstract


def from_params(params, tx, shardings, step=0):
    """A train state holding `params` (placed in their shardings) and a fresh optimizer
    state, e.g. for weights imported from elsewhere."""
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.asarray(step, jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def param_count(abstract):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params)))
