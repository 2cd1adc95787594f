"""Shared test helpers. Tests run on the CPU; multi-device tests set their own XLA_FLAGS
in a subprocess (the device count is fixed when jax starts)."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


# Tests compile many small programs: with XLA:CPU's backend (LLVM)
# optimisations off, compiling costs about 40% less CPU. Buffer assignment and the HLO
# are unchanged, and every comparison runs both of its sides under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# The tests' own processes compile the same way (set here, before JAX starts its CPU
# backend): about a third less time for a suite that mostly compiles small programs.
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


# One persistent compilation cache per test run (fresh, so nothing from an earlier run
# or another JAX version is read): train.py subprocesses that resume, restart or
# repeat a run with the same config reuse the programs compiled the first time. The
# environment variables reach JAX before it starts and every subprocess inherits them.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"jaxmix-test-compile-cache-{_RUN_ID}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# CI (.ci/run) installs torch and transformers for the HF parity tests and sets
# JAXMIX_REQUIRE_HF=1: there a missing one must fail the run rather than skip its
# tests unnoticed. pytest.importorskip of those modules then fails (at collection for
# a module-level call, in the test otherwise); other modules, and runs without the
# variable, skip as usual.
HF_MODULES = ("torch", "transformers")
REQUIRE_HF = os.environ.get("JAXMIX_REQUIRE_HF", "") not in ("", "0")

if REQUIRE_HF and not getattr(pytest.importorskip, "requires_hf", False):
    _importorskip = pytest.importorskip

    def _importorskip_or_fail(modname, *args, **kwargs):
        if modname.split(".")[0] not in HF_MODULES:
            return _importorskip(modname, *args, **kwargs)
        try:
            return _importorskip(modname, *args, **kwargs)
        except pytest.skip.Exception as e:
            why = str(e)
        pytest.fail(f"JAXMIX_REQUIRE_HF is set but {modname!r} is unavailable: {why}",
                    pytrace=False)

    _importorskip_or_fail.requires_hf = True
    pytest.importorskip = _importorskip_or_fail


def metrics_rows(workdir):
    """The rows of a workdir's metrics.jsonl; a last line still being written by a
    running train.py (no newline yet) is left out."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def json_rows(args, env_extra, timeout=900):
    """Runs `python *args` with `env_extra` added to the environment; asserts it exits 0
    and returns the JSON objects it printed, one per line starting with "{"."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=dict(os.environ, **env_extra), timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def devices_env(n):
    """Environment of a subprocess with n simulated CPU devices (and FAST_COMPILE)."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}",
            "JAX_PLATFORMS": "cpu"}


def subprocess_env(env_extra=None):
    """The environment of a test's train.py subprocess: the CPU, FAST_COMPILE."""
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("JAX_PLATFORMS", "cpu")
    if FAST_COMPILE not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    return env


def run_train(args, workdir, env_extra=None, timeout=600):
    """Runs train.py in a subprocess; returns CompletedProcess (text)."""
    env = subprocess_env(env_extra)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture
def smoke_config():
    import mamba_lm
    return mamba_lm.get_config("smoke")


def assert_decode_matches_forward(mixer, params, x_BLD, cache, prefill, atol=1e-5):
    """A mixer's cached decoding (a `prefill`-token prompt, then one token at a time from
    `cache`) gives its full forward pass's outputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    full = jax.jit(lambda p, x: mixer.apply({"params": p}, x)[0])(params, x_BLD)
    step = jax.jit(lambda p, x, c: mixer.apply({"params": p}, x, decode=True, cache=c)[:2])
    y, cache = step(params, x_BLD[:, :prefill], cache)
    outs = [y]
    for t in range(prefill, x_BLD.shape[1]):
        y, cache = step(params, x_BLD[:, t:t + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=atol, rtol=0)
