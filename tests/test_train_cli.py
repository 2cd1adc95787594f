"""End-to-end runs of train.py on the smoke preset: resume exactness, crash recovery,
outputs, and the one-line errors for bad input."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, metrics_rows, run_train, subprocess_env
from jaxmix import workdir as workdir_lib

SMOKE = ["--config", "configs/mamba_lm.py:smoke"]


def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_rows(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 30-step run (the oracle for the resume tests)."""
    workdir = tmp_path_factory.mktemp("straight")
    proc = run_train(SMOKE + ["--config.train.steps=30"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_no_traceback(proc.stderr)
    return workdir


def assert_no_traceback(stderr):
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_outputs(straight_run):
    names = set(os.listdir(straight_run))
    assert {"config.json", "metrics.jsonl", "loss.png", "checkpoints", "tensorboard"} <= names
    with open(straight_run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "tokens_per_sec", "learning_rate"} <= set(train_rows[0])
    assert any("val_bpb" in r for r in rows)
    (events,) = os.listdir(straight_run / "tensorboard")
    tb_loss = {e.step: e.summary.value[0].simple_value
               for e in read_events(straight_run / "tensorboard" / events)
               if e.summary.value and e.summary.value[0].tag == "loss"}
    assert tb_loss == pytest.approx({r["step"]: r["loss"] for r in train_rows})
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns


def read_events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, its
    CRC, the record, its CRC)."""
    import struct
    from tensorboardX.proto import event_pb2
    data, at, events = path.read_bytes(), 0, []
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
        at += 12 + n + 4
    assert at == len(data)
    return events


# The SIGKILL test below also resumes and compares every loss with the straight run.
@pytest.mark.exhaustive
def test_resume_matches_uninterrupted(straight_run, tmp_path):
    first = run_train(SMOKE + ["--config.train.steps=20"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(SMOKE + ["--config.train.steps=30"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 20" in second.stderr
    assert_no_traceback(second.stderr)
    want, got = losses(straight_run), losses(tmp_path)
    assert sorted(got) == sorted(want)
    for step in range(22, 31, 2):
        assert got[step] == want[step], (step, got[step], want[step])  # exact on CPU


@pytest.mark.slow
def test_resume_past_a_damaged_latest_checkpoint_logs_one_warning(straight_run, tmp_path):
    """The latest checkpoint (step 30) has a truncated data file: the run says so in one
    warning line naming the step it falls back to (25), resumes there, and its stderr
    holds no traceback (orbax's failed restore leaves none behind)."""
    from test_checkpoints import damage
    shutil.copytree(straight_run, tmp_path / "w")
    damage(str(tmp_path / "w" / "checkpoints" / "30"), "truncated data file")
    proc = run_train(SMOKE + ["--config.train.steps=32"], tmp_path / "w")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_no_traceback(proc.stderr)
    warnings = [l for l in proc.stderr.splitlines() if "does not restore" in l]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "checkpoint step 30" in warnings[0] and "falling back to step 25" in warnings[0]
    assert "resumed from step 25" in proc.stderr
    assert checkpoint_steps(tmp_path / "w") == [25, 30, 32]


def start_and_signal(workdir, sig, n_logged, extra=()):
    """Starts a 400-step smoke run, sends `sig` once `n_logged` losses are logged;
    returns the process (its stderr piped)."""
    env = subprocess_env()  # as run_train's: the losses must match bit for bit
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(workdir), *SMOKE,
           "--config.train.steps=400", *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(workdir)) >= n_logged:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc


def checkpoint_steps(workdir):
    """The complete checkpoints' steps ([] before the checkpoints folder exists)."""
    return workdir_lib.checkpoint_steps(str(workdir / "checkpoints"))


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_uninterrupted(straight_run, tmp_path):
    """SIGTERM (preemption) between periodic checkpoints: the run finishes its step,
    saves it with the data position and exits 0. Rerun, it resumes there; killed with
    SIGKILL while saving every step (a save is most likely in flight), the next run
    resumes from the last complete checkpoint. The losses of it all are the
    uninterrupted run's, bit for bit."""
    proc = start_and_signal(tmp_path, signal.SIGTERM, 3,
                            ["--config.train.checkpoint_every=1000"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = checkpoint_steps(tmp_path)
    assert len(stopped) == 1 and 6 <= stopped[0] < 400, stopped
    assert f"stopped at step {stopped[0]} on SIGTERM" in err
    # A save every step (async): whatever the kill leaves half-written must not be
    # taken for a checkpoint.
    proc = start_and_signal(tmp_path, signal.SIGKILL, stopped[0] // 2 + 4,
                            ["--config.train.checkpoint_every=1"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL  # really killed mid-way, not finished
    assert f"resumed from step {stopped[0]}" in err
    ckpts = checkpoint_steps(tmp_path)
    assert ckpts and stopped[0] < max(ckpts) < 400
    resumed = run_train(SMOKE + ["--config.train.steps=30"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {max(ckpts)}" in resumed.stderr
    want, got = losses(straight_run), losses(tmp_path)
    for step in range(2, 31, 2):
        assert got[step] == want[step], step


@pytest.mark.slow
def test_a_failed_save_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """Once the run's first checkpoint is complete, the kernel is made to refuse its
    writes (RLIMIT_FSIZE of 1 byte on the running process: EFBIG, as a full disk gives
    ENOSPC). The next save fails: exit status 4 and one line naming the last complete
    checkpoint, which is intact: a rerun resumes from it and finishes."""
    every = ["--config.train.checkpoint_every=300", "--config.train.log_every=1000",
             "--config.train.eval_every=1000", "--config.train.steps=1000"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(tmp_path),
           *SMOKE, *every]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not checkpoint_steps(tmp_path):
        time.sleep(0.01)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    kept = checkpoint_steps(tmp_path)
    last = one_line_error(subprocess.CompletedProcess(cmd, 4, "", err),
                          "could not write", "File too large",
                          f"the last complete checkpoint, step {kept[-1]} in", "is intact")
    assert 300 <= kept[-1] < 1000, (kept, last)
    resumed = run_train(SMOKE + every, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {kept[-1]}" in resumed.stderr
    assert "does not restore" not in resumed.stderr
    assert checkpoint_steps(tmp_path)[-1] == 1000


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


# tests/test_bad_inputs.py tries every kind of bad input through train.py's entry
# point; these go through a fresh interpreter: a flag-parsing error and a config check.
BAD_INPUTS = {
    "unknown_field": (["--config.model.nope=1"], ["model", "nope"]),
    "zero_state_size": (["--config.model.mixers.mamba.d_state=0"],
                        ["model.mixers.mamba.d_state=0", "positive integer"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(case, tmp_path):
    args, needles = BAD_INPUTS[case]
    one_line_error(run_train(SMOKE + args, tmp_path / "run"), *needles)
    assert not (tmp_path / "run").exists()  # nothing written


def test_workdir_that_is_a_file_is_one_line_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    one_line_error(run_train(SMOKE, path), "--workdir", "is a file, not a folder")
    assert path.read_text() == "mine"


@pytest.mark.slow
def test_nonfinite_loss_stops_with_status_3_and_keeps_the_last_checkpoint(tmp_path):
    proc = run_train(SMOKE + ["--config.train.learning_rate=1e12",
                              "--config.train.grad_clip=0", "--config.train.checkpoint_every=2"],
                     tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = one_line_error(proc, "loss nan", "non-finite gradients in", "embed/embedding",
                          "the last good checkpoint is step 2", "train.nonfinite='skip'")
    stopped = int(last.split("step ")[1].split(":")[0])
    assert stopped >= 3 and checkpoint_steps(tmp_path) == [2]  # nothing saved after it


@pytest.mark.slow
def test_incompatible_workdir(straight_run):
    """The trained smoke workdir refuses another model (before anything is written)."""
    before = sorted(os.listdir(straight_run))
    bad = run_train(SMOKE + ["--config.model.d_model=48"], straight_run)
    one_line_error(bad, "model.d_model", "--workdir")
    assert sorted(os.listdir(straight_run)) == before


@pytest.mark.slow
def test_init_from_workdir_and_sample(straight_run, tmp_path):
    proc = run_train(SMOKE + ["--config.train.steps=2", f"--config.init_from={straight_run}"],
                     tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised params from {straight_run}" in proc.stderr
    assert "--- sample ---" in proc.stdout
    # Starts from the trained weights: far below a fresh model's first loss.
    assert losses(tmp_path)[2] < losses(straight_run)[2] - 0.3


@pytest.mark.slow
def test_finetune_without_workdir_leaves_the_source_as_it_was(straight_run, tmp_path):
    """configs/finetune.py:MODEL with no --workdir trains in runs/finetune-<MODEL's
    name> under the current folder; MODEL (here a converted workdir) stays byte for
    byte as it was, and train.py refuses to train inside it."""
    from cli_cases import snapshot
    from jaxmix.convert import write_workdir
    source = tmp_path / "imported"
    config = workdir_lib.read_config(str(straight_run))
    params, _ = workdir_lib.restore_params(str(straight_run / "checkpoints"))
    write_workdir(str(source), config, params, source="/models/hf")
    before = snapshot(source)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           f"{ROOT}/configs/finetune.py:imported", "--config.train.steps=2",
           "--config.train.batch_size=4", "--config.train.seq_len=32",
           "--config.train.eval_every=2", "--config.train.eval_batches=1",
           "--config.train.checkpoint_every=2", "--config.train.warmup_steps=0",
           "--config.sample_at_end=False"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised params from imported" in proc.stderr
    assert checkpoint_steps(tmp_path / "runs" / "finetune-imported") == [2]
    assert snapshot(source) == before
    inside = subprocess.run(cmd + ["--workdir", "imported"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    one_line_error(inside, "--workdir imported", "init_from")
    assert snapshot(source) == before
