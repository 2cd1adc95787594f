"""benchmarks/device_perf.py on the CPU: --dry-run emits every section's rows (JSON lines
only on stdout) with their keys and no errors; the budget skips sections with a row
saying so; a section that raises becomes an error row and the rest still run."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_perf.py")
ROOFLINE = {"flops", "bytes", "peak_flops", "peak_bw", "floor_s", "fraction_of_floor", "bound"}


def run(args, out_dir=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("OUT", None)
    if out_dir:
        env["OUT"] = str(out_dir)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def no_constants(name):
        raise ValueError(f"not JSON: {name}")
    return [json.loads(line, parse_constant=no_constants) for line in proc.stdout.splitlines()]


def timed(row, *keys):
    assert row.get("ok") is True and row["seconds"] > 0, row
    assert ROOFLINE <= set(row) and "roofline_error" not in row, row
    assert set(keys) <= set(row), row


@pytest.mark.slow  # 40 to 80 s on 2 cores: two train-step compiles, interpreted kernels
def test_dry_run_emits_every_section(tmp_path):
    rows = run([SCRIPT, "--dry-run"], tmp_path)
    assert [r for r in rows if "error" in r or "roofline_error" in r] == []
    assert all(r["backend"] == "cpu" for r in rows)
    checks = [r["check"] for r in rows]
    order = ["env", "scan_sweep", "scan", "train_step", "attention_packed", "summary"]
    assert sorted(set(checks), key=order.index) == order
    assert checks == sorted(checks, key=order.index)  # sections in order
    by = {}
    for r in rows:
        by.setdefault(r["check"], []).append(r)
    env = by["env"][0]
    assert env["jax"] and env["jaxlib"] and env["device_count"] >= 1
    assert env["measured_matmul_flops"] > 0 and env["measured_copy_bw"] > 0
    sweep = by["scan_sweep"]
    assert {r["pass"] for r in sweep} == {"fwd", "fwd_bwd"}
    for r in sweep:
        timed(r, "block_d", "num_warps", "chunk", "shape")
    scan = by["scan"]
    assert len(scan) == 2 and scan[1]["impl"].startswith("selective_scan_pallas_gpu block_d=")
    for r in scan:
        timed(r, "gbps", "setting")
    assert set(scan[0]["setting"]) == {"block_d", "num_warps", "chunk"}
    train = by["train_step"]
    assert [r["remat_requested"] for r in train] == ["none", "block", "save_kernels"]
    for r in train:
        assert r["ok"] is True and r["step_seconds"] > 0 and r["tokens_per_sec"] > 0, r
        assert r["mfu"] > 0 and r["compile_s"] > 0, r
    files = train[-1]["trace_files"]
    assert train[-1]["trace_error"] is None and "trace_files" not in train[0]
    assert files and all(os.path.dirname(f) == str(tmp_path) for f in files), files
    assert any(f.endswith(".xplane.pb") for f in files)
    attn = {r["impl"]: r for r in by["attention_packed"]}
    for impl in ("xla", "pallas", "auto"):
        timed(attn[impl], "tflops", "useful_flops", "resolved")
    assert attn["xla"]["work_from"] == "kernels_pallas.flash_attention"
    assert "work_from" not in attn["pallas"]
    assert attn["cudnn"]["skipped"] == "cuDNN needs a GPU"
    summary = by["summary"][0]
    assert summary["ok"] is True and summary["failed"] == [] and summary["dry_run"] is True


def test_budget_skips_sections():
    rows = run([SCRIPT, "--dry-run", "--budget", "0"])
    assert [r["check"] for r in rows] == ["env"] + ["budget"] * 4 + ["summary"]
    assert [r["skipped"] for r in rows[1:5]] == [["scan_sweep"], ["scan"], ["train_step"],
                                                 ["attention_packed"]]
    assert rows[-1]["ok"] is True


def test_failing_section_becomes_an_error_row():
    code = f"""
import sys
sys.argv = ["device_perf.py", "--dry-run"]
sys.path.insert(0, {ROOT!r})
from benchmarks import device_perf as dp
def broken(size, budget):
    raise RuntimeError("sweep exploded\\nsecond line")
dp.scan_sweep = broken
dp.scan_figure = lambda size, chosen: dp.dc.report("scan", ok=True, chosen=chosen)
dp.train_steps = lambda size, budget: None
dp.attention_packed = lambda size: dp.dc.report("attention_packed", ok=True)
dp.main()
"""
    rows = run(["-c", code])
    assert [r["check"] for r in rows] == ["env", "scan_sweep", "scan", "attention_packed",
                                          "summary"]
    assert rows[1]["ok"] is False and rows[1]["error"] == "RuntimeError: sweep exploded"
    assert rows[2]["chosen"] is None
    assert rows[-1]["ok"] is False and rows[-1]["failed"] == ["scan_sweep"]
