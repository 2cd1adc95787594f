"""The per-chip memory estimate (jaxmix.train.memory): against XLA's memory analysis of
the real train step (smoke models, and two blocks of the largest pod presets), and
every pod preset's fit on its documented slice.

XLA's figure is argument + output - alias + temp bytes of `compiled.memory_analysis()`:
the state and batch passed in, the outputs not written over the donated state, and the
peak of the temporaries as XLA's buffer assignment packs them, i.e. what one device
holds while the step runs. The XLA side runs in a subprocess (this file run as a
script) with 8 simulated CPU devices and LLVM's optimisations off: compiling is ~3x
faster and the figures are the same (buffers are assigned on the HLO, before LLVM).
The estimate reads 0.6 to 0.8 of XLA's figure here: XLA:CPU runs every remat
recomputation early (so remat saves nothing on CPU) and, under FSDP, holds the gathered
weights of several blocks at once.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import devices_env  # noqa: E402

FAMILIES = {"mamba_lm": "configs/mamba_lm.py", "transformer_lm": "configs/transformer_lm.py"}
POD = {"mamba_lm": "2.8b", "transformer_lm": "llama-8b"}
# (name, preset, devices, model.remat): the smoke model on one device, FSDP over 8
# (params and batch split) and without remat (every block's forward residuals held: the
# estimate's other branch); and two blocks of the largest pod preset (bf16, real widths,
# params no longer negligible) over 8.
CASES = [("1 device", "smoke", 1, "block"), ("fsdp=8", "smoke", 8, "block"),
         ("no remat", "smoke", 1, "none"), ("pod widths, fsdp=8", "pod", 8, "block")]
# Run with -m exhaustive: the step without remat, and FSDP at smoke widths (the pod
# widths case covers FSDP).
EXHAUSTIVE_CASES = ("no remat", "fsdp=8")
WORKER_ENV = devices_env(8)


def case_config(family, preset, remat):
    """Batch 8 and a length large enough that a smoke model's activations dominate; a
    pod preset cut to two blocks."""
    from benchmarks.bench_train import load_config
    pod = preset == "pod"
    config = load_config(f"{FAMILIES[family]}:{POD[family] if pod else preset}")
    config.train.update(batch_size=8, seq_len=512 if pod else 256)
    config.model.update(remat=remat, n_layers=2 if pod else config.model.n_layers)
    config.mesh.update(data=1, fsdp=-1, tensor=1, sequence=1)
    return config


def worker(family, names):
    """Prints one JSON line per case in `names`: XLA's memory analysis and the
    estimate's fields."""
    import tempfile

    import jax
    import jax.numpy as jnp

    from jaxmix.train import memory
    from jaxmix.train.loop import Run
    for name, preset, devices, remat in CASES:
        if name not in names:
            continue
        config = case_config(family, preset, remat)
        with tempfile.TemporaryDirectory() as workdir:
            r = Run(config, workdir, devices=jax.devices()[:devices])
            b, length = config.train.batch_size, config.train.seq_len
            batch = jax.ShapeDtypeStruct((b, length + 1), jnp.int32, sharding=r.batch_sharding)
            m = r.train_step.compile(r.abstract, batch).memory_analysis()
            r.ckpt.close()
        e = memory.estimate(config, devices, on_tpu=False)
        print(json.dumps({
            "case": name, "arg": m.argument_size_in_bytes, "out": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
            "batch": b // devices * (length + 1) * 4,
            "state": e.params + e.opt_state, "rest": e.grads + e.gathered + e.activations,
            "activations": e.activations, "total": e.total}), flush=True)


def run_workers(names):
    """{family: {case: row}} of the cases `names`; the two families' workers run side
    by side."""
    procs = {family: subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), family, json.dumps(names)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, **WORKER_ENV))
        for family in FAMILIES}
    reports = {}
    for family, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        reports[family] = {row["case"]: row for row in rows}
    return reports


@pytest.fixture(scope="module")
def xla_reports():
    return run_workers([c[0] for c in CASES if c[0] not in EXHAUSTIVE_CASES])


@pytest.mark.parametrize("case", [c[0] for c in CASES if c[0] not in EXHAUSTIVE_CASES])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_estimate_within_2x_of_xla(xla_reports, family, case):
    check_estimate(xla_reports[family][case], family, case)


@pytest.mark.exhaustive
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_estimate_within_2x_of_xla_without_remat(family):
    for case in EXHAUSTIVE_CASES:
        check_estimate(run_workers([case])[family][case], family, case)


def check_estimate(row, family, case):
    xla_total = row["arg"] + row["out"] - row["alias"] + row["temp"]
    ratio = row["total"] / xla_total
    print(f"{family} {case}: estimate {row['total']:,} B, XLA {xla_total:,} B, "
          f"ratio {ratio:.2f}")
    assert 0.5 <= ratio <= 2.0, (row, ratio)
    # The pieces: params + AdamW moments are XLA's arguments less the batch (exact but
    # for a few scalars); gradients + activations are its temporaries (+ fresh outputs).
    state_ratio = row["state"] / (row["arg"] - row["batch"])
    assert 0.95 <= state_ratio <= 1.05, (row, state_ratio)
    rest_ratio = row["rest"] / (row["temp"] + row["out"] - row["alias"])
    assert 0.5 <= rest_ratio <= 2.0, (row, rest_ratio)
    if {c[0]: c[1] for c in CASES}[case] == "smoke":  # activations are what is compared
        assert row["activations"] > 10 * row["state"], row


def test_pod_presets_fit_their_slices():
    """Every pod preset is FSDP over its documented slice, its estimate leaves a quarter
    of a 16 GiB chip free, the slice is the smallest that does, and README.md shows
    the table `python -m jaxmix.train.memory` prints."""
    from jaxmix import models
    from jaxmix.train import memory
    rows = memory.pod_presets()
    assert len(rows) == 15
    with open(os.path.join(ROOT, "README.md")) as f:
        assert memory.table(rows) in f.read(), "regenerate README's table"
    for spec, config, chips in rows:
        e = memory.estimate(config, chips)
        assert e.mesh == {"data": 1, "fsdp": chips, "tensor": 1, "sequence": 1}, spec
        assert models.remat.policy_name(config.model) == "block", spec
        assert config.model.dtype == "bfloat16", spec
        assert e.total <= memory.FIT_BYTES < memory.HBM_BYTES, (spec, e.total / memory.GIB)
        if chips > memory.SLICES[0]:
            smaller = memory.estimate(config, chips // 2)
            assert smaller.total > memory.FIT_BYTES, (spec, "fits on fewer chips")


def test_estimate_scales_with_the_mesh():
    from jaxmix.train import memory
    config = case_config("mamba_lm", "smoke", "block")
    one, eight = memory.estimate(config, 1), memory.estimate(config, 8)
    assert one.params / 8 <= eight.params < one.params / 4  # small params stay whole
    assert eight.opt_state == 2 * eight.params and eight.grads == eight.params
    assert eight.gathered > 0 == one.gathered
    assert eight.activations * 8 == pytest.approx(one.activations, rel=0.05)


def test_bad_chip_counts_are_one_line_errors():
    from jaxmix.errors import ConfigError
    from jaxmix.train import memory
    config = case_config("mamba_lm", "smoke", "block")
    with pytest.raises(ConfigError, match="does not split"):
        memory.estimate(config, 3)
    with pytest.raises(ConfigError, match="positive"):
        memory.estimate(config, 0)
    assert memory.main(["--chips", "4"]) == 2  # CLI: "error: ..." on stderr


if __name__ == "__main__":
    worker(sys.argv[1], json.loads(sys.argv[2]))
