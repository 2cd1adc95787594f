"""Sharded training on 8 simulated CPU devices, and 2-process runs (2 x 4 devices, gloo)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

from conftest import ROOT, devices_env, json_rows, metrics_rows, run_train
from jaxmix.data.prepare import main as prepare_main

EIGHT, FOUR = devices_env(8), devices_env(4)
MESHES = [[8, 1, 1], [2, 4, 1], [2, 2, 2], [1, 2, 4]]


def worker(name, arg, env=EIGHT, timeout=900):
    return json_rows([os.path.join(ROOT, "tests", "workers", name), arg], env, timeout)


def assert_close(got, want, rtol=1e-5):
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= rtol * abs(b), (step, a, b)


CONFIGS = {
    "mamba_lm": ("configs/mamba_lm.py:smoke", {"train.batch_size": 8}),
    "transformer_lm": ("configs/transformer_lm.py:smoke", {  # GQA 2:1
        "train.batch_size": 8, "model.mixers.attention.n_heads": 8,
        "model.mixers.attention.n_kv_heads": 4}),
}


# The default run covers FSDP with data and tensor parallelism in test_kernel_sharding:
# (data, fsdp, tensor) = (2, 2, 2) for the transformer_lm smoke config with Mamba and
# attention layers; the Mamba LM also runs under FSDP in the two-process test (its
# resume on fsdp=8). These grids (pure data parallelism, (2, 4, 1), (1, 2, 4), (2, 2, 2)
# for both LMs) run with -m exhaustive.
EXHAUSTIVE = pytest.mark.exhaustive
MESH_SETS = [pytest.param("transformer_lm", MESHES[1::2], id="transformer_lm-fsdp",
                          marks=EXHAUSTIVE),
             pytest.param("mamba_lm", MESHES[1::2], id="mamba_lm-fsdp", marks=EXHAUSTIVE)] + [
    pytest.param(family, MESHES[0::2], id=f"{family}-data-tensor", marks=EXHAUSTIVE)
    for family in sorted(CONFIGS)]


@pytest.mark.slow
@pytest.mark.parametrize("family, meshes", MESH_SETS)
def test_meshes_match_single_device(family, meshes):
    config, overrides = CONFIGS[family]
    spec = {"config": config, "overrides": overrides, "meshes": [[]] + meshes, "steps": 10}
    rows = worker("sharded_losses.py", json.dumps(spec))
    single = rows[0]["losses"]
    for row in rows[1:]:
        assert_close(row["losses"], single)


def test_params_and_optimizer_state_are_sharded():
    report = worker("sharding_specs.py", "configs/mamba_lm.py:smoke")[0]
    want = {  # the default rules: embed -> fsdp, mlp/vocab -> tensor
        "params/embed/embedding": ["tensor", "fsdp"],
        "params/layers_0/mixer/in_proj": ["fsdp", None, "tensor"],
        "params/layers_0/mixer/out_proj": ["tensor", "fsdp"],
        "params/layers_0/mixer/A_log": ["tensor", None],
        "params/layers_1/norm/scale": ["fsdp"],
        "opt_state/[1]/[0]/mu/layers_0/mixer/in_proj": ["fsdp", None, "tensor"],
        "opt_state/[1]/[0]/nu/embed/embedding": ["tensor", "fsdp"],
    }
    for name, spec in want.items():
        assert report[name]["spec"] == spec, (name, report[name])
        parts = 1
        for axes in spec:
            parts *= 2 if axes else 1  # every mesh axis has size 2 here
        assert report[name]["shard_bytes"] * parts == report[name]["bytes"], name
    assert report["step"]["spec"] == []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(args, workdir):
    port = free_port()
    env = dict(os.environ, **FOUR)
    return [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(workdir), *args,
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for i in range(2)]


def wait_for_losses(procs, workdir, n, timeout=900):
    """Until n losses are logged (or a process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= n:
            return
        time.sleep(0.05)


def run_two_processes(args, workdir, timeout=900, sigterm_after=None):
    """train.py in 2 processes x 4 devices; [(exit status, stderr)] of each. With
    `sigterm_after` = n, process 1 alone gets SIGTERM once n losses are logged.

    JAX's runtime polls for SIGTERM once a second, then tells the other process through
    the coordination service: a fast run goes on for a wall-clock second's worth of steps
    before both agree where to stop. Process 0 (which hosts the service) is paused from
    the signal until that notice has had time to reach it, so process 1, waiting on it in
    the step's collectives, cannot run ahead: the stop comes a step or two after n."""
    procs = start_two_processes(args, workdir)
    if sigterm_after is not None:
        wait_for_losses(procs, workdir, sigterm_after, timeout)
        procs[0].send_signal(signal.SIGSTOP)
        procs[1].send_signal(signal.SIGTERM)
        time.sleep(3)  # the runtime's 1-second poll, with room to spare
        procs[0].send_signal(signal.SIGCONT)
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs, strict=True)]


@pytest.mark.slow
def test_a_dead_peer_stops_the_survivor(tmp_path):
    """kill -9 of one process: the other exits non-zero once the peer misses its
    heartbeats (--heartbeat_timeout), naming it, instead of waiting in a collective."""
    procs = start_two_processes(SMOKE8 + ["--config.train.steps=400", "--heartbeat_timeout=10"],
                                tmp_path)
    try:
        wait_for_losses(procs, tmp_path, 2)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=120)  # bounded: never waits for ever
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode not in (0, None), err[-3000:]
    # JAX's coordination service names the peer: as the unhealthy task, or in the
    # error of the barrier the survivor was waiting in.
    named = (re.search(r"stopped sending heartbeats\):\s*1\s", err)
             or "Task 1 heartbeat timeout" in err)
    assert named, err[-3000:]


def losses(workdir, key="loss"):
    return {r["step"]: r[key] for r in metrics_rows(workdir) if key in r}


SMOKE8 = ["--config", "configs/mamba_lm.py:smoke", "--config.train.batch_size=8"]


def two_process_runs_match(tmp_path, extra):
    """2 processes x 4 devices (train.py with `extra` flags) against 1 process x 8 for
    20 steps: the losses and validation losses of the first 10 steps match. Returns
    (the 2-process workdir, the reference's losses)."""
    two, one = tmp_path / "two", tmp_path / "one"
    for rc, err in run_two_processes(SMOKE8 + extra, two):
        assert rc == 0, err[-3000:]
    ref = run_train(SMOKE8 + ["--config.train.steps=20"], one, EIGHT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want, want_val = losses(one), losses(one, "val_loss")
    got, got_val = losses(two), losses(two, "val_loss")
    assert sorted(got) == list(range(2, 11, 2)) and sorted(got_val) == [5, 10]
    assert_close([got[s] for s in sorted(got)], [want[s] for s in sorted(got)])
    assert_close([got_val[s] for s in (5, 10)], [want_val[s] for s in (5, 10)])
    return two, want


@pytest.mark.slow
def test_two_process_run_preempted_matches_and_restores_under_another_mesh(tmp_path):
    """Data parallel across 2 processes matches 1 process until SIGTERM reaches one of
    them: both stop at the same step with exit status 0 and one checkpoint; that
    data-parallel checkpoint resumes in 1 process under FSDP with the uninterrupted run's
    losses. The data is a prepared ArrayRecord corpus packed with document segments:
    its iterator resumes across the process-count change."""
    corpus, two, one = tmp_path / "corpus", tmp_path / "two", tmp_path / "one"
    stdlib = sysconfig.get_paths()["stdlib"]
    assert prepare_main(["--input", f"{stdlib}/json/*.py", "--input", f"{stdlib}/email/*.py",
                         "--tokenizer", "bytes", "--out", str(corpus), "--workers", "1"]) == 0
    data_args = [f"--config.data.source=arrayrecord:{corpus}", "--config.data.packing=segments"]
    # 400 steps asked for (the preset's learning-rate schedule spans 10): SIGTERM comes
    # long before the end.
    results = run_two_processes(SMOKE8 + data_args + ["--config.train.steps=400"], two,
                                sigterm_after=3)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    stopped = [int(d) for d in os.listdir(two / "checkpoints") if d.isdigit()]
    assert 6 <= max(stopped) < 19, stopped
    step = max(stopped)
    assert f"stopped at step {step} on SIGTERM" in results[0][1]  # process 0 logs it
    ref = run_train(SMOKE8 + data_args + ["--config.train.steps=20"], one, EIGHT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want, got = losses(one), losses(two)
    assert set(range(2, step + 1, 2)) <= set(got)
    assert_close([got[s] for s in range(2, step + 1, 2)], [want[s] for s in range(2, step + 1, 2)])
    # The 2-process checkpoint (mesh data=8) continues in 1 process on fsdp=8.
    resumed = run_train(SMOKE8 + data_args + ["--config.train.steps=20", "--config.mesh.data=1",
                                              "--config.mesh.fsdp=8"], two, EIGHT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stderr
    got = losses(two)
    rest = [s for s in range(step + 1, 21) if s % 2 == 0]
    assert_close([got[s] for s in rest], [want[s] for s in rest])


@pytest.mark.exhaustive
def test_two_processes_feeding_the_same_rows(tmp_path):
    """A (data 1, sequence 8) mesh whose sequence axis crosses the 2 processes: both feed
    the same batch rows, and the validation loss is not divided by the process count."""
    two_process_runs_match(tmp_path, ["--config.mesh.data=1", "--config.mesh.sequence=8"])


def test_tensor_axis_must_divide_channels(tmp_path):
    proc = run_train(["--config", "configs/mamba_lm.py:smoke", "--config.model.d_model=34",
                      "--config.mesh.data=1", "--config.mesh.tensor=8"], tmp_path, EIGHT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: mesh:") and "mesh.tensor" in last, last


def test_batch_must_divide_data_times_fsdp(tmp_path):
    proc = run_train(["--config", "configs/mamba_lm.py:smoke", "--config.train.batch_size=6",
                      "--config.mesh.data=2", "--config.mesh.fsdp=4"], tmp_path, EIGHT)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "mesh.data*mesh.fsdp=8" in last, proc.stderr[-2000:]


@pytest.mark.slow
def test_process_count_must_divide_batch(tmp_path):
    results = run_two_processes(["--config", "configs/mamba_lm.py:smoke",
                                 "--config.train.batch_size=3", "--config.mesh.data=1",
                                 "--config.mesh.tensor=8"], tmp_path, timeout=300)
    for rc, err in results:
        assert rc == 2 and "Traceback" not in err, err[-2000:]
        assert "not divisible by the 2 processes" in err.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    # the hybrid runs the sequence-parallel scan and ring attention in one model; the
    # sequence-parallel delta rule of mom_lm is checked op by op in test_delta_parallel
    pytest.param("configs/mamba_lm.py:smoke", marks=pytest.mark.exhaustive),
    "configs/transformer_lm.py:hybrid",
    pytest.param("configs/mom_lm.py:smoke", marks=pytest.mark.exhaustive)])
def test_sequence_parallel_train_step_matches_single_device(config):
    """mesh (data 2, sequence 4) (ring attention, sequence-parallel scan and delta rule)
    gives the one-device losses."""
    overrides = {"train.batch_size": 2, "train.seq_len": 64}
    if "hybrid" in config:
        overrides.update({"model.d_model": 32, "model.mixers.attention.n_heads": 4,
                          "model.mixers.attention.n_kv_heads": 2, "model.d_ff": 64,
                          "model.mixers.mamba.d_state": 4})
    spec = {"config": config, "overrides": overrides, "meshes": [[], [2, 1, 1, 4]], "steps": 4}
    rows = worker("sharded_losses.py", json.dumps(spec))
    assert_close(rows[1]["losses"], rows[0]["losses"])


@pytest.mark.slow
def test_moh_sharded_over_data_tensor_sequence_matches_single_device():
    """MoH (routers, gates, load-balance loss) on a (data 2, tensor 2, sequence 2) mesh:
    the single-device losses for 5 steps (ring attention over the sequence halves)."""
    overrides = {"train.batch_size": 4, "train.seq_len": 32, "model.mixer_pattern": ["moh"],
                 "model.mixers.moh.n_heads": 4, "model.mixers.moh.n_kv_heads": 2,
                 "model.mixers.moh.shared_heads": 1, "model.mixers.moh.top_k": 2}
    spec = {"config": "configs/transformer_lm.py:smoke", "overrides": overrides,
            "meshes": [[], [2, 1, 2, 2]], "steps": 5}
    rows = worker("sharded_losses.py", json.dumps(spec))
    assert_close(rows[1]["losses"], rows[0]["losses"])
