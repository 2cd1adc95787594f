"""The baseline of bench_mamba_step: the same Mamba LM (same params tree) written
straightforwardly, its scan a lax.scan over time with jax.checkpoint on every step."""
import jax
import jax.numpy as jnp

from jaxmix.parallel import causal_conv


def naive_scan(u_BLI, delta_BLI, A_IN, B_BLN, C_BLN):
    step_fn = jax.checkpoint(lambda h, x: _naive_step(A_IN, h, x))
    h0 = jnp.zeros(u_BLI.shape[:1] + A_IN.shape, jnp.float32)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u_BLI, delta_BLI, B_BLN, C_BLN))
    _, y_LBI = jax.lax.scan(step_fn, h0, xs)
    return jnp.moveaxis(y_LBI, 0, 1)


def _naive_step(A_IN, h_BIN, x):
    u, dl, b, c = x
    h_BIN = jnp.exp(dl[..., None] * A_IN) * h_BIN + (dl * u)[..., None] * b[:, None, :]
    return h_BIN, jnp.einsum("bin,bn->bi", h_BIN, c)


def rms(x, w, eps=1e-5):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def naive_forward(params, tokens_BL, cfg):
    p = params["params"]
    emb = p["embed"]["embedding"]
    x = emb[tokens_BL]
    n = cfg.mixers.mamba.d_state
    for i in range(cfg.n_layers):
        lp = p[f"layers_{i}"]
        m = lp["mixer"]
        h = rms(x, lp["norm"]["scale"])
        xz = jnp.einsum("bld,dki->blki", h, m["in_proj"])
        xi, z = xz[:, :, 0], xz[:, :, 1]
        xi = jax.nn.silu(causal_conv(xi, m["conv_weight"], m["conv_bias"]))
        dbl = xi @ m["x_proj"]["kernel"]
        r = dbl.shape[-1] - 2 * n
        dt, B, C = jnp.split(dbl, [r, r + n], axis=-1)
        delta = jax.nn.softplus(dt @ m["dt_proj_kernel"] + m["dt_proj_bias"])
        y = naive_scan(xi, delta, -jnp.exp(m["A_log"]), B, C)
        y = (y + xi * m["D"]) * jax.nn.silu(z)
        x = x + y @ m["out_proj"]
    x = rms(x, p["norm_f"]["scale"])
    return x @ emb.T
