"""benchmarks/roofline.py: the floor arithmetic, the peak table, the fields merged into
benchmark rows, and the three kernel benchmarks' --help and a tiny run emitting them."""
import json
import os
import runpy
import sys

import pytest

from benchmarks import roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"flops", "bytes", "peak_flops", "peak_bw", "floor_s", "fraction_of_floor", "bound"}


def test_roofline_arithmetic():
    # 1e12 FLOPs at 1e12 FLOP/s = 1 s; 1e9 bytes at 1e10 B/s = 0.1 s: compute bound
    r = roofline.roofline(2.0, 1e12, 1e9, peak_flops=1e12, peak_bw=1e10)
    assert set(r) == FIELDS
    assert r["floor_s"] == pytest.approx(1.0) and r["fraction_of_floor"] == pytest.approx(0.5)
    assert r["bound"] == "compute"
    # 1e9 FLOPs (1 ms) against 1e10 bytes (1 s): memory bound
    r = roofline.roofline(4.0, 1e9, 1e10, peak_flops=1e12, peak_bw=1e10)
    assert r["floor_s"] == pytest.approx(1.0) and r["fraction_of_floor"] == pytest.approx(0.25)
    assert r["bound"] == "memory"


@pytest.mark.parametrize("kind, peaks", [
    ("NVIDIA H100 80GB HBM3", (989e12, 3.35e12)), ("NVIDIA H100 PCIe", (756e12, 2.0e12)),
    ("NVIDIA H200", (989e12, 4.8e12)), ("NVIDIA A100-SXM4-80GB", (312e12, 2039e9)),
    ("NVIDIA A100-SXM4-40GB", (312e12, 1555e9)), ("TPU v4", (275e12, 1228e9)),
    ("TPU v5 lite", (197e12, 819e9)), ("TPU v5", (459e12, 2765e9)),
    ("TPU v5p", (459e12, 2765e9)), ("TPU v6 lite", (918e12, 1640e9)), ("cpu", None)])
def test_spec_peaks(kind, peaks):
    assert roofline.spec_peaks(kind) == peaks


def test_fields_add_forward_and_backward(monkeypatch):
    """backward=True: the forward kernel's estimate plus the backward kernel's."""
    calls = []

    def cost(module, *args, backward, **kw):
        calls.append((module, args, backward, kw))
        return (30.0, 300.0) if backward else (10.0, 100.0)
    monkeypatch.setattr(roofline, "kernel_cost", cost)
    monkeypatch.setattr(roofline, "device_peaks", lambda: (10.0, 100.0, "test"))
    row = roofline.fields(8.0, "k", 1, 2, backward=True, dtype_bytes=2,
                          work_from="kernels_pallas.k")
    assert [c[2] for c in calls] == [False, True] and calls[0][3] == {"dtype_bytes": 2}
    assert row["flops"] == 40.0 and row["bytes"] == 400.0 and row["floor_s"] == 4.0
    assert row["fraction_of_floor"] == 0.5 and row["work_from"] == "kernels_pallas.k"
    assert row["peak_source"] == "test"
    row = roofline.fields(8.0, "k", 1, 2, backward=False, dtype_bytes=2)
    assert row["flops"] == 10.0 and "work_from" not in row


def test_missing_estimate_keeps_the_row():
    row = roofline.fields(1.0, "no_such_kernel", backward=False, dtype_bytes=2)
    assert set(row) == {"roofline_error"} and "ModuleNotFoundError" in row["roofline_error"]


def test_measured_peaks_on_cpu():
    flops, bw, source = roofline.device_peaks()
    assert flops > 1e8 and bw > 1e8 and source.startswith("measured")
    assert roofline.device_peaks() == (flops, bw, source)  # measured once


def run_bench(name, args, monkeypatch, capsys):
    """runs benchmarks/<name>.py's main in this process; returns its JSON rows."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(os.path.join(ROOT, "benchmarks", name), run_name="__main__")
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


TINY = {
    "bench_scan.py": (["--shapes", "1,16,8,4", "--impls", "xla", "--iters", "1"],
                      "seconds", "kernels_pallas.selective_scan"),
    "bench_attention.py": (["--lengths", "32", "--impls", "xla", "--head-dim", "16",
                            "--repeats", "1"], "time_s", "kernels_pallas.flash_attention"),
    "bench_gated_delta.py": (["--shapes", "1,16,1,8,8", "--impls", "xla", "--iters", "1",
                              "--chunk_size", "8"], "seconds", "kernels_pallas.gated_delta"),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_benchmark_rows_carry_roofline(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, "benchmarks", name), run_name="__main__")
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
    args, time_field, work_from = TINY[name]
    rows = [r for r in run_bench(name, args, monkeypatch, capsys) if r.get(time_field)]
    assert len(rows) == 2  # fwd and fwd+bwd
    for row in rows:
        assert "roofline_error" not in row, row
        assert FIELDS <= set(row) and row["work_from"] == work_from, row
        assert row["floor_s"] > 0 and row["fraction_of_floor"] > 0
    fwd, bwd = rows
    assert bwd["flops"] > fwd["flops"] and bwd["bytes"] > fwd["bytes"]
