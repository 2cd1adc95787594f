"""Float64 NumPy oracles for tests: written from the papers' definitions, sharing no code
with jaxmix, so that a convention both sides of a jaxmix-vs-jaxmix comparison get wrong
the same way (a scale, a normalisation, a reset) still shows.

Every function takes and returns NumPy arrays and computes in float64.
"""
import numpy as np

L2_EPS = 1e-6  # x / sqrt(sum x^2 + eps), the l2norm of the Gated DeltaNet kernels


def l2norm(x, eps=L2_EPS):
    """x divided by sqrt(sum of squares over the last axis + eps), float64."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None,
                     normalize_qk=True, scale=None):
    """The gated delta rule as Gated DeltaNet (Yang et al. 2024, Eq. 10) writes it, with
    the memory M [d_v, d_k] mapping keys to values:

        M_t = M_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T,  o_t = M_t q_t,

    alpha_t = exp(g_t) (g is the log decay). q, k [B, L, H, d_k], v [B, L, H, d_v],
    g, beta [B, L, H]. With `normalize_qk` q and k are L2-normalised over d_k first; q
    is then multiplied by `scale` (default d_k^-1/2). `segment_ids` [B, L]: M restarts
    from zero at every token whose id differs from the token before it; the initial
    state applies to the first segment. States are given and returned as
    [B, H, d_k, d_v] (M transposed). Returns (o [B, L, H, d_v], final state), float64.
    """
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    b, length, h, d_k = q.shape
    d_v = v.shape[-1]
    if normalize_qk:
        q, k = l2norm(q), l2norm(k)
    q = q * (d_k ** -0.5 if scale is None else float(scale))
    eye = np.eye(d_k)
    o = np.zeros((b, length, h, d_v))
    final = np.zeros((b, h, d_k, d_v))
    for row in range(b):
        for head in range(h):
            m = (np.zeros((d_v, d_k)) if initial_state is None
                 else np.asarray(initial_state, np.float64)[row, head].T.copy())
            for t in range(length):
                if (segment_ids is not None and t > 0
                        and segment_ids[row][t] != segment_ids[row][t - 1]):
                    m = np.zeros((d_v, d_k))
                kt, vt = k[row, t, head], v[row, t, head]
                a, bt = np.exp(g[row, t, head]), beta[row, t, head]
                m = m @ (a * (eye - bt * np.outer(kt, kt))) + bt * np.outer(vt, kt)
                o[row, t, head] = m @ q[row, t, head]
            final[row, head] = m.T
    return o, final


def softmax(x, axis=-1):
    """exp(x - max) normalised over `axis`, float64."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def cross_entropy(logits, labels):
    """-log softmax(logits)[label] over the last axis, per position (float64)."""
    logp = log_softmax(logits)
    labels = np.asarray(labels)
    return -np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def moh_gates(x, w_shared, w_routed, w_mix, shared_heads, top_k, gating):
    """Per-token head gates [..., H] of Mixture-of-Head attention from routers with
    weights w_shared [D, h_s] (None: one shared head), w_routed [D, h_r] and w_mix
    [D, 2] (None when a group is empty), token by token.

    "paper" (MoH Eq. 5-6): g_shared = a1 softmax(x W_s), g_routed = a2 softmax(x W_r)
    on the top-k routed heads and 0 elsewhere (softmax over all routed logits, no
    renormalisation), [a1, a2] = softmax(x W_m).
    "official" (the authors' training code): g_shared = h_s softmax(x W_s) (1 for a
    single shared head), g_routed = k p / sum_{top-k} p on the top-k routed heads
    (p = softmax(x W_r)), [a1, a2] = 2 softmax(x W_m).
    """
    x = np.asarray(x, np.float64)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    out = []
    for xt in flat:
        parts = []
        if shared_heads:
            if w_shared is None:
                gs = np.ones(shared_heads)
            else:
                gs = softmax(xt @ np.asarray(w_shared, np.float64))
                if gating == "official":
                    gs = gs * shared_heads
            parts.append(gs)
        if w_routed is not None:
            p = softmax(xt @ np.asarray(w_routed, np.float64))
            chosen = np.argsort(-p, kind="stable")[:top_k]
            gr = np.zeros_like(p)
            if gating == "official":
                gr[chosen] = p[chosen] / p[chosen].sum() * top_k
            else:
                gr[chosen] = p[chosen]
            parts.append(gr)
        if w_mix is not None:
            a = softmax(xt @ np.asarray(w_mix, np.float64))
            if gating == "official":
                a = a * 2
            parts = [parts[0] * a[0], parts[1] * a[1]]
        out.append(np.concatenate(parts))
    return np.stack(out).reshape(lead + (-1,))
