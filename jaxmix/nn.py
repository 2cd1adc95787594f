"""Small shared layers below the mixers and models: RMSNorm, SwiGLU MLP, dense layers with
logical axes, initialisers, activation-sharding helpers."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import cpu

# torch.nn.Linear's default init: U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def param_with_axes(module, name, init, shape, axes, dtype=jnp.float32):
    """A parameter carrying logical axis names (used to derive shardings)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x, axes):
    """Activation sharding constraint by logical names (no-op without rules/mesh)."""
    return nn.with_logical_constraint(x, axes)


def compute_dtype(cfg):
    return jnp.dtype(cfg.get("dtype", "float32"))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; weight named `scale`, initialised to 1."""
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class DenseGeneral(nn.Module):
    """x @ W with logical axes on W, computed in `dtype` (no bias unless asked)."""
    features: int
    axes: tuple
    use_bias: bool = False
    init: Any = torch_linear_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = param_with_axes(self, "kernel", self.init, (x.shape[-1], self.features), self.axes)
        y = linear(x.astype(self.dtype), w.astype(self.dtype))
        if self.use_bias:
            y = y + param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                                    self.axes[-1:]).astype(self.dtype)
        return y


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x))."""
    d_ff: int
    n_layers: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d_model = x.shape[-1]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype)
        gate = DenseGeneral(self.d_ff, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = DenseGeneral(self.d_ff, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        down_init = scaled_init(torch_linear_init, self.n_layers)
        return DenseGeneral(d_model, ("mlp", "embed"), init=down_init, name="down_proj", **kw)(h)


def matrix_init(init):
    """`init` for a kernel [fan_in, *out] drawn as the [fan_in, prod(out)] matrix it is
    (flax would count prod(shape[:-1]) as the fan-in of a 3-D shape)."""
    def f(key, shape, dtype=jnp.float32):
        return init(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)
    return f


def scaled_init(init, n_layers):
    """`init` divided by sqrt(n_layers) (GPT-2 / Mamba residual-branch rescale)."""
    def f(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) / jnp.sqrt(jnp.asarray(n_layers, dtype))
    return f


def linear(x, w_KN):
    """x [..., K] @ w [K, N]. On the CPU backend with a hand-written backward
    (`_linear_cpu`), elsewhere a plain dot for the compiler to fuse as it likes."""
    return _linear_cpu(x, w_KN) if cpu.on_cpu() else jnp.dot(x, w_KN)


@jax.custom_vjp
def _linear_cpu(x, w_KN):
    """x @ w whose weight gradient is one dot_general contracting every leading axis of
    x and dy straight into [K, N]. Autodiff's version contracts into [N, K] and
    transposes, and XLA:CPU then transposes whole activations around it (about 7% of
    the Mamba LM train step on CPU)."""
    return jnp.dot(x, w_KN)


def _linear_fwd(x, w_KN):
    return jnp.dot(x, w_KN), (x, w_KN)


def _linear_bwd(res, dy):
    x, w_KN = res
    lead = tuple(range(x.ndim - 1))
    dw_KN = jax.lax.dot_general(x, dy, ((lead, lead), ((), ())))
    return jnp.dot(dy, w_KN.T).astype(x.dtype), dw_KN.astype(w_KN.dtype)


_linear_cpu.defvjp(_linear_fwd, _linear_bwd)
