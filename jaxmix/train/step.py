"""The jit'd train and eval steps (explicit shardings, donated state)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

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


def make_train_step(model, tx, lr_schedule, mesh, rules, state_shardings, batch_sharding):
    def step_fn(state: TrainState, tokens):
        grad_fn = jax.value_and_grad(lambda p: total_loss(model, p, tokens), has_aux=True)
        (_, (ce, aux)), grads = grad_fn(state.params)
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
