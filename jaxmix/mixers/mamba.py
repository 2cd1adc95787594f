"""Mamba-1 mixer (selective state space), following mamba_ssm's Mamba block.

in_proj -> (x, z); x -> causal depthwise conv1d -> SiLU -> x_proj -> (dt, B, C);
dt -> dt_proj; y = selective_scan(x, dt, -exp(A_log), B, C, D, z, dt_bias, softplus);
out_proj(y). Weight names match the reference so checkpoints convert 1:1.
Packed documents: `segment_ids` [B, L] stop the conv and the scan at document
boundaries (a tap or state from another segment never reaches a token), so every
document sees only its own tokens, as if run alone.

Decoding: with `decode=True` the layer continues from `cache` (or from zeros):
cache = {"conv": [B, d_conv - 1, d_inner] last inputs, "ssm": [B, d_inner, N]}.
A prompt (prefill) runs the scan from the cached state; a single new token runs one
plain step of the recurrence (`ops.selective_state_update`, no kernel).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import ops, parallel
from jaxmix.nn import (DenseGeneral, compute_dtype, constrain, linear,
                                  matrix_init, param_with_axes, scaled_init,
                                  torch_linear_init)


# dt_rank 0: ceil(d_model / 16); proj_bias: HF MambaConfig.use_bias (mamba_ssm: False).
DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank=0, scan_impl="auto", proj_bias=False)
CACHE_AXES = {"conv": ("batch", None, "mlp"), "ssm": ("batch", "mlp", "state")}


def dt_rank_of(cfg):
    return cfg.get("dt_rank", 0) or math.ceil(cfg.d_model / 16)


def a_log_init(key, shape, dtype=jnp.float32):
    """A_log[d, n] = log(n + 1): A = -(1..N) for every channel (S4D-real)."""
    del key
    return jnp.log(jnp.broadcast_to(jnp.arange(1, shape[1] + 1, dtype=dtype), shape))


def dt_bias_init(dt_min=1e-3, dt_max=1e-1, floor=1e-4):
    """inverse_softplus(dt), dt log-uniform in [dt_min, dt_max] clamped at `floor`."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, dtype)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return dt + jnp.log(-jnp.expm1(-dt))
    return init


def uniform_init(bound):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Mamba(nn.Module):
    cfg: Any
    DEFAULTS = DEFAULTS
    CAUSAL = True
    FIXED_SIZE_CACHE = True  # init_cache ignores max_len: conv window and SSM state

    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
                 train=False):
        del positions, train
        x_BLI, z_BLI = in_projection(self, x_BLD)
        if decode and cache is None:
            cache = self.init_cache(x_BLD.shape[0], 0, x_BLD.dtype)
        y_BLI, conv_state, ssm_state = selective_branch(
            self, x_BLI, z_BLI, cache=cache if decode else None,
            segment_ids=None if decode else segment_ids)
        y_BLD = out_projection(self, y_BLI, x_BLD.shape[-1])
        new_cache = {"conv": conv_state, "ssm": ssm_state} if decode else None
        return y_BLD, new_cache, {}

    def init_cache(self, batch, max_len, dtype=jnp.float32):
        """The conv window and SSM state: constant size, whatever `max_len` (logical
        axes: CACHE_AXES)."""
        del max_len
        cfg = self.cfg
        d_inner = cfg.expand * cfg.d_model
        return {"conv": jnp.zeros((batch, cfg.d_conv - 1, d_inner), dtype),
                "ssm": jnp.zeros((batch, d_inner, cfg.d_state), jnp.float32)}

    def cache_axes(self):
        return CACHE_AXES


def in_projection(module, x_BLD, suffix=""):
    """in_proj (d_model -> 2 x d_inner, d_inner = cfg.d_inner or expand x d_model): (x, z),
    each [B, L, d_inner] in the compute dtype. torch nn.Linear(d_model, 2 * d_inner)'s init: the fan-in is d_model."""
    cfg = module.cfg
    dtype = compute_dtype(cfg)
    d_model = x_BLD.shape[-1]
    d_inner = cfg.get("d_inner", 0) or cfg.expand * d_model
    w_in = param_with_axes(module, "in_proj" + suffix, matrix_init(torch_linear_init),
                           (d_model, 2, d_inner), ("embed", None, "mlp"))
    # Two [d_model, d_inner] products: each half of the weight keeps its "mlp" sharding.
    h_BLD, w_in = x_BLD.astype(dtype), w_in.astype(dtype)
    x_BLI, z_BLI = linear(h_BLD, w_in[:, 0]), linear(h_BLD, w_in[:, 1])
    if cfg.get("proj_bias", False):  # HF MambaConfig.use_bias (mamba_ssm: False)
        b_in = param_with_axes(module, "in_proj_bias" + suffix, nn.initializers.zeros,
                               (2, d_inner), (None, "mlp")).astype(dtype)
        x_BLI, z_BLI = x_BLI + b_in[0], z_BLI + b_in[1]
    return (constrain(x_BLI, ("batch", "length", "mlp")),
            constrain(z_BLI, ("batch", "length", "mlp")))


def out_projection(module, y_BLI, d_model, suffix=""):
    """out_proj (d_inner -> d_model), initialised scaled by 1/sqrt(n_layers)."""
    cfg = module.cfg
    dtype = compute_dtype(cfg)
    w_out = param_with_axes(module, "out_proj" + suffix,
                            scaled_init(torch_linear_init, cfg.n_layers),
                            (y_BLI.shape[-1], d_model), ("mlp", "embed"))
    y_BLD = linear(y_BLI.astype(dtype), w_out.astype(dtype))
    if cfg.get("proj_bias", False):
        y_BLD = y_BLD + param_with_axes(module, "out_proj_bias" + suffix,
                                        nn.initializers.zeros, (d_model,),
                                        ("embed",)).astype(dtype)
    return y_BLD


def selective_branch(module, x_BLI, z_BLI, *, suffix="", reverse=False, cache=None,
                     segment_ids=None):
    """One direction of the block: depthwise conv1d -> SiLU -> x_proj -> (dt, B, C) ->
    dt_proj -> selective scan gated by silu(z). Its parameters are named with `suffix`
    (the backward direction of a bidirectional block: "_b"). `reverse` runs the conv
    anti-causally and the scan from the last position to the first (flags of the ops,
    no flipped copies). With `cache` (decoding, forward only) the conv continues from
    the cached inputs and the scan from the cached state. `segment_ids` [B, L] (not
    with a cache) keep the conv and the scan inside each packed document. Returns
    (y [B, L, d_inner], conv state or None, last SSM state)."""
    cfg = module.cfg
    dtype = compute_dtype(cfg)
    d_inner, n = x_BLI.shape[-1], cfg.d_state
    k, r = cfg.get("d_conv", 4), dt_rank_of(cfg)
    conv_bound = 1.0 / math.sqrt(k)  # torch Conv1d default, fan_in = k (depthwise)
    w_conv = param_with_axes(module, "conv_weight" + suffix, uniform_init(conv_bound),
                             (k, d_inner), (None, "mlp")).astype(dtype)
    b_conv = param_with_axes(module, "conv_bias" + suffix, uniform_init(conv_bound),
                             (d_inner,), ("mlp",)).astype(dtype)
    conv_state = None
    if cache is not None:
        ctx_BKI = cache["conv"].astype(dtype)
        x_all = jnp.concatenate([ctx_BKI, x_BLI], axis=1)
        conv_state = x_all[:, x_all.shape[1] - (k - 1):]   # the last k-1 inputs
        x_BLI = parallel.causal_conv(x_BLI, w_conv, b_conv, ctx_BKI)
    else:
        # Under a mesh with `sequence` > 1: the explicit halo exchange (one ppermute).
        x_BLI = parallel.sequence_parallel_causal_conv(x_BLI, w_conv, b_conv, reverse=reverse,
                                                       segment_ids=segment_ids)
    x_BLI = jax.nn.silu(x_BLI)

    x_dbl = DenseGeneral(r + 2 * n, ("mlp", None), dtype=dtype, name="x_proj" + suffix)(x_BLI)
    dt_BLR, B_BLN, C_BLN = jnp.split(x_dbl, [r, r + n], axis=-1)
    dt_w = param_with_axes(module, "dt_proj_kernel" + suffix, uniform_init(r ** -0.5),
                           (r, d_inner), (None, "mlp"))
    dt_b = param_with_axes(module, "dt_proj_bias" + suffix, dt_bias_init(), (d_inner,),
                           ("mlp",))
    dt_BLI = linear(dt_BLR, dt_w.astype(dtype))
    A_log = param_with_axes(module, "A_log" + suffix, a_log_init, (d_inner, n),
                            ("mlp", "state"))
    D = param_with_axes(module, "D" + suffix, nn.initializers.ones, (d_inner,), ("mlp",))
    if cache is not None and x_BLI.shape[1] == 1:  # one new token: one recurrence step
        y_BI, ssm_state = ops.selective_state_update(
            cache["ssm"], x_BLI[:, 0], dt_BLI[:, 0], -jnp.exp(A_log), B_BLN[:, 0],
            C_BLN[:, 0], D, z_BLI[:, 0], delta_bias=dt_b, delta_softplus=True)
        y_BLI = y_BI[:, None]
    else:
        # Sequence-parallel over the mesh's `sequence` axis when it is > 1 (training);
        # a prefill continues one device's state.
        decode = cache is not None
        scan = ops.selective_scan if decode else parallel.sequence_parallel_selective_scan
        extra = {} if decode else {"reverse": reverse, "segment_ids": segment_ids}
        y_BLI, ssm_state = scan(
            x_BLI, dt_BLI, -jnp.exp(A_log), B_BLN, C_BLN, D, z_BLI, delta_bias=dt_b,
            delta_softplus=True, initial_state=cache["ssm"] if decode else None,
            return_last_state=True, impl=cfg.get("scan_impl", "auto"), **extra)
    return constrain(y_BLI, ("batch", "length", "mlp")), conv_state, ssm_state
