"""End-to-end runs of train.py on the smoke preset: resume exactness, crash recovery,
outputs, and the one-line errors for bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_train, subprocess_env

SMOKE = ["--config", "configs/mamba_lm.py:smoke"]


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


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


@pytest.mark.slow
def test_sigkill_resumes_from_last_checkpoint(straight_run, tmp_path):
    env = subprocess_env()  # as run_train's: the losses must match bit for bit
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(tmp_path), *SMOKE,
           "--config.train.steps=400", "--config.train.checkpoint_every=4"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(tmp_path)) >= 6:  # step 12 logged
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # really killed mid-way, not finished
    ckpts = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert ckpts and max(ckpts) < 400
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
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(case, tmp_path):
    args, env, needles = BAD_INPUTS[case]
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("print('hello')\n" * 20)
    args = [a.replace("{tiny}", str(tiny)).replace("{dir}", str(tmp_path)) for a in args]
    one_line_error(run_train(SMOKE + args, tmp_path / "run", env), *needles)
    assert not (tmp_path / "run").exists()  # nothing written


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
