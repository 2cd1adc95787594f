"""Shared test helpers. Tests run on the CPU; multi-device tests set their own XLA_FLAGS
in a subprocess (the device count is fixed when jax starts)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def run_train(args, workdir, env_extra=None, timeout=600):
    """Runs train.py in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture
def smoke_config():
    import mamba_lm
    return mamba_lm.get_config("smoke")
