"""Bad input through train.py's command line, systematically: every case must exit with
status 2 after exactly one `error:` line that names the field and the fix, print no
traceback, and write nothing into the workdir it was given (an existing one, left
byte for byte as it was) or create one. That includes workdirs train.py must never
write into: a Hugging Face model, a converted model, a folder of other files, the
init_from folder.

The cases run through tests/cli_driver.py (train.py's entry point in a forked child
per case, its libraries imported once; as root, without the capabilities that bypass
file modes); test_train_cli.py runs a few through a fresh `python train.py` too. The
other command lines' cases are in test_cli_bad_inputs.py."""
import json
import os
import shutil

from cli_cases import one_line_problem, run_driver, snapshot, write
from conftest import ROOT, run_train

SMOKE = ["--config", "configs/mamba_lm.py:smoke"]
HF_CONFIG = {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2,
             "vocab_size": 256, "state_size": 4, "conv_kernel": 4, "expand": 2}


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
    """A bad-input case: train.py arguments after the smoke config (unless they give a
    --config of their own; {d} is the case's folder, {trained} a trained smoke workdir,
    {workdir} the case's --workdir), the strings its error line must hold, a setup(d)
    making its files, and its --workdir: "empty" (an existing empty folder;
    "empty-unwritable" / "empty-unreadable" with mode 555 / 000), "trained" (a copy of
    a trained smoke workdir), "converted" (the same, marked as made by `python -m
    jaxmix.convert`), "hf" (a Hugging Face model folder), "other" (a folder holding
    notes.txt), "inside-trained" (a new folder inside a trained workdir) or
    "new-in-locked" (a new folder inside an unwritable one)."""
    return dict(args=args, needles=needles, setup=setup, workdir=workdir, env=env or {})


def make_workdir(kind, workdir, trained):
    """The case's --workdir of `kind` (see `case`), before its setup runs."""
    if kind in ("trained", "converted"):
        shutil.copytree(trained, workdir)
    if kind == "converted":
        config = json.loads((workdir / "config.json").read_text())
        config["jaxmix_workdir"] = {"kind": "converted", "source": "/models/hf"}
        (workdir / "config.json").write_text(json.dumps(config))
    elif kind.startswith("empty"):
        workdir.mkdir(parents=True)
    elif kind == "hf":
        write(f"{workdir}/config.json", json.dumps(HF_CONFIG))
        (workdir / "model.safetensors").write_bytes(b"weights")
        write(f"{workdir}/tokenizer.json", "{}")
    elif kind == "other":
        write(f"{workdir}/notes.txt", "mine")
    elif kind == "new-in-locked":
        workdir.parent.mkdir()


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
    # folders a run must never write into
    "workdir_a_hugging_face_model": case([], ["--workdir", "Hugging Face", "init_from"],
                                         workdir="hf"),
    "workdir_a_converted_model": case([], ["--workdir", "converted", "finetune.py"],
                                      workdir="converted"),
    "workdir_of_other_files": case([], ["--workdir", "notes.txt", "new or empty folder"],
                                   workdir="other"),
    "workdir_is_init_from": case(["--config.init_from={workdir}"],
                                 ["--workdir", "init_from", "another --workdir"],
                                 workdir="trained"),
    "workdir_inside_init_from": case(["--config.init_from={d}/run"],
                                     ["--workdir", "init_from"], workdir="inside-trained"),
    "finetune_into_its_source": case(["--config=configs/finetune.py:{workdir}"],
                                     ["--workdir", "init_from"], workdir="converted"),
}


def run_cases(trained, base):
    """{case: (exit status, stderr, workdir before, workdir after)} of every case."""
    os.chmod(base, 0o755)
    runs, before = [], {}
    for name, c in CASES.items():
        d = base / name
        d.mkdir()
        kind = c["workdir"]
        workdir = d / "locked" / "run" if kind == "new-in-locked" else d / "run"
        watch = workdir
        if kind == "inside-trained":  # a new folder inside a trained workdir, the init_from
            make_workdir("trained", workdir, trained)
            workdir = workdir / "ft"
        else:
            make_workdir(kind, workdir, trained)
        if c["setup"] is not None:
            c["setup"](str(d))
        before[name] = snapshot(watch)
        if kind == "new-in-locked":
            os.chmod(workdir.parent, 0o555)
        if kind in ("empty-unwritable", "empty-unreadable"):
            os.chmod(workdir, 0o555 if kind == "empty-unwritable" else 0)
        args = c["args"] if any(a.startswith("--config=") for a in c["args"]) else \
            [*SMOKE, *c["args"]]
        argv = [a.replace("{d}", str(d)).replace("{trained}", str(trained))
                .replace("{workdir}", str(workdir)) for a in [*args, "--workdir", str(workdir)]]
        runs.append({"argv": argv, "env": c["env"], "out": str(d / "out"), "watch": str(watch)})
    results = run_driver(runs, base / "cases.json")
    return {name: (status, err, before[name], snapshot(run["watch"]))
            for name, run, (status, _, err) in zip(CASES, runs, results, strict=True)}


def test_every_bad_input_is_one_error_line_and_writes_nothing(tmp_path):
    """All cases in one driver run (one import of train.py's libraries)."""
    trained = tmp_path / "trained"
    proc = run_train(SMOKE + ["--config.train.steps=2", "--config.train.checkpoint_every=2",
                              "--config.sample_at_end=False"], trained)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "cases").mkdir()
    results = run_cases(trained, tmp_path / "cases")
    problems = {case: one_line_problem(CASES[case]["needles"], *outcome)
                for case, outcome in results.items()}
    problems = {case: p for case, p in problems.items() if p is not None}
    assert not problems, "\n".join(f"{case}: {p}" for case, p in problems.items())
