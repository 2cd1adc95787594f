"""The command lines' shared conventions: every flag has a description and shows its
default in --help, train.py's default workdir depends on the config and the preset,
outputs are never silently replaced, and a setting a command adjusts on its own (or a
run that nears the machine's memory, or a split that starves training) is said in one
line. Bad input: test_bad_inputs.py and test_cli_bad_inputs.py."""
import argparse
import importlib
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

PARSERS = ["jaxmix.generate", "jaxmix.evaluate", "jaxmix.duo.__main__",
           "jaxmix.convert.__main__", "jaxmix.data.prepare", "jaxmix.train.memory"]


def flags_of(parser):
    """(parser, action) of every flag, sub-commands' flags included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from flags_of(sub)
        elif action.dest != "help":
            yield parser, action


@pytest.mark.parametrize("module", PARSERS)
def test_every_flag_has_a_description_and_its_default(module):
    parser = importlib.import_module(module).build_parser()
    for owner, action in flags_of(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, name
        text = owner.formatter_class("x")._get_help_string(action)
        assert re.search(r"\(default: [^)]+\)|default: |\(required\)|\(default", text), \
            (name, text)
    command = {"jaxmix.duo.__main__": ["jaxmix.duo", "identify"],
               "jaxmix.convert.__main__": ["jaxmix.convert"]}.get(module, [module])
    out = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True,
                         text=True, cwd=ROOT, env=subprocess_env(), timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout and out.stderr == "", out.stderr
    assert out.stdout.count("(default") + out.stdout.count("(required)") >= 2, out.stdout


def test_a_flag_without_help_is_refused():
    from jaxmix import cli
    p = cli.Parser("x", "y")
    with pytest.raises(TypeError, match="help"):
        p.add_argument("--steps", type=int, default=3)
    with pytest.raises(TypeError, match="default"):
        p.add_argument("--out", help="where the results go")


def test_train_flags_have_help():
    sys.argv = ["train.py"]
    sys.path.insert(0, ROOT)
    train = importlib.import_module("train")
    for name in ("config", "workdir", "coordinator_address", "num_processes", "process_id",
                 "cpu_collectives", "heartbeat_timeout"):
        assert len(train.FLAGS[name].help) > 10, name
    assert "runs/<stem>-<preset>" in train.FLAGS["workdir"].help


def test_default_workdir_per_config_and_preset():
    sys.path.insert(0, ROOT)
    train = importlib.import_module("train")
    assert train.default_workdir("configs/mamba_lm.py") == "runs/mamba_lm"
    assert train.default_workdir("configs/mamba_lm.py:default") == "runs/mamba_lm"
    assert train.default_workdir("configs/mamba_lm.py:smoke") == "runs/mamba_lm-smoke"
    assert train.default_workdir("configs/transformer_lm.py:moh-50") == \
        "runs/transformer_lm-moh-50"
    assert train.default_workdir("configs/finetune.py:runs/imported") == \
        "runs/finetune-imported"
    assert train.default_workdir("configs/finetune.py:~/models/mamba-130m-hf/") == \
        "runs/finetune-mamba-130m-hf"


def test_capped_cpu_devices_are_said(monkeypatch):
    import ml_collections
    from jaxmix import cpu
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    monkeypatch.setattr(cpu, "use_cores_as_devices", lambda n: True)
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(cpu, "compile_loops_whole", lambda: True)

    def notes(cap, batch):
        c = ml_collections.ConfigDict(dict(
            train=dict(cpu_devices=cap, batch_size=batch),
            mesh=dict(data=-1, fsdp=1, tensor=1, sequence=1)))
        return cpu.prepare_training_host(c)
    assert notes(3, 16) == ["train.cpu_devices=3 is more than this host's 2 cores; using "
                            "2 CPU devices"]
    assert notes(2, 5) == ["train.cpu_devices=2: train.batch_size=5 is not divisible by 2; "
                           "using 1 CPU device"]
    assert notes(0, 16) == notes(2, 16) == notes(1, 16) == []


def test_memory_estimate_over_the_chip_says_what_would_fit(capsys):
    from jaxmix.train import memory
    assert memory.main(["--config", "configs/mamba_lm.py:2.8b", "--chips", "32"]) == 0
    out, err = capsys.readouterr()
    row = [line for line in out.splitlines() if "2.8b" in line][0]
    total = float(row.split("|")[5])
    assert total > 16
    assert len(err.splitlines()) == 1 and err.startswith("warning: "), err
    assert "does not fit a 16 GiB chip" in err and "64 chips would need" in err, err
    want = float(re.search(r"64 chips would need ([\d.]+) GiB", err).group(1))
    config = importlib.import_module("jaxmix.config_files").load_config(
        "configs/mamba_lm.py:2.8b", root=ROOT)
    assert want == round(memory.estimate(config, 64).total / memory.GIB, 1) <= 12
    assert memory.main(["--config", "configs/mamba_lm.py:2.8b", "--chips", "64"]) == 0
    assert capsys.readouterr().err == ""
    # a bigger chip: the same 32 chips fit
    assert memory.main(["--config", "configs/mamba_lm.py:2.8b", "--chips", "32",
                        "--chip-gib", "32"]) == 0
    assert capsys.readouterr().err == ""


def test_compiled_memory_near_the_host_is_said(monkeypatch):
    import jax
    import jax.numpy as jnp
    from jaxmix import cpu
    from jaxmix.train import memory
    compiled = jax.jit(lambda x: x @ x.T).lower(jnp.zeros((512, 512))).compile()
    devices = jax.devices()[:1]
    monkeypatch.setattr(cpu, "host_memory_bytes", lambda: 1 << 50)
    assert memory.compiled_warning(compiled, devices) is None
    monkeypatch.setattr(cpu, "host_memory_bytes", lambda: 1 << 20)
    line = memory.compiled_warning(compiled, devices)
    assert "may run out of memory" in line and "1 CPU devices" in line, line


def test_a_split_that_starves_training_is_said(tmp_path, caplog):
    from jaxmix.data.corpus import load_corpus, path_bucket
    # files whose path hashes put them in validation at val_fraction 0.5
    names = [f"f{i}.txt" for i in range(40)]
    val = [n for n in names if path_bucket(n) < 500]
    train = [n for n in names if path_bucket(n) >= 500]
    assert val and train
    for n in names:
        (tmp_path / n).write_text("x" * (10_000 if n == val[0] else 100))
    with caplog.at_level("WARNING", logger="jaxmix"):
        c = load_corpus(f"text:{tmp_path}/*.txt", 0.5)
    assert len(c.train_u8) < len(c.val_u8)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "in validation" in line and val[0] in line and "for training" in line
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxmix"):
        load_corpus(f"text:{tmp_path}/f1*.txt", 0.02)
    assert not caplog.records


def test_prepare_says_when_validation_takes_most(tmp_path, capsys):
    from jaxmix.data import prepare
    from jaxmix.data.corpus import path_bucket
    names = [f"d{i}.txt" for i in range(20)]
    big = next(n for n in names if path_bucket(n) < 500)
    for n in names:
        (tmp_path / n).write_text("y" * (20_000 if n == big else 50))
    assert prepare.main(["--input", f"{tmp_path}/*.txt", "--tokenizer", "bytes", "--out",
                         str(tmp_path / "out"), "--val-fraction", "0.5", "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "in 1 shard;" in out and "1 shards" not in out and " 0.0 s" not in out, out
    assert err.startswith("warning: --val-fraction 0.5: the split by document") and \
        "tokens for training" in err, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["tokens"] > manifest["splits"]["train"]["tokens"]


def test_evaluate_never_replaces_earlier_results(tmp_path):
    from jaxmix.evaluate import output_base
    base = str(tmp_path / "eval_mqar")
    assert output_base(str(tmp_path), "mqar", False) == base
    (tmp_path / "eval_mqar.md").write_text("earlier")
    assert output_base(str(tmp_path), "mqar", False) == base + "-2"
    (tmp_path / "eval_mqar-2.png").write_bytes(b"earlier")
    assert output_base(str(tmp_path), "mqar", False) == base + "-3"
    assert output_base(str(tmp_path), "mqar", True) == base
    assert output_base(str(tmp_path), "induction", False) == str(tmp_path / "eval_induction")


def test_a_workdir_or_corpus_names_its_tokenizer(tmp_path):
    from bpe import train_bpe
    from jaxmix.data.tokenizer import load_tokenizer
    train_bpe(tmp_path / "run" / "tokenizer", vocab_size=300, n_files=5)
    direct = load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    via_workdir = load_tokenizer(str(tmp_path / "run"), field="--tokenizer")
    assert via_workdir.sha256 == direct.sha256 and via_workdir.vocab_size == 300
