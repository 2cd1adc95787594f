"""DuoAttention: find the retrieval heads of an attention model, stream the others.

Every KV head of every attention layer gets a gate alpha in [0, 1] (a query group
shares its KV head's gate). With the model frozen, each layer outputs
alpha x full attention + (1 - alpha) x streaming attention (sink + recent keys only),
and the gates are trained to keep the last hidden states (after the final norm) on the
passkey answer positions close to the full model's while an L1 term pushes them to 0:

  loss = sum_{answer positions} mean_d (h_full - h_mixed)^2 / #answer positions
         + reg x mean(|alpha|)                    (reg = 0.05; the mean over all gates)

which is the official code's normalisation (the paper writes a sum over gates, i.e. an
effective reg 0.05 / #gates here). Only the gates train (an optax mask: every other
param gets a zero update), AdamW with lr 0.02 and no weight decay, warmed up from 0.1 x
lr over the first 20% of the steps and decayed back to 0.1 x lr over the last 20% (the
paper's 400 of 2000), gates clamped to [0, 1] after every step, initialised to 1.

  python -m jaxmix.duo identify --workdir runs/passkey --steps 300

writes duo_heads.json (the gates, [attention layers, KV heads]) and duo_heads.png (a
heatmap) into the workdir (the command line is in __main__.py). Deployment (`deploy`,
used by `jaxmix.generate --duo` and `jaxmix.evaluate --duo`) binarises the gates by a
sparsity quantile or a threshold, reorders each layer's heads so that the retrieval heads come first (q/k/v/o weights
permuted together, so the function is unchanged), and sets `model.duo` so that those
heads keep a full KV cache and the rest a sink + recent ring buffer.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxmix import models
from jaxmix.errors import ConfigError

FORMAT = "jaxmix.duo_heads/1"
TRAIN_SINK, TRAIN_RECENT = 128, 256      # the paper's windows while training the gates
DEPLOY_SINK, DEPLOY_RECENT = 64, 256     # ... and while decoding


# ----------------------------------------------------------------------------- model

def attention_layers(model_cfg):
    """[(layer index, KV heads, query heads per KV head)] of the layers that take
    DuoAttention gates (attention mixers)."""
    from jaxmix.mixers.attention import head_shape
    out = []
    for i, (_, cls, mixer_cfg) in enumerate(models.layer_mixers(model_cfg)):
        if getattr(cls, "DUO", False):
            hq, hkv, _ = head_shape(mixer_cfg)
            out.append((i, hkv, hq // hkv))
    return out


def with_duo(model_config, **duo):
    """A copy of `model_config` with model.duo set to `duo`."""
    cfg = ml_collections.ConfigDict(models.normalize_config(model_config))
    cfg.duo = duo
    return cfg


def _layer(params, i):
    return params[f"layers_{i}"]["mixer"]


def add_gates(params, layers, value=1.0):
    """params with a "duo_alpha" [Hkv] leaf in every gated layer's mixer."""
    out = dict(params)
    for i, hkv, _ in layers:
        layer = dict(out[f"layers_{i}"])
        layer["mixer"] = dict(layer["mixer"], duo_alpha=jnp.full((hkv,), value, jnp.float32))
        out[f"layers_{i}"] = layer
    return out


def gates_of(params, layers):
    return np.stack([np.asarray(_layer(params, i)["duo_alpha"]) for i, _, _ in layers])


def schedule(lr, steps):
    """0.1 x lr -> lr over the first 20% of the steps, lr, then -> 0.1 x lr over the
    last 20% (linear pieces)."""
    ramp = max(1, steps // 5)
    return optax.join_schedules([
        optax.linear_schedule(0.1 * lr, lr, ramp),
        optax.constant_schedule(lr),
        optax.linear_schedule(lr, 0.1 * lr, ramp)], [ramp, max(ramp, steps - ramp)])


def make_step(model_config, layers, lr, steps, reg, sink, recent):
    """(optax transform, jit'd step (params, opt_state, tokens, mask) -> (params,
    opt_state, metrics)) of gate training."""
    teacher = models.build(model_config)
    student = models.build(with_duo(model_config, gates=True, sink=sink, recent=recent))
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "gate" if path[-1].key == "duo_alpha" else "frozen", params)
    tx = optax.multi_transform({"gate": optax.adamw(schedule(lr, steps), weight_decay=0.0),
                                "frozen": optax.set_to_zero()}, labels)

    def loss_fn(params, inputs_BL, mask_BL):
        h_full = jax.lax.stop_gradient(teacher.apply({"params": params}, inputs_BL,
                                                     hidden=True)[0])
        h_mixed = student.apply({"params": params}, inputs_BL, hidden=True)[0]
        per_pos = jnp.mean((h_full - h_mixed) ** 2, axis=-1)
        distill = jnp.sum(per_pos * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0)
        alphas = jnp.concatenate([_layer(params, i)["duo_alpha"] for i, _, _ in layers])
        l1 = jnp.mean(jnp.abs(alphas))
        return distill + reg * l1, {"distill": distill, "l1": l1}

    @jax.jit
    def step(params, opt_state, tokens_BL1, mask_BL):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, tokens_BL1[:, :-1], mask_BL)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.clip(x, 0.0, 1.0) if path[-1].key == "duo_alpha" else x, params)
        return params, opt_state, metrics

    return tx, step


# ----------------------------------------------------------------------------- identify

def passkey_args(config, split):
    """Passkey task settings: the workdir's own when it trained on passkey, else the
    synthetic defaults (a byte-level model is needed either way)."""
    from jaxmix.data import synthetic
    return synthetic.task_args(synthetic.task_config(config, "passkey"), split)


def check_identify(model_config, config, seq_len=None):
    """(the gated layers, the passkey example length) of identifying `model_config`'s
    heads with `config`'s passkey settings; a one-line ConfigError for a model without
    attention layers or a length the task cannot use."""
    from jaxmix.data import synthetic
    layers = attention_layers(models.normalize_config(model_config))
    if not layers:
        raise ConfigError("duo identify: the model has no attention layers to gate; "
                          "DuoAttention needs a model with attention layers")
    seq_len = seq_len or int(config.train.seq_len)
    probe = synthetic.task_config(config, "passkey")
    synthetic.check("passkey", synthetic.task_args(probe), seq_len, what="--seq_len")
    return layers, seq_len


def identify(model_config, params, config, *, steps=300, batch=8, seq_len=None,
             sink=TRAIN_SINK, recent=TRAIN_RECENT, lr=0.02, reg=0.05, seed=0,
             log_every=25, log=print):
    """Trains the gates on passkey data; returns (alpha [attention layers, KV heads],
    layer indices, a summary dict)."""
    from jaxmix.data import synthetic
    layers, seq_len = check_identify(model_config, config, seq_len)
    args = passkey_args(config, "train")
    for name, value in (("steps", steps), ("batch", batch)):
        if value < 1:
            raise ConfigError(f"--{name}={value} must be positive")
    if lr <= 0 or reg < 0:
        raise ConfigError(f"--lr={lr} must be positive and --reg={reg} >= 0")
    tx, step = make_step(model_config, layers, lr, steps, reg, sink, recent)
    params = add_gates(jax.tree.map(jnp.asarray, params), layers)
    opt_state = tx.init(params)
    t0, metrics = time.time(), {}
    for s in range(steps):
        b = synthetic.make_batch("passkey", args, seq_len, seed, "train", s, range(batch))
        params, opt_state, metrics = step(params, opt_state, b["tokens"], b["loss_mask"])
        if (s + 1) % log_every == 0 or s + 1 == steps:
            alpha = gates_of(params, layers)
            log(f"duo identify: step {s + 1}/{steps} distill {float(metrics['distill']):.4g} "
                f"mean alpha {alpha.mean():.3f} ({time.time() - t0:.0f} s)")
    alpha = gates_of(params, layers)
    summary = dict(steps=steps, batch=batch, seq_len=seq_len, sink=sink, recent=recent, lr=lr,
                   reg=reg, seed=seed, wall_s=round(time.time() - t0, 1),
                   final_distill=float(metrics["distill"]),
                   reg_normalisation="reg x mean |alpha| over all gates; distillation: mean "
                                     "over hidden dims, mean over answer positions")
    return alpha, [i for i, _, _ in layers], summary


# ----------------------------------------------------------------------------- files

def save_heads(folder, alpha, layers, summary, trained_seq_len):
    """Writes duo_heads.json and duo_heads.png into `folder`; returns the json path."""
    path = os.path.join(folder, "duo_heads.json")
    data = {"format": FORMAT, "layers": list(layers), "n_kv_heads": int(alpha.shape[1]),
            "alpha": np.round(alpha.astype(float), 6).tolist(), "train": summary,
            "deploy": {"sink": DEPLOY_SINK, "recent": DEPLOY_RECENT},
            "trained_seq_len": int(trained_seq_len)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    heatmap(os.path.join(folder, "duo_heads.png"), alpha, layers)
    return path


def heatmap(path, alpha, layers):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * alpha.shape[1], 1.0 + 0.5 * alpha.shape[0]))
    im = ax.imshow(alpha, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(alpha):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center",
                color="white" if v < 0.5 else "black", fontsize=8)
    ax.set_xticks(range(alpha.shape[1]))
    ax.set_yticks(range(alpha.shape[0]), [str(i) for i in layers])
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title("DuoAttention gates (1 = retrieval)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_heads(path, model_cfg):
    """(alpha [attention layers, KV heads], layer indices, the file's dict), checked
    against the model: one-line ConfigError for a missing, unreadable or mismatched file."""
    try:
        with open(path) as f:
            data = json.load(f)
        alpha = np.asarray(data["alpha"], np.float64)
        layers = [int(i) for i in data["layers"]]
    except FileNotFoundError:
        raise ConfigError(f"--duo {path}: no such file (write it with "
                          f"`python -m jaxmix.duo identify --workdir W`)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--duo {path}: not a duo_heads.json file ({e})") from None
    want = attention_layers(models.normalize_config(model_cfg))
    want_shape = (len(want), want[0][1] if want else 0)
    if alpha.ndim != 2 or alpha.shape != want_shape or layers != [i for i, _, _ in want]:
        raise ConfigError(f"--duo {path}: gates of shape {alpha.shape} for layers {layers} "
                          f"do not match the model ({want_shape[0]} attention layers "
                          f"{[i for i, _, _ in want]} of {want_shape[1]} KV heads)")
    if not np.all(np.isfinite(alpha)):
        raise ConfigError(f"--duo {path}: the gates hold non-finite values")
    return alpha, layers, data


# ----------------------------------------------------------------------------- deploy

def retrieval_heads(alpha, sparsity=None, threshold=None):
    """bool, alpha's shape: True for retrieval heads.

    sparsity s in [0, 1): the fraction of heads that stream. Heads are ranked by alpha
    (ties by position) and those at or above the s-quantile of the ranks are kept,
    i.e. the top (1 - s) with the paper's quantile rule and no random tie-breaking.
    threshold t: retrieval iff alpha >= t (t > 1 streams every head)."""
    if (sparsity is None) == (threshold is None):
        raise ConfigError("duo: give exactly one of --sparsity and --threshold")
    alpha = np.asarray(alpha, np.float64)
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ConfigError(f"--threshold={threshold} must be a finite number")
        return alpha >= threshold
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity={sparsity} must be in [0, 1) (the fraction of heads "
                          f"that stream; use --threshold above 1 to stream every head)")
    n = alpha.size
    rank = np.empty(n, np.int64)
    rank[np.argsort(alpha.ravel(), kind="stable")] = np.arange(n)
    return (rank >= np.quantile(np.arange(n), sparsity)).reshape(alpha.shape)


def _permute_heads(mixer, order, groups, head_dim):
    """A mixer's q/k/v/o params with KV heads (and their query groups) in `order`."""
    hkv = len(order)
    q_order = (np.asarray(order)[:, None] * groups + np.arange(groups)).ravel()

    def cols(x, idx, n):  # last axis holds n heads of head_dim
        return x.reshape(x.shape[:-1] + (n, head_dim))[..., idx, :].reshape(x.shape)

    out = dict(mixer)
    for name, idx, n in (("q_proj", q_order, hkv * groups), ("k_proj", order, hkv),
                         ("v_proj", order, hkv)):
        out[name] = {p: cols(np.asarray(w), idx, n) for p, w in mixer[name].items()}
    o = dict(mixer["o_proj"])
    k = np.asarray(o["kernel"])
    o["kernel"] = k.reshape(hkv * groups, head_dim, -1)[q_order].reshape(k.shape)
    out["o_proj"] = o
    return out


def deploy(model_config, params, retrieval, layers, sink=DEPLOY_SINK, recent=DEPLOY_RECENT):
    """(model config with model.duo, params with each layer's retrieval heads first)."""
    from jaxmix.mixers.attention import head_shape
    cfg = models.normalize_config(model_config)
    info = {i: g for i, _, g in attention_layers(cfg)}
    if sink < 0 or recent < 1:
        raise ConfigError(f"duo: --sink={sink} must be >= 0 and --recent={recent} >= 1")
    counts = [-1] * cfg.n_layers
    mixer_cfgs = [mixer_cfg for _, _, mixer_cfg in models.layer_mixers(cfg)]
    out = dict(params)
    for row, i in zip(np.asarray(retrieval, bool), layers, strict=True):
        order = np.concatenate([np.flatnonzero(row), np.flatnonzero(~row)])
        hd = head_shape(mixer_cfgs[i])[2]
        layer = dict(out[f"layers_{i}"])
        layer["mixer"] = _permute_heads(layer["mixer"], order, info[i], hd)
        out[f"layers_{i}"] = layer
        counts[i] = int(row.sum())
    return with_duo(cfg, retrieval=counts, sink=int(sink), recent=int(recent)), out


def load_deployed(model_config, params, path, *, sparsity=None, threshold=None, sink=None,
                  recent=None, trained_seq_len=None,
                  warn=lambda message: print(f"warning: {message}")):
    """`deploy` from a duo_heads.json (sink/recent default to the file's deploy
    windows). Warns when sink + recent reaches the trained context, where streaming
    heads would see everything the model was trained on."""
    alpha, layers, data = load_heads(path, model_config)
    windows = data.get("deploy", {})
    sink = windows.get("sink", DEPLOY_SINK) if sink is None else sink
    recent = windows.get("recent", DEPLOY_RECENT) if recent is None else recent
    trained = trained_seq_len or data.get("trained_seq_len")
    if trained and sink + recent >= trained:
        warn(f"duo sink {sink} + recent {recent} >= the {trained} tokens the model was "
             f"trained on: streaming heads see the whole trained context")
    retrieval = retrieval_heads(alpha, sparsity, threshold)
    cfg, params = deploy(model_config, params, retrieval, layers, sink, recent)
    return cfg, params, retrieval
