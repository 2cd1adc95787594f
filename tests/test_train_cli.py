"""End-to-end runs of train.py on the smoke preset: resume exactness, crash recovery,
outputs, and the one-line errors for bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, metrics_rows, run_train, subprocess_env

SMOKE = ["--config", "configs/mamba_lm.py:smoke"]


def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_rows(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 30-step run (the oracle for the resume tests)."""
    workdir = tmp_path_factory.mktemp("straight")
    proc = run_train(SMOKE + ["--config.train.steps=30"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_outputs(straight_run):
    names = set(os.listdir(straight_run))
    assert {"config.json", "metrics.jsonl", "loss.png", "checkpoints", "tensorboard"} <= names
    with open(straight_run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "tokens_per_sec", "learning_rate"} <= set(train_rows[0])
    assert any("val_bpb" in r for r in rows)
    assert os.listdir(straight_run / "tensorboard")
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns


# The SIGKILL test below also resumes and compares every loss with the straight run.
@pytest.mark.exhaustive
def test_resume_matches_uninterrupted(straight_run, tmp_path):
    first = run_train(SMOKE + ["--config.train.steps=20"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(SMOKE + ["--config.train.steps=30"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 20" in second.stderr
    want, got = losses(straight_run), losses(tmp_path)
    assert sorted(got) == sorted(want)
    for step in range(22, 31, 2):
        assert got[step] == want[step], (step, got[step], want[step])  # exact on CPU


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
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


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


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


BAD_INPUTS = {
    "unknown_field": (["--config.model.nope=1"], None, ["model", "nope"]),
    "empty_glob": (["--config.data.source=text:/nonexistent/**/*.txt"], None,
                   ["data.source", "matched no files"]),
    "corpus_too_small": (["--config.data.source=text:{tiny}", "--config.train.seq_len=4096"],
                         None, ["train.seq_len"]),
    "batch_vs_devices": (["--config.train.batch_size=6"],
                         {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                         ["train.batch_size", "mesh.data"]),
    "unknown_mixer": (["--config.model.mixer_pattern=('mamba', 'bogus')"], None,
                      ["model.mixer_pattern", "bogus"]),
    "mesh_product": (["--config.mesh.data=3"], None, ["mesh", "devices"]),
    "bidirectional_in_lm": (["--config.model.mixer_pattern=('bimamba',)"], None,
                            ["model.mixers.bimamba", "bidirectional", "family='encoder'"]),
    "tokenizer_folder_without_tokenizer": (["--config.data.tokenizer={dir}"], None,
                                           ["data.tokenizer", "tokenizer.json"]),
    "arrayrecord_folder_without_corpus": (["--config.data.source=arrayrecord:{dir}"], None,
                                          ["data.source", "manifest.json", "prepare"]),
    "vocab_smaller_than_the_bytes": (["--config.model.vocab_size=10"], None,
                                     ["model.vocab_size=10", "256"]),
    "nonfinite_policy": (["--config.train.nonfinite=ignore"], None,
                         ["train.nonfinite='ignore'", "'skip'"]),
    "unknown_scan_impl": (["--config.model.mixers.mamba.scan_impl=bogus"], None,
                          ["model.mixers.mamba.scan_impl='bogus'", "pallas"]),
    "zero_state_size": (["--config.model.mixers.mamba.d_state=0"], None,
                        ["model.mixers.mamba.d_state=0", "positive integer"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(case, tmp_path):
    args, env, needles = BAD_INPUTS[case]
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("print('hello')\n" * 20)
    args = [a.replace("{tiny}", str(tiny)).replace("{dir}", str(tmp_path)) for a in args]
    one_line_error(run_train(SMOKE + args, tmp_path / "run", env), *needles)
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
