"""CPU-host speed pieces: linear()'s hand-written backward, the output-only softplus,
and jaxmix.cpu's device-count and allocator set-up."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmix import cpu
from jaxmix.models.layers import linear
from jaxmix.ops.selective_scan import softplus_f32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("shape", [(5, 7), (2, 9, 7), (2, 3, 4, 7)])
def test_linear_matches_dot_and_its_gradients(shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (shape[-1], 6))
    g = jax.random.normal(kg, shape[:-1] + (6,))
    y, vjp = jax.vjp(linear, x, w)
    y_ref, vjp_ref = jax.vjp(jnp.dot, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_softplus_matches_jax_values_and_gradients():
    x = jnp.linspace(-30.0, 30.0, 20001)
    np.testing.assert_allclose(softplus_f32(x), jax.nn.softplus(x), rtol=2e-7, atol=1e-30)
    grad = jax.vmap(jax.grad(softplus_f32))(x)
    np.testing.assert_allclose(grad, jax.nn.sigmoid(x), rtol=2e-6, atol=1e-30)
    assert softplus_f32(jnp.float32(100.0)) == 100.0
    assert jax.grad(softplus_f32)(jnp.float32(-100.0)) >= 0


def test_devices_for_batch(monkeypatch):
    monkeypatch.setattr(cpu, "cores", lambda: 8)
    assert cpu.devices_for_batch(16) == 8
    assert cpu.devices_for_batch(12) == 6
    assert cpu.devices_for_batch(7) == 7
    assert cpu.devices_for_batch(16, cap=3) == 2
    assert cpu.devices_for_batch(1) == 1


def test_device_count_is_left_alone_once_jax_runs():
    jax.devices()  # the backend is up in this process
    assert cpu.use_cores_as_devices(2) is False


def test_freed_memory_switch(monkeypatch):
    monkeypatch.setenv("JAXMIX_KEEP_FREED_MEMORY", "0")
    assert cpu.keep_freed_memory() is False


def test_compiler_options_only_for_cpu():
    assert cpu.compiler_options([]) is None
    opts = cpu.compiler_options(jax.devices())
    assert opts is None or opts == {"xla_cpu_prefer_vector_width": 512}


def _devices_after_prepare(extra_env, overrides=""):
    code = ("import jax; from jaxmix import config_files, cpu\n"
            "c = config_files.load_config('configs/mamba_lm.py')\n"
            f"{overrides}\n"
            "cpu.prepare_training_host(c); print(jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_training_host_uses_one_device_per_core():
    want = cpu.devices_for_batch(16)  # the default preset's batch
    assert _devices_after_prepare({}) == want
    assert _devices_after_prepare({}, "c.train.cpu_devices = 1") == 1
    # A device count the user asked for wins.
    assert _devices_after_prepare(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == 3
