"""Shared test helpers. Tests run on the CPU; multi-device tests set their own XLA_FLAGS
in a subprocess (the device count is fixed when jax starts)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


# Test subprocesses compile many small programs: with XLA:CPU's backend (LLVM)
# optimisations off, compiling costs about 40% less CPU. Buffer assignment and the HLO
# are unchanged, and every comparison runs both of its sides under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


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
