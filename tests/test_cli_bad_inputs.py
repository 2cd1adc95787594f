"""Bad input through every command line but train.py's (test_bad_inputs.py has those):
generate, evaluate, duo identify, convert (both ways), prepare and memory. Each takes
at least ten kinds of mistake, its own and the shared ones (a Hugging Face folder or an
encoder workdir where a language model's workdir belongs, a file for a folder, a
missing or unwritable output, out-of-range values, unknown flags), and must exit with
status 2 after exactly one `error:` line naming the flag and the fix, with no
traceback, and leave every folder it was given as it was.

Each case runs in a folder of its own; the workdirs it names ({lm}: a Mamba LM, {attn}:
an attention LM trained on passkey, {encoder}: a byte encoder, {hf}: a Hugging Face
Mamba folder, {bare}: a workdir without checkpoints) are copied into that folder, and
the whole folder is compared before and after."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cli_cases import one_line_problem, run_driver, snapshot, write

GENERATE, EVALUATE, DUO = "jaxmix.generate", "jaxmix.evaluate", "jaxmix.duo.__main__"
CONVERT, PREPARE, MEMORY = "jaxmix.convert.__main__", "jaxmix.data.prepare", "jaxmix.train.memory"
POD = "configs/mamba_lm.py:2.8b"


def case(cli, args, needles, setup=None):
    """A case: the command's module, its arguments ({d}: the case's folder; {lm},
    {attn}, {encoder}, {hf}, {bare}: copies of the fixtures in it), the strings its
    error line must hold, and a setup(d) making more files."""
    return dict(cli=cli, args=args, needles=needles, setup=setup)


def locked(d, name="locked"):
    """A folder this process cannot write into (mode 555)."""
    os.makedirs(f"{d}/{name}")
    os.chmod(f"{d}/{name}", 0o555)


def with_file(d, name="afile"):
    write(f"{d}/{name}", "x")


def with_heads(d):
    write(f"{d}/attn/duo_heads.json", "{}")


def with_corpus(d):
    write(f"{d}/corpus/a.txt", "hello world\n" * 50)
    write(f"{d}/corpus/b.jsonl", json.dumps({"body": "no text field"}) + "\n")


def with_mlp(d):
    """The copied Mamba workdir's config given an MLP: a model HF has no class for."""
    path = f"{d}/lm/config.json"
    config = json.load(open(path))
    config["model"]["d_ff"] = 64
    write(path, json.dumps(config))


def not_a_config(d):
    write(f"{d}/plain.py", "x = 1\n")


def broken_config(d):
    write(f"{d}/broken.py", "def get_config(:\n")


def unreadable_config(d):
    write(f"{d}/mine.py", "def get_config(preset=''):\n    return None\n", 0)


CASES = {
    # ------------------------------------------------------------------ generate
    "generate_hf_folder": case(GENERATE, ["--workdir", "{hf}"],
                               ["--workdir", "Hugging Face", "convert --from-hf"]),
    "generate_encoder": case(GENERATE, ["--workdir", "{encoder}"],
                             ["--workdir", "encoder", "language model"]),
    "generate_file": case(GENERATE, ["--workdir", "{d}/afile"], ["--workdir", "is a file"],
                          with_file),
    "generate_missing": case(GENERATE, ["--workdir", "{d}/nothing"],
                             ["--workdir", "no such folder"]),
    "generate_other_folder": case(GENERATE, ["--workdir", "{d}/corpus"],
                                  ["--workdir", "not a jaxmix workdir"], with_corpus),
    "generate_no_checkpoint": case(GENERATE, ["--workdir", "{bare}"],
                                   ["--workdir", "no checkpoint", "train first"]),
    "generate_tokens": case(GENERATE, ["--workdir", "{lm}", "--max_new_tokens", "0"],
                            ["--max_new_tokens", "positive integer"]),
    "generate_temperature": case(GENERATE, ["--workdir", "{lm}", "--temperature", "-1"],
                                 ["--temperature", ">= 0"]),
    "generate_top_p": case(GENERATE, ["--workdir", "{lm}", "--top_p", "1.5"],
                           ["--top_p", "(0, 1]"]),
    "generate_top_k": case(GENERATE, ["--workdir", "{lm}", "--top_k", "-2"], ["--top_k"]),
    "generate_prefill": case(GENERATE, ["--workdir", "{lm}", "--prefill_chunk", "0"],
                             ["--prefill_chunk"]),
    "generate_duo_missing": case(GENERATE, ["--workdir", "{attn}", "--duo", "{d}/heads.json"],
                                 ["--duo", "no such file", "duo identify"]),
    "generate_sparsity_alone": case(GENERATE, ["--workdir", "{lm}", "--sparsity", "0.5"],
                                    ["--sparsity", "need --duo"]),
    "generate_unknown_flag": case(GENERATE, ["--workdir", "{lm}", "--tokens", "5"],
                                  ["unrecognized arguments", "--tokens"]),
    "generate_no_workdir": case(GENERATE, ["--prompt", "x"], ["--workdir", "required"]),
    # ------------------------------------------------------------------ evaluate
    "evaluate_hf_folder": case(EVALUATE, ["--workdir", "{hf}", "--lengths", "64"],
                               ["--workdir", "Hugging Face"]),
    "evaluate_encoder": case(EVALUATE, ["--workdir", "{encoder}", "--lengths", "64"],
                             ["--workdir", "encoder"]),
    "evaluate_second_workdir_missing": case(
        EVALUATE, ["--workdir", "{attn}", "--workdir", "{d}/nothing", "--lengths", "400"],
        ["--workdir", "nothing", "no such folder"]),
    "evaluate_out_a_file": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "400",
                                           "--out", "{d}/afile"],
                                ["--out", "is a file"], with_file),
    "evaluate_out_unwritable": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "400",
                                               "--out", "{d}/locked"],
                                    ["--out", "not writable"], locked),
    "evaluate_out_in_unwritable": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "400",
                                                  "--out", "{d}/locked/eval"],
                                       ["--out", "cannot be created"], locked),
    "evaluate_examples": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "400",
                                         "--examples", "0"], ["--examples", "positive"]),
    "evaluate_lengths_words": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "long"],
                                   ["--lengths", "comma-separated"]),
    "evaluate_lengths_too_short": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "50"],
                                       ["--lengths=50", "too short for passkey"]),
    "evaluate_unknown_task": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "64",
                                             "--task", "sorting"], ["--task", "sorting"]),
    "evaluate_text_model_without_task": case(EVALUATE, ["--workdir", "{lm}", "--lengths", "64"],
                                             ["--task", "not a synthetic task"]),
    "evaluate_budget": case(EVALUATE, ["--workdir", "{attn}", "--lengths", "400",
                                       "--memory-budget-gb", "0"], ["--memory-budget-gb"]),
    "evaluate_sparsity_and_threshold": case(
        EVALUATE, ["--workdir", "{attn}", "--lengths", "400", "--duo", "{d}/h.json",
                   "--sparsity", "0.5", "--threshold", "0.5"],
        ["--sparsity", "--threshold"], lambda d: write(f"{d}/h.json", "{}")),
    # ------------------------------------------------------------------ duo identify
    "duo_hf_folder": case(DUO, ["identify", "--workdir", "{hf}"], ["--workdir", "Hugging Face"]),
    "duo_encoder": case(DUO, ["identify", "--workdir", "{encoder}"], ["--workdir", "encoder"]),
    "duo_file": case(DUO, ["identify", "--workdir", "{d}/afile"], ["--workdir", "is a file"],
                     with_file),
    "duo_no_attention": case(DUO, ["identify", "--workdir", "{lm}"],
                             ["no attention layers", "DuoAttention"]),
    "duo_no_checkpoint": case(DUO, ["identify", "--workdir", "{bare}"],
                              ["--workdir", "no checkpoint"]),
    "duo_out_a_file": case(DUO, ["identify", "--workdir", "{attn}", "--out", "{d}/afile"],
                           ["--out", "is a file"], with_file),
    "duo_out_unwritable": case(DUO, ["identify", "--workdir", "{attn}", "--out", "{d}/locked"],
                               ["--out", "not writable"], locked),
    "duo_heads_exist": case(DUO, ["identify", "--workdir", "{attn}"],
                            ["duo_heads.json", "--overwrite"], with_heads),
    "duo_steps": case(DUO, ["identify", "--workdir", "{attn}", "--steps", "0"],
                      ["--steps", "positive integer"]),
    "duo_lr": case(DUO, ["identify", "--workdir", "{attn}", "--lr", "0"], ["--lr", "positive"]),
    "duo_reg": case(DUO, ["identify", "--workdir", "{attn}", "--reg", "-1"], ["--reg", ">= 0"]),
    "duo_seq_len": case(DUO, ["identify", "--workdir", "{attn}", "--seq_len", "100"],
                        ["--seq_len=100", "too short"]),
    "duo_no_command": case(DUO, ["--workdir", "{attn}"], ["identify"]),
    # ------------------------------------------------------------------ convert
    "from_hf_missing": case(CONVERT, ["--from-hf", "{d}/nothing", "--out", "{d}/out"],
                            ["--from-hf", "no such folder"]),
    "from_hf_file": case(CONVERT, ["--from-hf", "{d}/afile", "--out", "{d}/out"],
                         ["--from-hf", "a file"], with_file),
    "from_hf_a_workdir": case(CONVERT, ["--from-hf", "{lm}", "--out", "{d}/out"],
                              ["--from-hf", "jaxmix workdir already"]),
    "from_hf_without_config": case(CONVERT, ["--from-hf", "{d}/corpus", "--out", "{d}/out"],
                                   ["--from-hf", "config.json", "Hugging Face"], with_corpus),
    "from_hf_unknown_model": case(CONVERT, ["--from-hf", "{d}/bert", "--out", "{d}/out"],
                                  ["--from-hf", "model_type='bert'"],
                                  lambda d: write(f"{d}/bert/config.json",
                                                  json.dumps({"model_type": "bert"}))),
    "from_hf_out_not_empty": case(CONVERT, ["--from-hf", "{hf}", "--out", "{d}/corpus"],
                                  ["--out", "not empty", "new or empty"], with_corpus),
    "from_hf_out_a_file": case(CONVERT, ["--from-hf", "{hf}", "--out", "{d}/afile"],
                               ["--out", "is a file"], with_file),
    "from_hf_out_in_unwritable": case(CONVERT, ["--from-hf", "{hf}", "--out", "{d}/locked/w"],
                                      ["--out", "cannot be created"], locked),
    "from_hf_out_inside_source": case(CONVERT, ["--from-hf", "{hf}", "--out", "{hf}/jaxmix"],
                                      ["--out", "overlaps"]),
    "from_hf_without_out": case(CONVERT, ["--from-hf", "{hf}"], ["--out"]),
    "both_directions": case(CONVERT, ["--from-hf", "{hf}", "--to-hf", "{d}/x"],
                            ["exactly one of"]),
    "to_hf_hf_folder": case(CONVERT, ["--to-hf", "{d}/out", "--workdir", "{hf}"],
                            ["--workdir", "Hugging Face"]),
    "to_hf_encoder": case(CONVERT, ["--to-hf", "{d}/out", "--workdir", "{encoder}"],
                          ["--workdir", "encoder"]),
    "to_hf_not_empty": case(CONVERT, ["--to-hf", "{d}/corpus", "--workdir", "{lm}"],
                            ["--to-hf", "not empty"], with_corpus),
    "to_hf_inside_workdir": case(CONVERT, ["--to-hf", "{lm}/hf", "--workdir", "{lm}"],
                                 ["--to-hf", "inside --workdir"]),
    "to_hf_unwritable": case(CONVERT, ["--to-hf", "{d}/locked", "--workdir", "{lm}"],
                             ["--to-hf", "not writable"], locked),
    "to_hf_no_counterpart": case(CONVERT, ["--to-hf", "{d}/out", "--workdir", "{lm}"],
                                 ["--workdir", "no HF counterpart"], with_mlp),
    # ------------------------------------------------------------------ prepare
    "prepare_no_match": case(PREPARE, ["--input", "{d}/none/*.txt", "--tokenizer", "bytes",
                                       "--out", "{d}/out"], ["--input", "no files"]),
    "prepare_tokenizer_missing": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer",
                                                "{d}/tok", "--out", "{d}/out"],
                                      ["--tokenizer", "does not exist"], with_corpus),
    "prepare_tokenizer_of_hf_folder": case(PREPARE, ["--input", "{d}/corpus/*.txt",
                                                     "--tokenizer", "{hf}", "--out", "{d}/out"],
                                           ["--tokenizer", "no tokenizer.json"], with_corpus),
    "prepare_out_a_file": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer", "bytes",
                                         "--out", "{d}/afile"], ["--out", "is a file"],
                               lambda d: (with_corpus(d), with_file(d))),
    "prepare_out_unwritable": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer",
                                             "bytes", "--out", "{d}/locked"],
                                   ["--out", "not writable"],
                                   lambda d: (with_corpus(d), locked(d))),
    "prepare_out_a_workdir": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer",
                                            "bytes", "--out", "{lm}"],
                                  ["--out", "not a corpus"], with_corpus),
    "prepare_val_fraction": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer", "bytes",
                                           "--out", "{d}/out", "--val-fraction", "1.5"],
                                 ["--val-fraction", "[0, 1)"], with_corpus),
    "prepare_workers": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer", "bytes",
                                      "--out", "{d}/out", "--workers", "0"],
                            ["--workers", "positive integer"], with_corpus),
    "prepare_record_tokens": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer",
                                            "bytes", "--out", "{d}/out", "--record-tokens",
                                            "-1"], ["--record-tokens"], with_corpus),
    "prepare_shard_bytes": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer", "bytes",
                                          "--out", "{d}/out", "--shard-bytes", "lots"],
                                ["--shard-bytes", "64MiB"], with_corpus),
    "prepare_text_field": case(PREPARE, ["--input", "{d}/corpus/*.jsonl", "--tokenizer",
                                         "bytes", "--out", "{d}/out"], ["'text'"], with_corpus),
    "prepare_no_out": case(PREPARE, ["--input", "{d}/corpus/*.txt", "--tokenizer", "bytes"],
                           ["--out", "required"], with_corpus),
    # ------------------------------------------------------------------ memory
    "memory_config_missing": case(MEMORY, ["--config", "{d}/nope.py", "--chips", "8"],
                                  ["--config", "no such file"]),
    "memory_unknown_preset": case(MEMORY, ["--config", "configs/mamba_lm.py:huge", "--chips",
                                           "8"], ["--config", "huge", "smoke"]),
    "memory_config_unreadable": case(MEMORY, ["--config", "{d}/mine.py", "--chips", "8"],
                                     ["--config", "not readable"], unreadable_config),
    "memory_not_a_config": case(MEMORY, ["--config", "{d}/plain.py", "--chips", "8"],
                                ["--config", "get_config"], not_a_config),
    "memory_broken_config": case(MEMORY, ["--config", "{d}/broken.py", "--chips", "8"],
                                 ["--config", "SyntaxError"], broken_config),
    "memory_chips_zero": case(MEMORY, ["--config", POD, "--chips", "0"],
                              ["--chips", "positive integer"]),
    "memory_chips_alone": case(MEMORY, ["--chips", "8"], ["--chips", "--config"]),
    "memory_config_alone": case(MEMORY, ["--config", POD], ["--config", "--chips"]),
    "memory_chips_do_not_divide": case(MEMORY, ["--config", POD, "--chips", "3"],
                                       ["chips=3", "train.batch_size=256", "does not split"]),
    "memory_chip_size": case(MEMORY, ["--config", POD, "--chips", "8", "--chip-gib", "-16"],
                             ["--chip-gib", "positive"]),
    "memory_unknown_flag": case(MEMORY, ["--preset", "2.8b"], ["unrecognized arguments"]),
}


def _fixtures(root):
    """The workdirs the cases copy: {name: path}."""
    import byte_encoder  # configs/ is on sys.path (conftest)
    import mamba_lm
    import transformer_lm
    from jaxmix import hf, models
    from jaxmix.convert import write_workdir

    def params_of(config):  # zeros: the cases never get as far as computing
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                            models.abstract_params(models.build(config.model)))

    lm = mamba_lm.get_config("smoke")
    attn = transformer_lm.get_config("smoke")
    attn.data.source = "synthetic:passkey"
    attn.train.seq_len = 300
    encoder = byte_encoder.get_config("smoke")
    out = {}
    for name, config in (("lm", lm), ("attn", attn), ("encoder", encoder)):
        out[name] = write_workdir(str(root / name), config, params_of(config))
    hf.save(str(root / "hf"), lm.model, params_of(lm))
    out["hf"] = str(root / "hf")
    write(f"{root}/bare/config.json", json.dumps({"model": lm.model.to_dict()}))
    os.makedirs(f"{root}/bare/checkpoints")
    out["bare"] = str(root / "bare")
    return out


@pytest.mark.slow
def test_every_command_line_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
    counts = {}
    for c in CASES.values():
        counts[c["cli"]] = counts.get(c["cli"], 0) + 1
    assert min(counts.values()) >= 10 and len(counts) == 6, counts
    fixtures = _fixtures(tmp_path / "fixtures")
    runs, before = [], {}
    for name, c in CASES.items():
        d = tmp_path / "cases" / name
        d.mkdir(parents=True)
        args = []
        for arg in c["args"]:
            for key, path in fixtures.items():
                if "{" + key + "}" in arg:
                    if not os.path.exists(d / key):
                        shutil.copytree(path, d / key)
                    arg = arg.replace("{" + key + "}", str(d / key))
            args.append(arg.replace("{d}", str(d)))
        if c["setup"] is not None:
            c["setup"](str(d))
        before[name] = snapshot(d)
        runs.append({"cli": c["cli"], "argv": args, "env": {}, "out": str(tmp_path / name)})
    results = run_driver(runs, tmp_path / "cases.json")
    problems = {}
    for (name, c), (status, _, err) in zip(CASES.items(), results, strict=True):
        p = one_line_problem(c["needles"], status, err, before[name],
                             snapshot(tmp_path / "cases" / name))
        if p is not None:
            problems[name] = p
    assert not problems, "\n".join(f"{name}: {p}" for name, p in problems.items())
