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
from jaxmix.nn import linear
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
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_softplus_values_and_gradients_match_float64():
    x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 20001), -jnp.logspace(-8, 1.5, 4001),
                         jnp.logspace(-8, 1.5, 4001)])
    x64 = np.asarray(x, np.float64)
    want = np.logaddexp(0.0, x64)
    np.testing.assert_allclose(softplus_f32(x), want, rtol=2.5e-7, atol=0)
    # jax.nn.softplus is no closer to the exact value than that
    np.testing.assert_allclose(jax.nn.softplus(x), want, rtol=2.5e-7, atol=0)
    grad = jax.vmap(jax.grad(softplus_f32))(x)
    np.testing.assert_allclose(grad, 1 / (1 + np.exp(-x64)), rtol=1e-6, atol=0)
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


def test_compiler_options_only_for_cpu(monkeypatch):
    assert cpu.compiler_options([]) is None
    monkeypatch.setattr(cpu, "_has_avx512", lambda: True)
    assert cpu.compiler_options(jax.devices()) == {"xla_cpu_prefer_vector_width": 512}
    monkeypatch.setattr(cpu, "_has_avx512", lambda: False)
    assert cpu.compiler_options(jax.devices()) is None


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


def _bench_step(*flags):
    """bench_mamba_step at toy shapes; returns its JSON lines by `bench` name."""
    import json
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_mamba_step.py"),
           "--d_model", "32", "--n_layers", "1", "--batch", "2", "--seq_len", "16",
           "--vocab", "64", "--iters", "2", *flags]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return {row["bench"]: row for row in map(json.loads, out.stdout.splitlines())}


# Both modes of the benchmark run with -m exhaustive: the worker mode is 2 pinned
# processes joined over gloo (the two-process training test covers that set-up) around
# the same step as the single-process mode.
@pytest.mark.exhaustive
@pytest.mark.skipif(cpu.cores() < 2, reason="needs 2 cores for 2 pinned workers")
def test_bench_mamba_step_worker_per_core_mode():
    rows = _bench_step("--processes", "2")
    assert rows["launch"]["processes"] == 2
    assert rows["env"]["processes"] == 2 and rows["env"]["devices"] == 2
    probe = rows["matmul_fp32"]
    assert len(probe["per_core_gflops"]) == 2
    assert probe["all_cores_probe_gflops"] > 0 and min(probe["per_core_gflops"]) > 0
    assert probe["best_gflops"] == pytest.approx(  # the larger of the probe and the sum
        max(probe["all_cores_probe_gflops"], sum(probe["per_core_gflops"])), abs=0.2)
    summary = rows["summary"]
    assert 0 < summary["mfu"] < 1 and summary["speedup_vs_naive"] > 0
    assert rows["jaxmix_xla"]["steps_timed"] == 2


@pytest.mark.exhaustive  # a benchmark script (its step is the train step tested elsewhere)
def test_bench_mamba_step_single_process_mode():
    rows = _bench_step("--processes", "1", "--devices", "2")
    assert "launch" not in rows
    assert rows["env"]["processes"] == 1
    assert 0 < rows["summary"]["mfu"] < 1 and rows["summary"]["speedup_vs_naive"] > 0


def test_data_parallel_axes_only_for_pure_data_parallel_meshes():
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
    from jaxmix.parallel.mesh import AXES
    from jaxmix.train.step import data_parallel_axes

    def axes(sizes, spec=P(("data", "fsdp"), None), param_spec=P("fsdp", "tensor")):
        mesh = AbstractMesh(tuple(sizes), AXES)
        params = {"w": NamedSharding(mesh, param_spec), "b": NamedSharding(mesh, P())}
        return data_parallel_axes(mesh, NamedSharding(mesh, spec), params)

    assert axes([8, 1, 1, 1]) == ("data", "fsdp")
    assert axes([4, 1, 1, 1], P("data", None)) == ("data",)
    assert axes([1, 1, 1, 1]) is None  # one device
    assert axes([2, 4, 1, 1]) is None  # FSDP: params split over fsdp
    assert axes([2, 4, 1, 1], param_spec=P()) == ("data", "fsdp")
    assert axes([2, 1, 2, 1]) is None  # tensor parallel
    assert axes([2, 1, 1, 2]) is None  # sequence parallel


def test_cpu_speed_pieces_only_on_the_cpu_backend(monkeypatch):
    """Off the CPU backend: plain dots (no hand-written linear backward), jax.nn.softplus,
    XLA's exp2 in the xla scan, and GSPMD's gradient all-reduces (no flat vector)."""
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
    from jaxmix import cpu
    from jaxmix.ops.scan_xla import selective_scan_xla
    from jaxmix.parallel.mesh import AXES
    from jaxmix.train.step import flat_reduce_axes

    x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    u, delta, b = jnp.ones((1, 8, 4)), jnp.ones((1, 8, 4)), jnp.ones((1, 8, 2))

    def traced():
        lin = str(jax.make_jaxpr(lambda w: linear(x, w))(w))
        scan = str(jax.make_jaxpr(lambda u: selective_scan_xla(
            u, delta, -jnp.ones((4, 2)), b, b, delta_softplus=True))(u))
        return lin, scan

    lin, scan = traced()
    assert "custom_vjp" in lin and "exp2" not in scan and "log1p" not in scan
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)
    lin, scan = traced()
    assert "custom_vjp" not in lin and "exp2" in scan and "log1p" in scan
    mesh = AbstractMesh((2, 1, 1, 1), AXES)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    assert flat_reduce_axes(mesh, batch, {}, "cpu") == ("data", "fsdp")
    assert flat_reduce_axes(mesh, batch, {}, "tpu") is None
    assert flat_reduce_axes(mesh, batch, {}, "gpu") is None


def _loop_compiled_whole(call_first):
    """Whether XLA:CPU compiles a 4 MB-per-iteration fori_loop as one function."""
    code = "from jaxmix import cpu\n"
    if call_first:  # the second call finds the option already in XLA_FLAGS
        code += "assert cpu.compile_loops_whole()\nassert not cpu.compile_loops_whole()\n"
    code += (
        "import jax, jax.numpy as jnp\n"
        "f = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, c: c * 2.0 + 1.0, x))\n"
        "x = jnp.ones(1 << 20)\n"
        "assert float(f(x)[0]) == 63.0\n"
        "assert not cpu.compile_loops_whole()  # JAX is running\n"
        "print('xla_cpu_small_call' in f.lower(x).compile().as_text())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXMIX_WHOLE_LOOPS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1] == "True"


def test_compile_loops_whole_sets_the_xla_backend_option():
    assert _loop_compiled_whole(True)
    assert not _loop_compiled_whole(False)  # XLA's default threshold is 1 KiB


def test_compile_loops_whole_opt_out(monkeypatch):
    monkeypatch.setenv("JAXMIX_WHOLE_LOOPS", "0")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert cpu.compile_loops_whole() is False
    assert "XLA_FLAGS" not in os.environ
