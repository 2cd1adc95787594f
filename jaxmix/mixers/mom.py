"""Mixture-of-Memories (MoM) on the gated delta rule.

A router (bias-free linear `router` [D, M], softmax in fp32) sends each token to its
`top_k` of `n_memories` memories with weights renormalised to sum to 1; a shared memory,
when `shared_memory`, sees every token and is added with weight 1:
  o_t = sum_{m in top-k(t)} w_{t,m} o^m_t + o^shared_t,
then RMSNorm over d_v times SiLU(g_proj(x)) and o_proj, as the Gated DeltaNet layer
(jaxmix.mixers.gdn, whose fields this mixer shares). q_proj, the short-conv weights,
A_log and dt_bias are shared by all memories; each memory has its own k/v/b/a
projections (kernels [M, D, ...]) and the shared memory its own `shared_*` ones.

As in the official code, a memory sees only its own tokens, in order: each memory's
tokens are gathered into a compacted sequence (stable order), run through the short
convs and the delta rule there, and scattered back; the padding after them has beta = 0
and no decay, so a memory is unchanged by the tokens not routed to it. With segment
ids the compacted streams carry their tokens' ids: the convs and the delta rule stay
inside each packed document. All memories run as one batch of M x B compacted
sequences (M times the work of one memory; the official kernels skip the padding).
With mesh.sequence > 1 the compacted streams are split over the sequence devices like
any sequence (`parallel.sequence_parallel_gated_delta_rule`).

Load balance (aux "load_balance_loss", times `aux_weight`): the Mixtral form
E * sum_{k,e} f_{k,e} P_e per layer (f: fraction of tokens whose k-th choice is e, P:
mean router probability), averaged over the MoM layers; it equals top_k at uniform
routing. The official code concatenates the router logits of all layers before taking
the statistics; per-layer averaging keeps each layer's term local to it. Default
weight 0.01, as the released configs (the paper's best recall used 0.001).

Decoding: the cache holds each memory's delta-rule state and conv windows (leading axis
M) and the shared memory's; a token updates only its routed memories and the shared one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import ops, parallel
from jaxmix.errors import ConfigError
from jaxmix.mixers.gdn import DEFAULTS as GDN_DEFAULTS
from jaxmix.mixers.gdn import GatedDeltaNet, dims, log_decay
from jaxmix.mixers.gdn import check_config as gdn_check_config
from jaxmix.nn import DenseGeneral, compute_dtype, param_with_axes, torch_linear_init

DEFAULTS = dict(GDN_DEFAULTS, n_memories=4, top_k=2, shared_memory=True, aux_weight=0.01)
_CONV = ("batch", None, "mlp")
CACHE_AXES = {
    "routed": {"conv_q": (None,) + _CONV, "conv_k": (None,) + _CONV,
               "conv_v": (None,) + _CONV, "state": (None, "batch", "heads", None, None)},
    "shared": {"conv_q": _CONV, "conv_k": _CONV, "conv_v": _CONV,
               "state": ("batch", "heads", None, None)}}


def check_config(cfg, where="model.mixers.mom"):
    gdn_check_config(cfg, where)
    if cfg.n_memories < 1:
        raise ConfigError(f"{where}.n_memories={cfg.n_memories} must be positive")
    if not 1 <= cfg.top_k <= cfg.n_memories:
        raise ConfigError(f"{where}.top_k={cfg.top_k} is larger than the "
                          f"{cfg.n_memories} memories (or below 1)")


def per_memory_init(key, shape, dtype=jnp.float32):
    """torch Linear's init for each memory's [D, width] kernel of a [M, D, width] stack."""
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: torch_linear_init(k, shape[1:], dtype))(keys)


def compact(mask_BL):
    """(order [B, L]: the positions with mask first, each group in sequence order;
    count [B]: how many have it)."""
    length = mask_BL.shape[1]
    pos = jnp.arange(length)
    order = jnp.argsort(jnp.where(mask_BL, pos, length + pos), axis=1)
    return order, jnp.sum(mask_BL, axis=1)


def conv_with_window(x_NLC, w_KC, ctx_NKC, count_N, segment_ids=None):
    """SiLU(causal conv) of compacted sequences after their windows, and the new
    windows: the last K-1 real inputs (old window entries when fewer came). With
    `segment_ids` [N, L] (training: the windows are zeros) the conv stays inside each
    segment."""
    width = w_KC.shape[0]
    ctx = None if segment_ids is not None else ctx_NKC
    y = jax.nn.silu(parallel.causal_conv(x_NLC, w_KC, None, ctx, segment_ids=segment_ids))
    both = jnp.concatenate([ctx_NKC.astype(x_NLC.dtype), x_NLC], axis=1)
    idx = count_N[:, None] + jnp.arange(width - 1)
    return y, jnp.take_along_axis(both, idx[..., None], axis=1)


class MoM(GatedDeltaNet):
    """Gated DeltaNet's pieces (conv weights, decay, gated output) over M memories."""
    DEFAULTS = DEFAULTS
    check_config = staticmethod(check_config)

    def memory_proj(self, x_BLD, width, name, n):
        """[n, B, L, width]: n projections of x (kernel [n, D, width])."""
        w = param_with_axes(self, name, per_memory_init, (n, x_BLD.shape[-1], width),
                            (None, "embed", "mlp"))
        dtype = compute_dtype(self.cfg)
        return jnp.einsum("bld,ndw->nblw", x_BLD.astype(dtype), w.astype(dtype))

    def memories(self, inputs, weights, order_NL, count_N, cache, segment_ids, decode):
        """The delta rule over N compacted sequences: inputs {q, k, v: [N, L, width],
        a, b: [N, L, H]} in sequence order, `order`/`count` from `compact`. Returns
        (outputs [N, L, H, d_v] back in sequence order, new cache entry)."""
        cfg = self.cfg
        h, d_k, d_v = dims(cfg)
        n, length = order_NL.shape
        take = lambda x: jnp.take_along_axis(x, order_NL.reshape(
            (n, length) + (1,) * (x.ndim - 2)), axis=1)
        real = jnp.arange(length)[None] < count_N[:, None]              # [N, L]
        seg = None if segment_ids is None else take(segment_ids)
        new = {}
        qkv = []
        for name in ("q", "k", "v"):
            y, new[f"conv_{name}"] = conv_with_window(
                take(inputs[name]), weights[name], cache[f"conv_{name}"], count_N,
                None if decode else seg)
            qkv.append(y.reshape(n, length, h, -1))
        a, b = take(inputs["a"]), take(inputs["b"])
        g = jnp.where(real[..., None], log_decay(a, *weights["decay"]), 0.0)
        beta = jnp.where(real[..., None], jax.nn.sigmoid(b), 0.0)
        # Training: sequence-parallel over the mesh's `sequence` axis when it is > 1
        # (each compacted stream is a sequence like any other).
        delta_rule = ops.gated_delta_rule if decode else parallel.sequence_parallel_gated_delta_rule
        o, new["state"] = delta_rule(*qkv, g, beta, initial_state=cache["state"],
                                     segment_ids=seg, impl=cfg.delta_impl,
                                     chunk_size=cfg.chunk_size)
        back = jnp.argsort(order_NL, axis=1)                            # inverse permutation
        return jnp.take_along_axis(o, back[..., None, None], axis=1), new

    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
                 train=False):
        del positions, train
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        bsz, length, _ = x_BLD.shape
        h, d_k, d_v = dims(cfg)
        m, top = cfg.n_memories, cfg.top_k
        if cache is None:
            cache = self.init_cache(bsz, 0, dtype)

        logits = DenseGeneral(m, ("embed", None), dtype=dtype, name="router")(x_BLD)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)      # [B, L, M]
        top_p, top_i = jax.lax.top_k(probs, top)
        top_w = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        chosen = jax.nn.one_hot(top_i, m, dtype=jnp.float32)            # [B, L, K, M]
        weight_BLM = jnp.einsum("blk,blkm->blm", top_w, chosen)
        f_KM = jnp.mean(chosen.reshape(-1, top, m), axis=0)
        aux = {"load_balance_loss": m * jnp.sum(f_KM * jnp.mean(probs.reshape(-1, m), 0))}

        weights = {name: self.conv_weight(name, width).astype(dtype)
                   for name, width in (("q", h * d_k), ("k", h * d_k), ("v", h * d_v))}
        weights["decay"] = self.decay_params(h)
        q = DenseGeneral(h * d_k, ("embed", "mlp"), dtype=dtype, name="q_proj")(x_BLD)

        # Routed memories: M x B compacted sequences in one batch.
        mask_MBL = jnp.moveaxis(weight_BLM > 0, 2, 0)
        order, count = compact(mask_MBL.reshape(m * bsz, length))
        per_memory = {"q": jnp.broadcast_to(q, (m,) + q.shape),
                      "k": self.memory_proj(x_BLD, h * d_k, "k_proj", m),
                      "v": self.memory_proj(x_BLD, h * d_v, "v_proj", m),
                      "a": self.memory_proj(x_BLD, h, "a_proj", m).astype(jnp.float32),
                      "b": self.memory_proj(x_BLD, h, "b_proj", m).astype(jnp.float32)}
        flat = lambda x: x.reshape((m * bsz,) + x.shape[2:])
        routed_cache = jax.tree.map(flat, cache["routed"])
        seg = None if segment_ids is None else jnp.tile(segment_ids, (m, 1))
        o, new_routed = self.memories({k: flat(v) for k, v in per_memory.items()}, weights,
                                      order, count, routed_cache, seg, decode)
        o_MBLHV = o.reshape(m, bsz, length, h, d_v)
        o_BLHV = jnp.einsum("mblhv,blm->blhv", o_MBLHV, weight_BLM)
        new_cache = {"routed": jax.tree.map(
            lambda x: x.reshape((m, bsz) + x.shape[1:]), new_routed)}

        if cfg.shared_memory:
            shared = {"q": q,
                      "k": DenseGeneral(h * d_k, ("embed", "mlp"), dtype=dtype,
                                        name="shared_k_proj")(x_BLD),
                      "v": DenseGeneral(h * d_v, ("embed", "mlp"), dtype=dtype,
                                        name="shared_v_proj")(x_BLD),
                      "a": DenseGeneral(h, ("embed", None), dtype=dtype,
                                        name="shared_a_proj")(x_BLD).astype(jnp.float32),
                      "b": DenseGeneral(h, ("embed", None), dtype=dtype,
                                        name="shared_b_proj")(x_BLD).astype(jnp.float32)}
            order_s, count_s = compact(jnp.ones((bsz, length), bool))
            o_s, new_cache["shared"] = self.memories(shared, weights, order_s, count_s,
                                                     cache["shared"], segment_ids, decode)
            o_BLHV = o_BLHV + o_s
        else:
            new_cache["shared"] = cache["shared"]

        return self.output(o_BLHV, x_BLD), (new_cache if decode else None), aux

    def init_cache(self, batch, max_len, dtype=jnp.float32):
        """Every memory's conv windows and state, and the shared memory's (fixed size)."""
        del max_len
        h, d_k, d_v = dims(self.cfg)
        k = self.cfg.d_conv - 1

        def one(*lead):
            return {"conv_q": jnp.zeros(lead + (batch, k, h * d_k), dtype),
                    "conv_k": jnp.zeros(lead + (batch, k, h * d_k), dtype),
                    "conv_v": jnp.zeros(lead + (batch, k, h * d_v), dtype),
                    "state": jnp.zeros(lead + (batch, h, d_k, d_v), jnp.float32)}
        return {"routed": one(self.cfg.n_memories), "shared": one()}

    def cache_axes(self):
        return CACHE_AXES
