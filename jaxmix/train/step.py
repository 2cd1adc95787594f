"""The jit'd train and eval steps (explicit shardings, donated state)."""
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from jaxmix import cpu
from jaxmix.train import objectives
from jaxmix.train.state import TrainState

log = logging.getLogger("jaxmix")
# The train step's metric of per-param flags (bool [n_params], in the params' flattening
# order): that param's gradient was not finite. With the scalar metric "finite" False
# (loss or gradient norm not finite) the step's update was dropped.
NONFINITE = "nonfinite_params"


def split_batch(batch):
    """(tokens [B, L+1], loss mask [B, L] or None) of a batch: an int array (every
    target scored) or a dict {"tokens", "loss_mask"} (only the masked targets; packed
    documents also carry "segment_ids" and "positions" [B, L+1], see
    `packing_inputs`)."""
    if isinstance(batch, dict):
        return batch["tokens"], batch.get("loss_mask")
    return batch, None


def packing_inputs(batch):
    """The model's segment_ids and positions [B, L] of a packed batch (dict entries
    "segment_ids" / "positions" [B, L+1], inputs part), each None when absent."""
    if not isinstance(batch, dict):
        return {}
    return {k: batch[k][:, :-1] for k in ("segment_ids", "positions") if k in batch}


def scored_terms(model, params, batch, train=False, rng=None):
    """(cross-entropy [B, L] in nats, mask [B, L] or None, logits, aux) of a batch.
    `rng` is the mixers' "mixer" stream (for routers that sample while training). A
    packed batch's segment ids and positions reach the mixers."""
    tokens_BL1, mask_BL = split_batch(batch)
    inputs, targets = tokens_BL1[:, :-1], tokens_BL1[:, 1:]
    rngs = {"mixer": rng} if rng is not None else None
    logits, aux = model.apply({"params": params}, inputs, train=train, rngs=rngs,
                              **packing_inputs(batch))
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return ce_BL, mask_BL, logits, aux


def loss_terms(model, params, batch, n_scored=None, train=True, rng=None):
    """(mean cross-entropy in nats over the scored targets, aux dict). `n_scored`
    overrides the count the sum is divided by (per-device shards of one batch)."""
    ce_BL, mask_BL, _, aux = scored_terms(model, params, batch, train, rng)
    if mask_BL is None:
        return jnp.mean(ce_BL), aux
    n_scored = jnp.maximum(jnp.sum(mask_BL), 1.0) if n_scored is None else n_scored
    return jnp.sum(ce_BL * mask_BL) / n_scored, aux


def is_encoder(model):
    return model.cfg.get("family", "lm") == "encoder"


def total_loss(model, params, batch, n_scored=None, rng=None):
    """Loss to minimise: cross-entropy (an encoder: its head's objective, see
    `objectives`) plus the model's weighted aux losses ("aux_loss": each mixer entry's
    loss terms times its aux_weight)."""
    if is_encoder(model):
        ce, aux, _ = objectives.terms(model, params, batch, rng, train=True)
    else:
        ce, aux = loss_terms(model, params, batch, n_scored, rng=rng)
    return ce + aux.get("aux_loss", 0.0), (ce, aux)


def scored_hits(logits, targets, mask, vocab, axis=None):
    """(argmax predictions over the real vocabulary equal to the targets, scored
    targets), both counted where `mask` is 1 and summed over `axis` (None: all)."""
    hit = (jnp.argmax(logits[..., :vocab], axis=-1) == targets) * mask
    return jnp.sum(hit, axis=axis), jnp.sum(mask, axis=axis)


def mean_scored_per_shard(batch, axes):
    """Inside a shard_map over the batch `axes`: the mean over shards of the scored
    target count (None without a mask). Each shard's loss sum divided by it, averaged
    over shards, is the masked mean of the whole batch."""
    mask_BL = batch.get("loss_mask") if isinstance(batch, dict) else None
    if mask_BL is None:
        return None
    return jax.lax.psum(jnp.sum(mask_BL), axes) / jax.lax.psum(1, axes)


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
    return "aux_loss" in aux


def make_train_step(model, tx, lr_schedule, mesh, rules, state_shardings, batch_sharding,
                    seed=0):
    """The jit'd train step. Under pure data parallelism (see `data_parallel_axes`) the
    gradients (and metrics) are taken per device inside a shard_map and averaged by ONE
    all-reduce of a flat vector (`flat_mean`), instead of the per-parameter (tuple)
    all-reduce GSPMD inserts: on a CPU host that is one rendezvous per step (the Mamba
    LM step on 2 CPU devices gains 2 to 4%), between CPU processes one gloo call. Models
    with aux losses keep the GSPMD step: their load-balancing terms are statistics of
    the whole batch. CPU meshes only (`flat_reduce_axes`). Mixers get the rng stream
    "mixer", fold_in(PRNGKey(seed), step), and train=True."""
    dp_axes = flat_reduce_axes(mesh, batch_sharding, state_shardings.params,
                               mesh.devices.flat[0].platform)

    def loss_and_grads(params, tokens, rng, n_scored=None):
        grad_fn = jax.value_and_grad(lambda p: total_loss(model, p, tokens, n_scored, rng),
                                     has_aux=True)
        (_, (ce, aux)), grads = grad_fn(params)
        return ce, aux, grads

    def grads_local(params, tokens, rng):  # one device's shard of the batch
        # Each shard its own draws (an encoder's token masks, say), not the same ones.
        rng = jax.random.fold_in(rng, jax.lax.axis_index(dp_axes))
        with nn.logical_axis_rules(()):  # per-device code: no activation constraints
            n_scored = mean_scored_per_shard(tokens, dp_axes)
            return flat_mean(loss_and_grads(params, tokens, rng, n_scored), dp_axes)

    def step_fn(state: TrainState, tokens):
        flat = dp_axes and not _has_aux_losses(model, state.params, tokens)
        if dp_axes and not flat:  # traced once per compile: logged once
            log.info("train step: GSPMD gradient all-reduce instead of the flat "
                     "data-parallel one: the aux losses (load balance) are statistics "
                     "of the whole batch, not of one device's shard")
        if flat:
            grads_fn = jax.shard_map(grads_local, mesh=mesh,
                                     in_specs=(P(), P(dp_axes), P()), out_specs=P(),
                                     check_vma=False)
        else:
            grads_fn = loss_and_grads
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        ce, aux, grads = grads_fn(state.params, tokens, rng)
        # Non-finite guard: a step whose loss or gradient norm is not finite leaves the
        # params and optimizer state as they were (the step and data still advance);
        # the loop applies train.nonfinite to the per-param flags.
        sq_leaves = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32)))
                               for g in jax.tree.leaves(grads)])
        grad_norm = jnp.sqrt(jnp.sum(sq_leaves))
        finite = jnp.isfinite(ce) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {"loss": ce, "grad_norm": grad_norm,
                   "learning_rate": lr_schedule(state.step),
                   "finite": finite, NONFINITE: ~jnp.isfinite(sq_leaves)}
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
    """Returns a function params, batch -> [summed nats, scored targets, correct
    argmax predictions] over the batch's scored targets (all targets without a mask)."""
    def eval_fn(params, batch):
        if is_encoder(model):
            return jnp.stack([jnp.asarray(t, jnp.float32)
                              for t in objectives.terms(model, params, batch)[2]])
        ce_BL, mask_BL, logits, _ = scored_terms(model, params, batch, train=False)
        tokens_BL1, _ = split_batch(batch)
        mask_BL = jnp.ones_like(ce_BL) if mask_BL is None else mask_BL
        correct, count = scored_hits(logits, tokens_BL1[:, 1:], mask_BL, model.cfg.vocab_size)
        return jnp.stack([jnp.sum(ce_BL * mask_BL), count, correct])

    jitted = jax.jit(eval_fn, in_shardings=(param_shardings, batch_sharding),
                     out_shardings=_replicated(mesh),
                     compiler_options=cpu.compiler_options(list(mesh.devices.flat)))
    return _in_context(mesh, rules, jitted)


def bits_per_byte(nats_per_token, bytes_per_token=1.0):
    return nats_per_token / math.log(2) / bytes_per_token
