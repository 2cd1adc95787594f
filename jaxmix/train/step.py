"""The jit'd train and eval steps (explicit shardings, donated state)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from jaxmix import cpu
from jaxmix.train.state import TrainState


def loss_terms(model, params, tokens_BL1):
    """(mean next-token cross-entropy in nats, aux dict) for a [B, L+1] batch."""
    inputs, targets = tokens_BL1[:, :-1], tokens_BL1[:, 1:]
    logits, aux = model.apply({"params": params}, inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.mean(ce), aux


def total_loss(model, params, tokens_BL1):
    """Loss to minimise: cross-entropy plus every aux entry whose key ends in 'loss'."""
    ce, aux = loss_terms(model, params, tokens_BL1)
    extra = sum((v for k, v in aux.items() if k.endswith("loss")), 0.0)
    return ce + extra, (ce, aux)


def _replicated(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _in_context(mesh, rules, fn):
    """`fn` traced and run under the mesh and the logical-axis rules (for constraints)."""
    def run(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(*args)
    return run


def _spec_axes(spec):
    """Mesh axis names a PartitionSpec refers to."""
    for entry in spec:
        yield from ((entry,) if isinstance(entry, str) else tuple(entry or ()))


def data_parallel_axes(mesh, batch_sharding, param_shardings=()):
    """The mesh axes the batch is split over when that is all the mesh does (pure data
    parallelism: no other axis larger than 1, and no param split over any axis larger
    than 1, as FSDP would), else None."""
    axes = tuple(_spec_axes(batch_sharding.spec[:1]))
    used = {a for s in jax.tree.leaves(param_shardings) for a in _spec_axes(s.spec)}
    if (math.prod(mesh.shape[a] for a in axes) == 1
            or any(size > 1 for name, size in mesh.shape.items() if name not in axes)
            or any(mesh.shape[a] > 1 for a in used)):
        return None
    return axes


def flat_reduce_axes(mesh, batch_sharding, param_shardings, platform):
    """The mesh axes over which the train step averages gradients with ONE flat
    all-reduce (`flat_mean`): the pure data-parallel axes on a CPU mesh, else None. On
    TPU/GPU the flat vector would copy every gradient and serialise the reduction after
    the whole backward pass, where GSPMD's per-parameter all-reduces overlap with it."""
    if platform != "cpu":
        return None
    return data_parallel_axes(mesh, batch_sharding, param_shardings)


def flat_mean(tree, axes):
    """Inside a shard_map: the mean of `tree` over the mesh `axes`, taken as ONE
    all-reduce of all its leaves raveled into a flat vector."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, axes) / jax.lax.psum(1, axes))


def _has_aux_losses(model, params, tokens):
    aux = jax.eval_shape(lambda p, t: total_loss(model, p, t)[1][1], params, tokens)
    return any(k.endswith("loss") for k in aux)


def make_train_step(model, tx, lr_schedule, mesh, rules, state_shardings, batch_sharding):
    """The jit'd train step. Under pure data parallelism (see `data_parallel_axes`) the
    gradients (and metrics) are taken per device inside a shard_map and averaged by ONE
    all-reduce of a flat vector (`flat_mean`), instead of the per-parameter (tuple)
    all-reduce GSPMD inserts: on a CPU host that is one rendezvous per step (the Mamba
    LM step on 2 CPU devices gains 2 to 4%), between CPU processes one gloo call. Models
    with aux losses keep the GSPMD step: their load-balancing terms are statistics of
    the whole batch. CPU meshes only (`flat_reduce_axes`)."""
    dp_axes = flat_reduce_axes(mesh, batch_sharding, state_shardings.params,
                               mesh.devices.flat[0].platform)

    def loss_and_grads(params, tokens):
        grad_fn = jax.value_and_grad(lambda p: total_loss(model, p, tokens), has_aux=True)
        (_, (ce, aux)), grads = grad_fn(params)
        return ce, aux, grads

    def grads_local(params, tokens):  # one device's shard of the batch
        with nn.logical_axis_rules(()):  # per-device code: no activation constraints
            return flat_mean(loss_and_grads(params, tokens), dp_axes)

    def step_fn(state: TrainState, tokens):
        if dp_axes and not _has_aux_losses(model, state.params, tokens):
            grads_fn = jax.shard_map(grads_local, mesh=mesh, in_specs=(P(), P(dp_axes)),
                                     out_specs=P(), check_vma=False)
        else:
            grads_fn = loss_and_grads
        ce, aux, grads = grads_fn(state.params, tokens)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "grad_norm": optax.global_norm(grads),
                   "learning_rate": lr_schedule(state.step)}
        metrics.update({k: jnp.mean(v) for k, v in aux.items()})
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, _replicated(mesh)), donate_argnums=0,
                     compiler_options=cpu.compiler_options(list(mesh.devices.flat)))
    run = _in_context(mesh, rules, jitted)
    run.compile = _in_context(mesh, rules, lambda *args: jitted.lower(*args).compile())
    run.trace = _in_context(mesh, rules, jitted.trace)
    return run


def make_eval_step(model, mesh, rules, param_shardings, batch_sharding):
    """Returns a function params, tokens -> summed nats over the batch's targets."""
    def eval_fn(params, tokens):
        ce, _ = loss_terms(model, params, tokens)
        return ce * (tokens.shape[0] * (tokens.shape[1] - 1))

    jitted = jax.jit(eval_fn, in_shardings=(param_shardings, batch_sharding),
                     out_shardings=_replicated(mesh),
                     compiler_options=cpu.compiler_options(list(mesh.devices.flat)))
    return _in_context(mesh, rules, jitted)


def bits_per_byte(nats_per_token, bytes_per_token=1.0):
    return nats_per_token / math.log(2) / bytes_per_token
