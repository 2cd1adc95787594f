"""Synthetic tasks: each generator's invariants, determinism, per-process rows, the
loss mask reaching the loss (also on the flat data-parallel path), and the one-line
errors of the training config and of `jaxmix.evaluate`."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, devices_env, metrics_rows, run_train, subprocess_env
from jaxmix import data, models
from jaxmix.data import synthetic
from jaxmix.errors import ConfigError
from jaxmix.evaluate import parse_lengths
from jaxmix.train.step import loss_terms

import synthetic as synthetic_configs  # configs/synthetic.py (conftest puts configs/ on the path)


def settings(vocab, **kw):
    base = {**synthetic.DEFAULTS, **kw}
    return synthetic.TaskArgs(base, vocab_size=vocab)


def examples(name, args, seq_len, n=24, seed=0):
    return [synthetic.TASKS[name](synthetic.rng_for(seed, "train", 0, r), seq_len, args)
            for r in range(n)]


def test_induction_invariants():
    for tokens, mask in examples("induction", settings(16), 64):
        assert tokens.shape == (65,) and mask.shape == (64,)
        assert tokens.min() >= 0 and tokens.max() < 16
        context = tokens[:63]
        assert np.sum(context == 0) == 1           # exactly one trigger before the query
        assert tokens[63] == 0                     # the last input is the trigger
        at = int(np.flatnonzero(context == 0)[0])
        assert tokens[64] == tokens[at + 1] != 0   # the target: the symbol after it
        assert np.flatnonzero(mask).tolist() == [63]


def test_selective_copy_invariants():
    seq_len, k = 80, 16
    for tokens, mask in examples("selective_copy", settings(16, n_copy=k), seq_len):
        n_context = seq_len - k
        context = tokens[:n_context]
        symbols = context[context != 0]
        assert len(symbols) == k and symbols.min() >= 1 and symbols.max() <= 14
        assert tokens[n_context] == 15                         # the marker
        np.testing.assert_array_equal(tokens[n_context + 1:], symbols)  # in order
        assert np.flatnonzero(mask).tolist() == list(range(n_context, seq_len))


@pytest.mark.parametrize("seq_len,pairs", [(64, 16), (256, 16), (512, 64)])
def test_mqar_invariants(seq_len, pairs):
    vocab = 256
    for tokens, mask in examples("mqar", settings(vocab, n_pairs=pairs), seq_len, n=8):
        keys, values = tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs
        assert keys.min() >= 1 and keys.max() < vocab // 2
        assert values.min() >= vocab // 2 and values.max() < vocab
        at = np.flatnonzero(mask)
        assert len(at) == pairs and np.all(at >= 2 * pairs) and np.all((at - 2 * pairs) % 2 == 0)
        queries = tokens[at]
        assert sorted(queries.tolist()) == sorted(keys.tolist())  # each key queried once
        answer = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert [answer[q] for q in queries.tolist()] == tokens[at + 1].tolist()
        rest = np.setdiff1d(np.arange(2 * pairs, seq_len + 1), np.concatenate([at, at + 1]))
        assert np.all(tokens[rest] == 0)  # zero filler between the queries


def test_mqar_gaps_favour_the_context_end():
    at = np.concatenate([np.flatnonzero(m) for _, m in
                         examples("mqar", settings(256, n_pairs=4), 512, n=200)])
    assert np.median(at) < 2 * 4 + (512 - 8) / 4  # power law: most queries come early


def test_passkey_invariants():
    args = settings(256, n_keys=3, n_words=2)
    args["filler_u8"] = synthetic.filler_bytes("val")
    for tokens, mask in examples("passkey", args, 1024, n=6):
        assert tokens.shape == (1025,) and tokens.max() < 256
        text = bytes(tokens.astype(np.uint8))
        body, question = text.split(b"\nWhat are the pass keys?")
        answers = []
        for i in range(1, 4):
            tail = question.split(f"Pass key {i}: ".encode())[1].split(b".")[0]
            assert tail.count(b" ") == 1 and all(w.decode() in synthetic.NATO
                                                 for w in tail.split())
            assert f" The pass key {i} is {tail.decode()}. ".encode() in body
            answers.append(tail)
        scored = bytes(tokens[1:][mask == 1].astype(np.uint8))
        assert scored == b"".join(answers)


def test_examples_depend_on_seed_step_row_only():
    args = settings(16)
    a = synthetic.make_batch("induction", args, 32, 7, "train", 3, range(4))
    b = synthetic.make_batch("induction", args, 32, 7, "train", 3, range(4))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    c = synthetic.make_batch("induction", args, 32, 7, "train", 4, range(4))
    v = synthetic.make_batch("induction", args, 32, 7, "val", 3, range(4))
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert not np.array_equal(a["tokens"], v["tokens"])
    rows = synthetic.make_batch("induction", args, 32, 7, "train", 3, range(2, 4))
    np.testing.assert_array_equal(rows["tokens"], a["tokens"][2:])


def run_config(preset="mqar", **train):
    c = synthetic_configs.get_config(preset)
    c.train.update(batch_size=4, seq_len=64, eval_batches=2, **train)
    return c


@pytest.mark.parametrize("preset", [f"{task}-{mixer}" for task in synthetic_configs.TASKS
                                    for mixer in synthetic_configs.MIXERS]
                         + list(synthetic_configs.PASSKEY_STAGES))
def test_presets_pass_the_checks_and_make_their_task(preset):
    from jaxmix.train import validate
    c = synthetic_configs.get_config(preset)
    validate.check_config(c)
    assert set(models.layer_kinds(c.model)) == {preset.partition("-")[2] or "mamba"}
    batch = next(data.build(c).train_iter)
    first_len = synthetic.step_len(c.data.synthetic, c.train.seq_len, 0)
    assert batch["tokens"].shape == (c.train.batch_size, first_len + 1)
    assert batch["loss_mask"].sum() > 0
    if preset in synthetic_configs.PASSKEY_STAGES:  # the curriculum: shorter, then fuller
        fields, seq_len = synthetic_configs.PASSKEY_STAGES[preset]
        assert c.train.seq_len == seq_len < synthetic_configs.get_config("passkey").train.seq_len
        assert all(c.data.synthetic[k] == v for k, v in fields.items())


def test_pipeline_processes_and_resume():
    config = run_config()
    one = data.build(config)
    two = [data.build(config, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        whole, parts = next(one.train_iter), [next(p.train_iter) for p in two]
        for key in ("tokens", "loss_mask"):
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    again = data.build(config).seek(3)  # the fourth batch, made from (seed, 3)
    np.testing.assert_array_equal(next(again)["tokens"], next(one.train_iter)["tokens"])
    val = one.val_batches()
    assert len(val) == 2 and val[0]["loss_mask"].sum() == 4 * 16


def test_length_warmup_batches_and_seek():
    config = run_config()
    config.data.synthetic.update(n_pairs=8, warmup_len=32, warmup_steps=2)
    pipe = data.build(config)
    shapes = [next(pipe.train_iter)["tokens"].shape for _ in range(4)]
    assert shapes == [(4, 33), (4, 33), (4, 65), (4, 65)]
    for step, rows_ in [(1, 33), (2, 65)]:  # a resumed run sees the same lengths
        batch = next(data.build(config).seek(step))
        assert batch["tokens"].shape == (4, rows_)
        assert batch["loss_mask"].shape == (4, rows_ - 1) and batch["loss_mask"].sum() == 32
    assert pipe.val_batches()[0]["tokens"].shape == (4, 65)  # validation at seq_len


def test_loss_mask_reaches_the_loss():
    config = run_config()
    model = models.build(config.model)
    batch = next(data.build(config).train_iter)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    loss, _ = loss_terms(model, params, batch)
    logits, _ = model.apply({"params": params}, batch["tokens"][:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -np.take_along_axis(np.asarray(logp), batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"]
    np.testing.assert_allclose(loss, (ce * mask).sum() / mask.sum(), rtol=1e-5)
    assert abs(float(loss) - ce.mean()) > 1e-4  # not the unmasked mean
    # an unscored target can change freely; a scored one changes the loss
    free, scored = batch["tokens"].copy(), batch["tokens"].copy()
    last_unscored = int(np.flatnonzero(mask[0] == 0)[-1])
    free[0, last_unscored + 1] = (free[0, last_unscored + 1] + 1) % 256
    first_scored = int(np.flatnonzero(mask[0])[0])
    scored[0, first_scored + 1] = (scored[0, first_scored + 1] + 1) % 256
    same, _ = loss_terms(model, params, {**batch, "tokens": free})
    moved, _ = loss_terms(model, params, {**batch, "tokens": scored})
    assert float(same) == pytest.approx(float(loss), rel=1e-6)
    assert float(moved) != pytest.approx(float(loss), rel=1e-4)


DATA_PARALLEL_CHECK = """
import jax, json, numpy as np, optax
import synthetic as configs
from jaxmix.train.loop import Run
from jaxmix.train.step import data_parallel_axes
out = {}
for name, devices in (("one", jax.devices()[:1]), ("two", jax.devices()[:2])):
    c = configs.get_config("mqar")
    c.train.update(batch_size=4, seq_len=64, eval_batches=1, steps=2)
    c.mesh.update(data=len(devices))
    r = Run(c, "unused_" + name, devices)
    state, batch = r.init_fn(), next(r.data.train_iter)
    batch["loss_mask"][:2] = 0.0          # shards score 0 vs 32 targets: unequal counts
    batch["loss_mask"][:2, -1] = 1.0
    flat = data_parallel_axes(r.mesh, r.batch_sharding, r.shardings.params)
    state, m = r.train_step(state, r.to_global(batch))
    out[name] = dict(loss=float(m["loss"]), flat=flat,
                     p=float(optax.global_norm(state.params)))
print(json.dumps(out))
"""


def test_masked_loss_on_the_flat_data_parallel_path(tmp_path):
    env = dict(os.environ, **devices_env(2), PYTHONPATH=f"{ROOT}:{ROOT}/configs")
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL_CHECK], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "data" in out["two"]["flat"] and out["one"]["flat"] is None
    assert out["two"]["loss"] == pytest.approx(out["one"]["loss"], rel=1e-5)
    assert out["two"]["p"] == pytest.approx(out["one"]["p"], rel=1e-5)


@pytest.mark.parametrize("override,needle", [
    ("--config.data.source=synthetic:nope", "unknown synthetic task 'nope'"),
    ("--config.train.seq_len=60", "train.seq_len=60 is too short for mqar"),
    ("--config.model.vocab_size=20", "model.vocab_size=20"),
    ("--config.data.synthetic.warmup_len=32", "warmup_len=32 must lie between 64"),
    ("--config.data.synthetic.warmup_len=128", "warmup_len=128 must lie between 64"),
    ("--config.data.synthetic.warmup_steps=-1", "warmup_steps=-1 must be >= 0"),
])
def test_config_errors(override, needle):
    c = run_config()
    key, value = override[len("--config."):].split("=")
    *path, field = key.split(".")
    section = c
    for part in path:
        section = section[part]
    section[field] = int(value) if value.lstrip("-").isdigit() else value
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        data.build(c)


def test_lengths_parsing():
    assert parse_lengths("64,128,...,1024") == [64, 128, 256, 512, 1024]
    assert parse_lengths("100,150,...,300") == [100, 150, 200, 250, 300]
    assert parse_lengths("256") == [256]
    for bad, needle in [("", "empty"), (" , ", "empty"), ("0,64", "not positive"),
                        ("-5", "not positive"), ("64,x", "not a comma-separated"),
                        ("64,...", "'...'")]:
        with pytest.raises(ConfigError, match=needle):
            parse_lengths(bad)


SMOKE = ["--config", "configs/synthetic.py:mqar", "--config.train.batch_size=4",
         "--config.train.seq_len=64", "--config.train.eval_batches=1",
         "--config.train.log_every=2", "--config.train.eval_every=4",
         "--config.train.checkpoint_every=4", "--config.train.decay_steps=8",
         "--config.model.d_model=32", "--config.data.synthetic.n_pairs=8",
         "--config.data.synthetic.warmup_len=32", "--config.data.synthetic.warmup_steps=6"]


def rows(workdir):
    return metrics_rows(workdir)


def without_speed(rows_):
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows_]


@pytest.mark.slow
def test_train_same_seed_same_metrics_resume_and_evaluate(tmp_path, capsys):
    a, c = tmp_path / "a", tmp_path / "c"
    proc = run_train(SMOKE + ["--config.train.steps=8"], a)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any("val_acc" in r for r in rows(a)) and not any("val_bpb" in r for r in rows(a))
    first = run_train(SMOKE + ["--config.train.steps=4"], c)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(SMOKE + ["--config.train.steps=8"], c)
    assert second.returncode == 0 and "resumed from step 4" in second.stderr
    # c's first 4 steps ran in another process than a's: same seed, same metrics; its
    # last 4 resumed from the step-4 checkpoint, inside the length warm-up (steps 1-6 at
    # 32 tokens, then 64): the same as the uninterrupted run
    assert "compiled" in second.stderr and second.stderr.count("train step for batches") == 2
    assert without_speed(rows(c)) == without_speed(rows(a))
    # evaluate: both workdirs side by side, lengths the task fits, then bad input
    cmd = [sys.executable, "-m", "jaxmix.evaluate", "--workdir", str(a), "--workdir", str(c),
           "--lengths", "64,128", "--examples", "4", "--out", str(tmp_path / "eval")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["workdir"], r["length"]) for r in out] == [("a", 64), ("a", 128), ("c", 64),
                                                          ("c", 128)]
    assert all(r["status"] == "ok" and 0 <= r["accuracy"] <= 1 for r in out)
    assert out[0]["accuracy"] == out[2]["accuracy"]  # same params, same examples
    for suffix in ("jsonl", "md", "png"):
        assert (tmp_path / "eval" / f"eval_mqar.{suffix}").exists()
    from jaxmix import evaluate  # the same CLI in-process: one error line, status 2
    for extra, needle in [(["--lengths", "16"], "--lengths=16 is too short for mqar"),
                          (["--lengths", ","], "--lengths: empty"),
                          (["--lengths", "64", "--task", "nope"],
                           "--task: invalid choice: 'nope'")]:
        assert evaluate.main(cmd[3:5] + extra) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ") and needle in err, err


@pytest.mark.parametrize("mixers", [
    ("attention", "mamba", "gdn"),
    pytest.param(("mom",), marks=pytest.mark.exhaustive)])  # its cache: test_mom as well
def test_evaluate_attention_over_budget_is_skipped_and_recurrent_chunks_agree(mixers):
    from jaxmix.evaluate import Scorer, evaluate_length
    args = settings(16)
    results = {}
    for mixer in mixers:
        c = synthetic_configs.get_config(f"induction-{mixer}")
        c.model.d_model = 32
        synthetic_configs.set_heads(c, n_heads=4, n_kv_heads=4)
        model = models.build(c.model)
        params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))
        scorer = Scorer(model, params["params"], chunk=16)
        assert scorer.recurrent == (mixer != "attention")
        kw = dict(examples=4, batch=4, seed=0, time_budget_s=60)
        tiny = evaluate_length(scorer, "induction", args, 64, budget_bytes=1024, **kw)
        ok = evaluate_length(scorer, "induction", args, 64, budget_bytes=2**30, **kw)
        assert ok["status"] == "ok" and ok["examples"] == 4
        results[mixer] = (tiny, ok, scorer)
    if "attention" in results:
        tiny, _, _ = results["attention"]
        assert tiny["status"] == "skipped" and "memory budget" in tiny["reason"]
    # the recurrent path (4 chunks of 16 carrying the state) scores as the full pass
    made = synthetic.make_batch("induction", args, 64, 0, "eval", 0, range(4))
    every = np.ones_like(made["loss_mask"])  # score all 64 predictions, not just the last
    for mixer in (m for m in mixers if m != "attention"):
        scorer = results[mixer][2]
        scorer.recurrent = False
        full = scorer(made["tokens"], every)
        scorer.recurrent = True
        chunked = scorer(made["tokens"], every)
        np.testing.assert_array_equal(full[0], chunked[0], err_msg=mixer)
        assert 0 < full[0].sum() < 4 * 64 and full[1].sum() == 4 * 64
