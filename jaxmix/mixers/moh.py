"""Mixture-of-Head attention (MoH): attention heads as experts.

The first `shared_heads` query heads are always on; a router picks `top_k` of the other
n_heads - shared_heads ("routed") heads per token; the heads' outputs are summed with
per-token gates before o_proj:  y = o_proj(concat_h(g_h * head_h)).

Gates (`gating`):
  "official"  as the authors' training code: shared gates softmax(x W_s) * shared_heads
              (the constant 1 for one shared head), routed gates softmax(x W_r)
              restricted to the top-k and renormalised over them, times top_k, and a
              two-way router softmax(x W_m) * 2 scaling the shared and the routed group.
              All-zero router weights give every active head the gate 1.
  "paper"     the paper's Eq. 5-6: alpha_1 * softmax(x W_s), alpha_2 * softmax(x W_r)
              over all routed logits (not renormalised), [alpha_1, alpha_2] = softmax(x W_m).
Routers (`router`):
  "learned"     bias-free linear routers router_shared [D, h_s] (when h_s > 1),
                router_routed [D, h_r], router_mix [D, 2] (when both groups exist).
  "query_norm"  parameter-free, for converting a dense attention model: the score of a
                routed head is the L2 norm of its query before rotary embeddings,
                divided by the standard deviation of those norms over the routed heads;
                the gates are 0/1 (the top-k mask) with a straight-through estimator (the
                backward pass sees the softmax of the scores). No new weights, so the
                params of a dense attention layer load unchanged.
Load balance over the routed heads, returned as aux "load_balance_loss" (added to the
training loss times `aux_weight`, averaged over the MoH layers): with P_i the mean
router probability of routed head i over the batch's tokens and f_i the fraction of
tokens that select it, E * sum_i P_i f_i (E = routed heads; the official code's form,
equal to top_k at uniform routing) or, with gating="paper", sum_i P_i f_i (Eq. 7, top_k
/ E at uniform routing).

Training and prefill compute every head (as the official code does) and weight them.
A single decoded token computes only its active heads: their queries, and the cached
keys/values of their KV heads, are gathered for the plain fp32 softmax that decodes one
token (`ops.decode_attention`, as dense attention uses), so a step with half the heads
active does about half the attention work.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import ops
from jaxmix.ops.attention import mask_of
from jaxmix.errors import ConfigError
from jaxmix.mixers.attention import DEFAULTS as ATTENTION_DEFAULTS
from jaxmix.mixers.attention import check_config as check_attention
from jaxmix.mixers.attention import Attention, head_shape, rotary
from jaxmix.nn import DenseGeneral, compute_dtype, constrain

DEFAULTS = dict(ATTENTION_DEFAULTS, shared_heads=2, top_k=1, gating="official",
                router="learned", aux_weight=0.01)
EPS = 1e-9  # floor of the renormalising sum (the official code clamps it the same way)


def check_config(cfg, where="model.mixers.moh"):
    """One-line errors for head budgets and options that cannot work."""
    check_attention(cfg, where)
    hq, _, _ = head_shape(cfg)
    hs, k = cfg.shared_heads, cfg.top_k
    if not 0 <= hs <= hq:
        raise ConfigError(f"{where}.shared_heads={hs} must be between 0 and n_heads={hq}")
    if k < 0 or k > hq - hs:
        raise ConfigError(f"{where}.top_k={k} is larger than the {hq - hs} routed heads "
                          f"(n_heads={hq} - shared_heads={hs})")
    if hs + k == 0:
        raise ConfigError(f"{where}: shared_heads + top_k = 0 activates no head; "
                          f"set shared_heads or top_k")
    if k == 0 and hs < hq:
        raise ConfigError(f"{where}: top_k=0 leaves the {hq - hs} routed heads unused; "
                          f"set shared_heads={hq} for dense weighted heads, or top_k > 0")
    if cfg.gating not in ("official", "paper"):
        raise ConfigError(f"{where}.gating={cfg.gating!r}: use 'official' or 'paper'")
    if cfg.router not in ("learned", "query_norm"):
        raise ConfigError(f"{where}.router={cfg.router!r}: use 'learned' or 'query_norm'")
    if cfg.router == "query_norm" and hq - hs < 2:
        raise ConfigError(f"{where}: router='query_norm' needs at least 2 routed heads "
                          f"(it divides by their standard deviation)")


def load_balance(probs_TE, mask_TE, scale_by_experts):
    """sum_i P_i f_i over the routed heads (times E with `scale_by_experts`)."""
    n = probs_TE.shape[-1]
    p_E = jnp.mean(probs_TE.reshape(-1, n), axis=0)
    f_E = jnp.mean(mask_TE.reshape(-1, n), axis=0)
    return jnp.sum(p_E * f_E) * (n if scale_by_experts else 1.0)


class MoH(Attention):
    DEFAULTS = DEFAULTS
    DUO = False
    # Parameters a dense attention layer lacks; zeros make every active gate 1.
    ZERO_PARAMS = ("router_shared", "router_routed", "router_mix")
    check_config = staticmethod(check_config)

    def router(self, n, name, x_BLD):
        return DenseGeneral(n, ("embed", None), dtype=compute_dtype(self.cfg),
                            name=name)(x_BLD).astype(jnp.float32)

    def gates(self, x_BLD, q_BLHD):
        """(gates [B, L, H] fp32, routed top-k indices [B, L, K] or None, aux)."""
        cfg = self.cfg
        hq, hs, k = q_BLHD.shape[2], cfg.shared_heads, cfg.top_k
        hr, official, learned = hq - hs, cfg.gating == "official", cfg.router == "learned"
        lead = x_BLD.shape[:2]
        groups, top_idx, aux = [], None, {}
        if hs:
            if learned and hs > 1:
                g_s = jax.nn.softmax(self.router(hs, "router_shared", x_BLD), axis=-1)
                g_s = g_s * hs if official else g_s
            else:  # one shared head (official: 1 * h_s; paper: a softmax over one) or 0/1
                g_s = jnp.ones(lead + (hs,), jnp.float32)
            groups.append(g_s)
        if hr:
            if learned:
                scores = self.router(hr, "router_routed", x_BLD)
            else:  # pre-rotary query norms, standardised over the routed heads
                norms = jnp.linalg.norm(q_BLHD[:, :, hs:].astype(jnp.float32), axis=-1)
                scores = norms / jnp.std(norms, axis=-1, keepdims=True, ddof=1)
            probs = jax.nn.softmax(scores, axis=-1)
            _, top_idx = jax.lax.top_k(probs, k)
            mask = jnp.sum(jax.nn.one_hot(top_idx, hr, dtype=jnp.float32), axis=-2)
            if not learned:  # 0/1 gates, straight-through gradient to the scores
                g_r = mask + probs - jax.lax.stop_gradient(probs)
            elif official:
                kept = probs * mask
                g_r = kept / jnp.maximum(jnp.sum(kept, -1, keepdims=True), EPS) * k
            else:
                g_r = probs * mask
            aux["load_balance_loss"] = load_balance(probs, mask, official)
            groups.append(g_r)
        if learned and hs and hr:
            alpha = jax.nn.softmax(self.router(2, "router_mix", x_BLD), axis=-1)
            alpha = alpha * 2 if official else alpha
            groups = [groups[0] * alpha[..., :1], groups[1] * alpha[..., 1:]]
        g_BLH = constrain(jnp.concatenate(groups, axis=-1), ("batch", "length", "heads"))
        return g_BLH, top_idx, aux

    def attend_active(self, q_BHD, g_BH, top_idx_BK, cache):
        """One decoded token, its active heads only: [B, H, D] outputs, zero (and gate
        0) for the heads it does not activate. The active heads' cached keys and values
        are gathered head-major ([B, A, S, D], whole [S, D] slices) for
        ops.decode_attention (each active head as its own KV head)."""
        cfg = self.cfg
        bsz, hq, hd = q_BHD.shape
        hkv = cache["k"].shape[2]
        heads_BA = jnp.concatenate(
            [jnp.broadcast_to(jnp.arange(cfg.shared_heads), (bsz, cfg.shared_heads)),
             cfg.shared_heads + top_idx_BK], axis=-1).astype(jnp.int32)
        rows_B1 = jnp.arange(bsz)[:, None]
        kv_BA = heads_BA // (hq // hkv)
        k_BASD = cache["k"][rows_B1, :, kv_BA]  # advanced indices first: [B, A, S, D]
        v_BASD = cache["v"][rows_B1, :, kv_BA]
        q_BA1D = q_BHD[rows_B1, heads_BA][:, :, None]
        q_pos = jnp.broadcast_to(cache["index"] - 1, (bsz, 1)).astype(jnp.int32)
        mask_BS = mask_of(q_pos, self.cache_positions(cache), None, None, True,
                          cfg.sliding_window or None, cfg.sink)[:, 0]
        o_BAD = ops.decode_attention(q_BA1D, k_BASD, v_BASD, mask_BS)[:, :, 0]
        g_BA = jnp.take_along_axis(g_BH, heads_BA, axis=1)
        o_BAD = o_BAD * g_BA[..., None].astype(o_BAD.dtype)
        return jnp.zeros((bsz, hq, hd), o_BAD.dtype).at[rows_B1, heads_BA].set(o_BAD)

    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
                 train=False):
        del train  # the routers are deterministic
        cfg = self.cfg
        bsz, length, _ = x_BLD.shape
        q_BLHD, k_BLKD, v_BLKD = self.project(x_BLD)
        g_BLH, top_idx, aux = self.gates(x_BLD, q_BLHD)
        if decode and cache is None:
            cache = self.init_cache(bsz, cfg.max_cache_len, compute_dtype(cfg))
        q_pos_BL, rope_pos = self.positions(bsz, length, positions, cache, decode)
        q_BLHD = rotary(q_BLHD, rope_pos, cfg.rope_theta)
        k_BLKD = rotary(k_BLKD, rope_pos, cfg.rope_theta)
        if decode and length == 1 and top_idx is not None:
            new_cache = self.write_cache(cache, k_BLKD, v_BLKD)
            o_BHD = self.attend_active(q_BLHD[:, 0], g_BLH[:, 0], top_idx[:, 0], new_cache)
            o_BLHD = o_BHD[:, None]
        else:
            o_BLHD, new_cache = self.attend(q_BLHD, k_BLKD, v_BLKD, q_pos_BL, segment_ids,
                                            cache, decode)
            o_BLHD = o_BLHD * g_BLH[..., None].astype(o_BLHD.dtype)
        return self.project_out(o_BLHD), new_cache, aux
