"""A BPE tokenizer trained here drives the whole fine-tuning path through the real CLIs,
with no network: an HF Mamba directory holding that tokenizer -> jaxmix.convert ->
prepare with the imported tokenizer -> train.py --config configs/finetune.py (packed
segments, init_from) -> resume -> the generate CLI."""
import os
import sysconfig

import pytest

from bpe import train_bpe
from conftest import metrics_rows, run_train
from jaxmix.data.prepare import main as prepare_main


def metrics(workdir, key):
    return {r["step"]: r[key] for r in metrics_rows(workdir) if key in r}


def tiny_hf_mamba(directory, vocab_size):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=vocab_size, hidden_size=32, state_size=4,
                                   num_hidden_layers=2)
    transformers.MambaForCausalLM(cfg).save_pretrained(directory)


@pytest.mark.slow
def test_bpe_convert_prepare_finetune_resume_generate(tmp_path, capsys):
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    train_bpe(hf_dir)  # tokenizer.json + tokenizer_config.json (eos) beside the model
    tiny_hf_mamba(hf_dir, 2048)
    from jaxmix import convert
    convert.from_hf(str(hf_dir), str(imported))
    assert os.path.isfile(imported / "tokenizer" / "tokenizer.json")
    stdlib = sysconfig.get_paths()["stdlib"]
    corpus, run = tmp_path / "corpus", tmp_path / "run"
    assert prepare_main(["--input", f"{stdlib}/json/*.py", "--input", f"{stdlib}/email/*.py",
                         "--tokenizer", str(imported / "tokenizer"), "--out", str(corpus),
                         "--workers", "1"]) == 0
    args = ["--config", f"configs/finetune.py:{imported}",
            f"--config.data.source=arrayrecord:{corpus}", "--config.train.steps=10",
            "--config.train.batch_size=4", "--config.train.seq_len=32",
            "--config.train.learning_rate=3e-3", "--config.train.warmup_steps=2",
            "--config.train.log_every=2", "--config.train.eval_every=5",
            "--config.train.eval_batches=2", "--config.train.checkpoint_every=5",
            "--config.sample_at_end=False"]
    first = run_train(args + ["--config.train.steps=5"], run)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"initialised params from {imported}" in first.stderr
    assert "2,048" in first.stderr and "segments" in first.stderr  # the data line
    resumed = run_train(args, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 5" in resumed.stderr
    losses = metrics(run, "loss")
    assert sorted(losses) == [2, 4, 5, 6, 8, 10] and losses[10] < losses[2]
    assert metrics(run, "val_bpb")[10] > 0
    assert os.path.isfile(run / "tokenizer" / "tokenizer.json")
    from jaxmix import generate  # the CLI in-process: decodes with the workdir's tokenizer
    capsys.readouterr()  # prepare's summary line
    assert generate.main(["--workdir", str(run), "--prompt", "def ",
                          "--max_new_tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > len("def ") + 8
