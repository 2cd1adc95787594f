"""benchmarks/device_check.py on the CPU (toy sizes): JSON lines only on stdout, every
check present and passing, timings positive; a failing check gives exit status 1."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")


def run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def json_rows(stdout):
    def no_constants(name):
        raise ValueError(f"not JSON: {name}")
    return [json.loads(line, parse_constant=no_constants) for line in stdout.splitlines()]


def positive(row, *fields):
    for f in fields:
        assert isinstance(row[f], (int, float)) and math.isfinite(row[f]) and row[f] > 0, (f, row)


# The script as a whole runs with -m exhaustive (about 30 s on 2 cores); every kernel it
# times is checked against its reference in the default run by its own test file.
@pytest.mark.exhaustive
def test_device_check_on_cpu():
    proc = run([SCRIPT])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json_rows(proc.stdout)
    assert all(r["backend"] == "cpu" and r["device_kind"] for r in rows)
    by = {(r["check"], r.get("impl")): r for r in rows}
    for impl in ("pallas", "xla"):
        row = by["attention", impl]
        assert row["ok"] is True and row["fwd_err"] < 1e-5, row  # float32 on the CPU
    auto = by["attention", "auto"]  # bf16, bounded by the plain bf16 error
    assert auto["ok"] is True and auto["dtype"] == "bfloat16" and auto["resolved"] == "xla"
    for impl in ("pallas_mosaic_tpu", "pallas_triton_gpu", "xla"):
        row = by["scan", impl]
        assert row["ok"] is True and row["mode"] == ("compiled" if impl == "xla"
                                                     else "interpreted"), row
        assert set(row["grad_errs"]) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                         "initial_state"}
    for check, impl, rate in (("attention_speed", "jax.nn.dot_product_attention", "tflops"),
                              ("attention_speed", "xla", "tflops"),
                              ("scan_speed", "xla", "gbps")):
        row = by[check, impl]
        assert row["ok"] is True
        positive(row, "seconds", rate, "ratio_to_baseline")
    # interpreted kernels are checked for correctness, not timed
    assert "skipped" in by["attention_speed", "pallas"]
    assert "skipped" in by["scan_speed", "pallas_mosaic_tpu"]
    train = by["train_step", None]
    assert train["ok"] is True and train["peak_source"].startswith("measured")
    positive(train, "step_seconds", "tokens_per_sec", "model_flops_per_step", "peak_flops",
             "mfu")
    summary = rows[-1]
    assert summary["check"] == "summary" and summary["ok"] is True and summary["failed"] == []
    positive(summary, "seconds")


def test_failing_check_exits_nonzero():
    """A check that raises gives one ok=false row with a one-line error; the others
    still run, and the exit status is 1 (the kernels themselves are stubbed out)."""
    code = f"""
import sys
sys.path.insert(0, {ROOT!r})
from benchmarks import device_check as dc
def broken(size):
    raise RuntimeError("kernel exploded\\nsecond line")
dc.attention_checks = broken
dc.attention_speed = dc.scan_checks = dc.scan_speed = lambda size: None
dc.train_step = lambda size: dict(ok=True, step_seconds=1.0)
dc.main()
"""
    proc = run(["-c", code])
    assert proc.returncode == 1, proc.stderr[-4000:]
    rows = json_rows(proc.stdout)
    assert [r["check"] for r in rows] == ["env", "attention", "train_step", "summary"]
    assert rows[1]["ok"] is False and rows[1]["error"] == "RuntimeError: kernel exploded"
    assert rows[2]["ok"] is True
    assert rows[3]["ok"] is False and rows[3]["failed"] == ["attention"]
