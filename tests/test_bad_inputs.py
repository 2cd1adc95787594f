"""Bad input through train.py's command line, systematically: every case must exit with
status 2 after exactly one `error:` line that names the field and the fix, print no
traceback, and write nothing into the workdir it was given (an existing one, left
byte for byte as it was) or create one.

The cases run through tests/cli_driver.py (train.py's entry point in a forked child
per case, its libraries imported once; as root, without the capabilities that bypass
file modes); test_train_cli.py runs a few through a fresh `python train.py` too."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

from conftest import ROOT, run_train, subprocess_env

SMOKE = ["--config", "configs/mamba_lm.py:smoke"]
HF_CONFIG = {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2,
             "vocab_size": 256, "state_size": 4, "conv_kernel": 4, "expand": 2}


def write(path, text, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)
    return path


def hf_dir(d, config):
    write(f"{d}/hf/config.json", config if isinstance(config, str) else json.dumps(config))
    return f"{d}/hf"


def unreadable_config(d):
    shutil.copy(os.path.join(ROOT, "configs/mamba_lm.py"), f"{d}/mine.py")
    os.chmod(f"{d}/mine.py", 0)


def corrupt_config_json(d):
    write(f"{d}/run/config.json", '{"model": {"d_model": 32,')


def init_from_workdir_without_checkpoints(d):
    write(f"{d}/other/config.json", json.dumps({"model": {"d_model": 32}}))
    os.makedirs(f"{d}/other/checkpoints")


def case(args, needles, setup=None, workdir="empty", env=None):
    """A bad-input case: train.py arguments after the smoke config ({d} is the case's
    folder, {trained} a trained smoke workdir), the strings its error line must hold, a
    setup(d) making its files, and its --workdir: "empty" (an existing folder holding
    notes.txt; "empty-unwritable" / "empty-unreadable" with mode 555 / 000), "trained"
    (a copy of a trained smoke workdir) or "new-in-locked" (a new folder inside an
    unwritable one)."""
    return dict(args=args, needles=needles, setup=setup, workdir=workdir, env=env or {})


CASES = {
    # field types
    "int_not_a_number": case(["--config.train.steps=ten"], ["train.steps", "ten"]),
    "float_not_a_number": case(["--config.train.learning_rate=fast"],
                               ["train.learning_rate", "fast"]),
    "bool_not_a_bool": case(["--config.model.tie_embeddings=maybe"],
                            ["model.tie_embeddings", "maybe"]),
    "tuple_not_a_tuple": case(["--config.model.mixer_pattern=7"], ["model.mixer_pattern"]),
    "unknown_field": case(["--config.model.nope=1"], ["model", "nope"]),
    "mixer_field_at_the_model": case(["--config.model.d_state=8"],
                                     ["--config.model.mixers.mamba.d_state"]),
    "unknown_dtype": case(["--config.model.dtype=float8"], ["model.dtype", "bfloat16"]),
    # out of range
    "negative_steps": case(["--config.train.steps=-5"], ["train.steps=-5", "positive"]),
    "zero_batch": case(["--config.train.batch_size=0"], ["train.batch_size=0", "positive"]),
    "negative_learning_rate": case(["--config.train.learning_rate=-0.1"],
                                   ["train.learning_rate=-0.1", "positive"]),
    "zero_state_size": case(["--config.model.mixers.mamba.d_state=0"],
                            ["model.mixers.mamba.d_state=0", "positive integer"]),
    "val_fraction_above_one": case(["--config.data.val_fraction=1.5"],
                                   ["data.val_fraction", "1.5", "0.02"]),
    "negative_grad_clip": case(["--config.train.grad_clip=-1.0"],
                               ["train.grad_clip=-1.0", ">= 0"]),
    "negative_warmup": case(["--config.train.warmup_steps=-3"],
                            ["train.warmup_steps=-3", ">= 0"]),
    "zero_nonfinite_max": case(["--config.train.nonfinite_max=0"],
                               ["train.nonfinite_max=0", ">= 1"]),
    "negative_cpu_devices": case(["--config.train.cpu_devices=-1"],
                                 ["train.cpu_devices=-1", ">= 0"]),
    # inconsistent values
    "mesh_product": case(["--config.mesh.data=3"], ["mesh", "devices"]),
    "batch_vs_devices": case(["--config.train.batch_size=6"], ["train.batch_size", "mesh.data"],
                             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}),
    "corpus_too_small": case(["--config.data.source=text:{d}/tiny.txt",
                              "--config.train.seq_len=4096"], ["train.seq_len"],
                             lambda d: write(f"{d}/tiny.txt", "print('hello')\n" * 20)),
    "bidirectional_in_lm": case(["--config.model.mixer_pattern=('bimamba',)"],
                                ["model.mixers.bimamba", "bidirectional", "family='encoder'"]),
    "vocab_smaller_than_the_bytes": case(["--config.model.vocab_size=10"],
                                         ["model.vocab_size=10", "256"]),
    # implementation, mixer and policy names
    "unknown_scan_impl": case(["--config.model.mixers.mamba.scan_impl=bogus"],
                              ["model.mixers.mamba.scan_impl='bogus'", "pallas"]),
    "unknown_attn_impl": case(["--config.model.mixer_pattern=('attention',)",
                               "--config.model.mixers.attention.attn_impl=bogus"],
                              ["model.mixers.attention.attn_impl='bogus'", "pallas"]),
    "unknown_mixer": case(["--config.model.mixer_pattern=('mamba', 'bogus')"],
                          ["model.mixer_pattern", "bogus"]),
    "unknown_nonfinite_policy": case(["--config.train.nonfinite=ignore"],
                                     ["train.nonfinite='ignore'", "'skip'"]),
    "unknown_packing": case(["--config.data.packing=tight"], ["data.packing", "segments"]),
    "unknown_source": case(["--config.data.source=s3://bucket/corpus"],
                           ["data.source", "s3://bucket/corpus"]),
    # paths: missing, files, unreadable, unwritable
    "config_file_missing": case(["--config=configs/nope.py"], ["--config", "nope.py"]),
    "config_preset_unknown": case(["--config=configs/mamba_lm.py:huge"], ["huge", "smoke"]),
    "config_file_unreadable": case(["--config={d}/mine.py:smoke"],
                                   ["--config", "mine.py", "permission"], unreadable_config),
    "text_glob_matches_nothing": case(["--config.data.source=text:{d}/none/**/*.txt"],
                                      ["data.source", "matched no files"]),
    "text_file_unreadable": case(["--config.data.source=text:{d}/corpus/*.txt"],
                                 ["data.source", "a.txt", "permission"],
                                 lambda d: write(f"{d}/corpus/a.txt", "x = 1\n" * 999, 0)),
    "tokenizer_missing": case(["--config.data.tokenizer={d}/tok"], ["data.tokenizer", "tok"]),
    "tokenizer_folder_without_tokenizer": case(["--config.data.tokenizer={d}"],
                                               ["data.tokenizer", "tokenizer.json"]),
    "tokenizer_file_corrupt": case(["--config.data.tokenizer={d}/tok/tokenizer.json"],
                                   ["data.tokenizer", "tokenizer.json"],
                                   lambda d: write(f"{d}/tok/tokenizer.json", "{not json")),
    "arrayrecord_folder_without_corpus": case(["--config.data.source=arrayrecord:{d}"],
                                              ["data.source", "manifest.json", "prepare"]),
    "arrayrecord_manifest_corrupt": case(["--config.data.source=arrayrecord:{d}/corpus"],
                                         ["data.source", "manifest.json"],
                                         lambda d: write(f"{d}/corpus/manifest.json", "[1,")),
    "workdir_in_unwritable_folder": case([], ["--workdir", "locked", "not a writable folder"],
                                         workdir="new-in-locked"),
    "workdir_unwritable": case([], ["--workdir", "not writable"], workdir="empty-unwritable"),
    "workdir_unreadable": case([], ["--workdir", "not readable"], workdir="empty-unreadable"),
    # workdirs of earlier runs
    "workdir_config_json_corrupt": case([], ["--workdir", "config.json", "delete"],
                                        corrupt_config_json, workdir="trained"),
    "workdir_of_another_model": case(["--config.model.d_model=48"],
                                     ["model.d_model", "--workdir"], workdir="trained"),
    # init_from
    "init_from_missing": case(["--config.init_from={d}/nothing"],
                              ["init_from", "nothing", "not a directory"]),
    "init_from_a_file": case(["--config.init_from={d}/notes.md"], ["init_from", "notes.md"],
                             lambda d: write(f"{d}/notes.md", "hi")),
    "init_from_empty_folder": case(["--config.init_from={d}/empty"],
                                   ["init_from", "config.json"],
                                   lambda d: os.makedirs(f"{d}/empty")),
    "init_from_workdir_without_checkpoints": case(["--config.init_from={d}/other"],
                                                  ["init_from", "no checkpoint", "train first"],
                                                  init_from_workdir_without_checkpoints),
    "init_from_workdir_of_another_model": case(["--config.init_from={trained}",
                                                "--config.model.d_model=48"],
                                               ["init_from", "shape"]),
    "init_from_hf_config_corrupt": case(["--config.init_from={d}/hf"],
                                        ["init_from", "config.json"],
                                        lambda d: hf_dir(d, '{"model_type": "mamba",')),
    "init_from_hf_unknown_model_type": case(["--config.init_from={d}/hf"],
                                            ["init_from", "model_type", "bert"],
                                            lambda d: hf_dir(d, {**HF_CONFIG,
                                                                 "model_type": "bert"})),
    "init_from_hf_without_weights": case(["--config.init_from={d}/hf"],
                                         ["init_from", "safetensors"],
                                         lambda d: hf_dir(d, HF_CONFIG)),
    "init_from_hf_config_missing_a_field": case(
        ["--config.init_from={d}/hf"], ["init_from", "hidden_size"],
        lambda d: hf_dir(d, {k: v for k, v in HF_CONFIG.items() if k != "hidden_size"})),
}


def snapshot(path):
    """Every file and folder under `path`: its mode, and its bytes for files."""
    if not os.path.lexists(path):
        return None
    os.chmod(path, os.stat(path).st_mode | 0o700)  # to look inside a sealed case
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            found[os.path.relpath(full, path)] = (
                st.st_mode, pathlib.Path(full).read_bytes() if name in files else None)
    return found


def run_cases(trained, base):
    """{case: (exit status, stderr, workdir before, workdir after)} of every case."""
    os.chmod(base, 0o755)
    runs, before = [], {}
    for name, c in CASES.items():
        d = base / name
        d.mkdir()
        kind = c["workdir"]
        workdir = d / "locked" / "run" if kind == "new-in-locked" else d / "run"
        if kind == "trained":
            shutil.copytree(trained, workdir)
        elif kind.startswith("empty"):
            write(f"{workdir}/notes.txt", "mine")
        if kind == "new-in-locked":
            workdir.parent.mkdir()
        if c["setup"] is not None:
            c["setup"](str(d))
        before[name] = snapshot(workdir)
        if kind == "new-in-locked":
            os.chmod(workdir.parent, 0o555)
        if kind in ("empty-unwritable", "empty-unreadable"):
            os.chmod(workdir, 0o555 if kind == "empty-unwritable" else 0)
        argv = [a.replace("{d}", str(d)).replace("{trained}", str(trained))
                for a in [*SMOKE, *c["args"], "--workdir", str(workdir)]]
        runs.append({"argv": argv, "env": c["env"], "out": str(d / "out"),
                     "workdir": str(workdir)})
    spec = base / "cases.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_driver.py"),
                           str(spec)], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for name, run in zip(CASES, runs, strict=True):
        with open(f"{run['out']}.status") as f:
            status = f.read()
        with open(f"{run['out']}.stderr") as f:
            err = f.read()
        out[name] = (status, err, before[name], snapshot(run["workdir"]))
    return out


def problem(case, status, err, before, after):
    """What is wrong with one case's outcome, or None."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    last = ([line for line in err.splitlines() if line.strip()] or [""])[-1]
    if "Traceback" in err:
        return f"a traceback: {err[-1500:]}"
    if len(errors) != 1 or last != errors[0]:
        return f"not exactly one error line, last: {err[-1500:]}"
    missing = [n for n in CASES[case]["needles"] if n not in last]
    if missing:
        return f"{missing} not in {last!r}"
    if status != "2":
        return f"exit status {status}: {last}"
    if after != before:
        return f"the workdir changed: {sorted(set(after or {}) ^ set(before or {}))}"
    return None


def test_every_bad_input_is_one_error_line_and_writes_nothing(tmp_path):
    """All cases in one driver run (one import of train.py's libraries)."""
    trained = tmp_path / "trained"
    proc = run_train(SMOKE + ["--config.train.steps=2", "--config.train.checkpoint_every=2",
                              "--config.sample_at_end=False"], trained)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "cases").mkdir()
    results = run_cases(trained, tmp_path / "cases")
    problems = {case: problem(case, *outcome) for case, outcome in results.items()}
    problems = {case: p for case, p in problems.items() if p is not None}
    assert not problems, "\n".join(f"{case}: {p}" for case, p in problems.items())
