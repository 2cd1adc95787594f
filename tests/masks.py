"""Expected attention for the tests, written independently of jaxmix's mask code.

`visible` spells the masking rules out element by element in plain Python (no
broadcasting, no shared helper with jaxmix.ops), and `masked_attention` is a dense
softmax over a given boolean mask. Tests compare every implementation, decode path
and ring schedule against these, so an off-by-one in jaxmix's own masks (causal,
window, sink, segments, bottom-right alignment when L != S) cannot cancel out.
"""
import jax
import jax.numpy as jnp
import numpy as np


def visible(batch, q_len, kv_len, *, causal=False, window=None, sink=0, q_seg=None,
            kv_seg=None, q_pos=None, kv_pos=None):
    """bool [B, L, S]: whether query l may attend to key s.

    Positions default to bottom-right alignment: query l sits at l + S - L, key s at s.
    Rules: causal -> key position <= query position; window W -> additionally the key
    is one of the W latest (query position - key position < W) unless it is one of
    the first `sink` positions; segments -> equal segment ids."""
    out = np.zeros((batch, q_len, kv_len), bool)
    for b in range(batch):
        for i in range(q_len):
            p = int(q_pos[b][i]) if q_pos is not None else i + kv_len - q_len
            for j in range(kv_len):
                t = int(kv_pos[b][j]) if kv_pos is not None else j
                ok = True
                if causal or window:
                    ok = t <= p
                if ok and window:
                    ok = (p - t < window) or (t < sink)
                if ok and q_seg is not None:
                    ok = int(q_seg[b][i]) == int(kv_seg[b][j])
                out[b, i, j] = ok
    return out


def masked_attention(q, k, v, mask_BLS, scale=None):
    """Dense fp32 softmax attention under an explicit mask: q [B, L, Hq, D], k/v
    [B, S, Hkv, D], mask [B, L, S] or per head [B, Hq, L, S] -> (out [B, L, Hq, D],
    lse [B, Hq, L]). Rows with no visible key give 0 and lse -inf. Differentiable."""
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    k = jnp.repeat(k.astype(jnp.float32), hq // hkv, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), hq // hkv, axis=2)
    s = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k) * scale
    mask = jnp.asarray(mask_BLS)
    mask = mask[:, None] if mask.ndim == 3 else mask
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s, -1e30), axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    den = p.sum(-1, keepdims=True)
    out = jnp.einsum("bhls,bshd->blhd", p / jnp.where(den == 0, 1.0, den), v)
    lse = jnp.where(den[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(jnp.where(
        den[..., 0] == 0, 1.0, den[..., 0])))
    return out.astype(q.dtype), lse


def masked_attend(**mask_kw):
    """A stand-in for `Attention.attend` (monkeypatched in) that attends with
    `masked_attention` under `visible(..., **mask_kw)`: a mixer's forward through the
    same projections, with jaxmix's attention replaced by the independent one."""
    def attend(self, q, k, v, *args, **kwargs):
        mask = visible(q.shape[0], q.shape[1], k.shape[1], **mask_kw)
        return masked_attention(q, k, v, mask)[0], None
    return attend
