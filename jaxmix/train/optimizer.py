"""AdamW with linear warmup, cosine decay and global-norm gradient clipping."""
import jax
import optax


def schedule(train_cfg):
    """Learning rate per step. The decay spans `train.decay_steps` (0 = `train.steps`),
    so stopping early with a smaller `train.steps` does not change the schedule."""
    horizon = train_cfg.get("decay_steps", 0) or train_cfg.steps
    warmup = min(train_cfg.warmup_steps, max(horizon - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(horizon, warmup + 1),
        end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices only; never on norms, biases, A_log or D."""
    def keep(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return leaf.ndim >= 2 and name != "A_log" and not name.endswith("bias")
    return jax.tree_util.tree_map_with_path(keep, params)


def make(train_cfg):
    """(optax transformation, learning-rate schedule)."""
    lr = schedule(train_cfg)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay,
                    mask=decay_mask))
    return tx, lr
