"""Encoder objectives: the loss and the evaluation terms of each encoder head.

- "classify": cross-entropy of the logits against batch["label"] [B]; accuracy.
- "masked_patch" (SSAMBA / SSAST joint pretraining): at the masked patches
  batch["mask_idx"] [B, N] of batch["patches"] [B, L, F], InfoNCE between the
  discriminative predictions and the clip's own masked patches (the other masked patches
  of the clip are the negatives; the softmax runs over the predictions for each target,
  as SSAST's) plus 10 x the MSE of the generative predictions: loss = nce + 10 mse.
  Accuracy: the share of targets whose best-scoring prediction is their own.
- "masked_token": a share `MASK_PROB` of the input tokens (batch["tokens"] [B, L+1]
  from the byte pipelines; the last column is unused) replaced by the mask embedding,
  cross-entropy of the logits at those positions. Evaluation draws its masks from a
  fixed key, so the validation batches are the same every time.
"""
import jax
import jax.numpy as jnp
import optax

MSE_WEIGHT = 10.0
MASK_PROB = 0.15
EVAL_KEY = 1234


def head_of(model):
    return model.cfg.get("head", "features")


def _inputs(batch):
    return batch["patches"] if "patches" in batch else batch["tokens"]


def nce_terms(pred_BNF, target_BNF):
    """(InfoNCE loss, accuracy) over each clip's N masked patches."""
    scores_BNM = jnp.einsum("bnf,bmf->bnm", pred_BNF, target_BNF)
    logp_BNM = jax.nn.log_softmax(scores_BNM, axis=1)  # over the predictions per target
    n = scores_BNM.shape[1]
    nce = -jnp.mean(jnp.diagonal(logp_BNM, axis1=1, axis2=2))
    acc = jnp.mean(jnp.argmax(scores_BNM, axis=1) == jnp.arange(n))
    return nce, acc


def token_mask(key, shape):
    """Bernoulli(MASK_PROB) positions, at least one per row."""
    mask = jax.random.bernoulli(key, MASK_PROB, shape)
    first = jax.random.randint(jax.random.fold_in(key, 1), shape[:1], 0, shape[1])
    return mask | (jnp.arange(shape[1]) == first[:, None])


def terms(model, params, batch, rng=None, train=False):
    """(loss, metrics dict, (summed loss, count, correct) for evaluation) of a batch."""
    head = head_of(model)
    rngs = {"mixer": rng} if rng is not None else None
    apply = lambda *a, **kw: model.apply({"params": params}, *a, train=train, rngs=rngs, **kw)
    if head == "classify":
        logits, aux = apply(_inputs(batch))
        ce_B = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        hit_B = jnp.argmax(logits, -1) == batch["label"]
        n = ce_B.shape[0]
        return jnp.mean(ce_B), aux, (jnp.sum(ce_B), n, jnp.sum(hit_B))
    if head == "masked_patch":
        patches, idx = batch["patches"], batch["mask_idx"]
        (c_pred, g_pred), aux = apply(patches, mask_idx=idx)
        target = jnp.take_along_axis(patches, idx[..., None], axis=1).astype(jnp.float32)
        nce, acc = nce_terms(c_pred, target)
        mse = jnp.mean((g_pred - target) ** 2)
        loss = nce + MSE_WEIGHT * mse
        aux = {**aux, "nce": nce, "mse": mse, "nce_acc": acc}
        n = patches.shape[0]
        return loss, aux, (loss * n, n, acc * n)
    if head == "masked_token":
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        inputs = tokens[:, :-1]
        key = rng if rng is not None else jax.random.PRNGKey(EVAL_KEY)
        mask_BL = token_mask(jax.random.fold_in(key, 7), inputs.shape)
        logits, aux = apply(inputs, mask_BL=mask_BL)
        ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits, inputs)
        m = mask_BL.astype(jnp.float32)
        vocab = model.cfg.vocab_size
        hit = jnp.sum((jnp.argmax(logits[..., :vocab], -1) == inputs) * m)
        return jnp.sum(ce_BL * m) / jnp.sum(m), aux, (jnp.sum(ce_BL * m), jnp.sum(m), hit)
    raise ValueError(f"model.head={head!r} has no training objective")


def positions(batch):
    """Input positions in a batch (throughput)."""
    if isinstance(batch, dict) and "patches" in batch:
        return batch["patches"].shape[0] * batch["patches"].shape[1]
    tokens = batch["tokens"] if isinstance(batch, dict) else batch
    return tokens.shape[0] * (tokens.shape[1] - 1)
