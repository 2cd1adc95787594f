"""DuoAttention: gates (alpha = 1 is full attention, alpha = 0 streaming), head
selection, reordered two-cache decoding, the identify / generate CLIs and their errors."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxmix import duo, models
from jaxmix.duo import __main__ as duo_cli
from jaxmix import generate as gen
from jaxmix.errors import ConfigError
from jaxmix.mixers.attention import Attention
from masks import masked_attend

SINK, RECENT = 3, 6


def mixer_cfg(**kw):
    base = dict(Attention.DEFAULTS, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                attn_impl="xla", dtype="float32")
    return ml_collections.FrozenConfigDict({**base, **kw})


def gate_cfg(impl):
    return mixer_cfg(attn_impl=impl, duo_retrieval=-1, duo_gates=True, duo_sink=SINK,
                     duo_recent=RECENT)


# reference and pallas (interpreted, ~40 s) run with -m exhaustive; the default run checks
# their sink + window attention against tests/masks.py in test_attention.py and
# test_flash_pallas.py, and the gate mixing is the same code for every impl
@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.exhaustive),
                                  "xla", pytest.param("pallas", marks=pytest.mark.exhaustive)])
def test_gates_at_one_and_zero_are_full_and_streaming_attention(impl):
    """alpha = 1: the plain mixer; alpha = 0: the sink + recent mask of tests/masks.py
    (through the same projections); forward and gradients, 1e-5."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 20, 32))
    gated = Attention(gate_cfg(impl))
    params = nn.unbox(jax.jit(gated.init)(jax.random.PRNGKey(1), x)["params"])
    assert params["duo_alpha"].shape == (2,) and np.all(params["duo_alpha"] == 1)
    plain = Attention(mixer_cfg(attn_impl=impl))
    streaming = Attention(mixer_cfg(attn_impl=impl, sliding_window=RECENT, sink=SINK))
    base = {k: v for k, v in params.items() if k != "duo_alpha"}

    def loss(m, p, x):
        return jnp.sum(m.apply({"params": p}, x)[0] ** 2)

    for value, ref in ((1.0, plain), (0.0, streaming)):
        p = dict(params, duo_alpha=jnp.full((2,), value))
        y, gy = jax.jit(jax.value_and_grad(lambda p, x: loss(gated, p, x), (0, 1)))(p, x)
        z, gz = jax.jit(jax.value_and_grad(lambda p, x: loss(ref, p, x), (0, 1)))(base, x)
        np.testing.assert_allclose(y, z, rtol=1e-5)
        np.testing.assert_allclose(gy[1], gz[1], atol=1e-5, rtol=1e-5)
        for name in base:
            for a, b in zip(jax.tree.leaves(gy[0][name]), jax.tree.leaves(gz[0][name]),
                            strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # the streaming reference itself against the independent mask
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Attention, "attend", masked_attend(causal=True, window=RECENT, sink=SINK))
        want = streaming.apply({"params": base}, x)[0]
    np.testing.assert_allclose(jax.jit(streaming.apply)({"params": base}, x)[0], want,
                               atol=1e-5, rtol=1e-5)


def test_retrieval_heads_by_quantile_and_threshold():
    alpha = np.array([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.3, 0.7]])
    assert duo.retrieval_heads(alpha, sparsity=0.5).sum() == 4
    np.testing.assert_array_equal(duo.retrieval_heads(alpha, sparsity=0.75),
                                  [[1, 0, 0, 0], [0, 1, 0, 0]])
    assert duo.retrieval_heads(alpha, sparsity=0.0).all()
    np.testing.assert_array_equal(duo.retrieval_heads(alpha, threshold=0.5),
                                  alpha >= 0.5)
    assert not duo.retrieval_heads(alpha, threshold=1.01).any()
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match="sparsity"):
            duo.retrieval_heads(alpha, sparsity=bad)
    with pytest.raises(ConfigError, match="exactly one"):
        duo.retrieval_heads(alpha, sparsity=0.5, threshold=0.5)


def small_lm(n_layers=3, n_heads=4, n_kv_heads=2):
    cfg = ml_collections.ConfigDict(dict(
        family="lm", d_model=32, n_layers=n_layers, vocab_size=256, d_ff=64, dtype="float32",
        mixer_pattern=("attention",),
        mixers={"attention": dict(Attention.DEFAULTS, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  attn_impl="xla", max_cache_len=64)}))
    model = models.build(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                          jnp.zeros((1, 4), jnp.int32))["params"])
    return cfg, params


@pytest.mark.parametrize("kv_heads", [2, pytest.param(4, marks=pytest.mark.exhaustive)])
def test_two_cache_decoding_equals_per_head_masked_forward(kv_heads):
    cfg, params = small_lm(n_layers=2, n_kv_heads=kv_heads)
    layers = duo.attention_layers(models.normalize_config(cfg))
    retrieval = np.zeros((2, kv_heads), bool)
    retrieval[0, 1] = True  # a layer whose retrieval head is not the first; one streaming
    dcfg, dparams = duo.deploy(cfg, params, retrieval, [i for i, _, _ in layers], SINK, RECENT)
    assert list(dcfg.duo.retrieval) == [int(r.sum()) for r in retrieval]
    deployed = models.build(dcfg)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 30), 0, 256)
    masked = jax.jit(deployed.apply)({"params": dparams}, tokens)[0]
    # = the gate model with alpha = the binary choice, in the original head order
    gated = models.build(duo.with_duo(cfg, gates=True, sink=SINK, recent=RECENT))
    gparams = duo.add_gates(params, layers)
    for (i, _, _), row in zip(layers, retrieval, strict=True):
        gparams[f"layers_{i}"]["mixer"]["duo_alpha"] = jnp.asarray(row, jnp.float32)
    np.testing.assert_allclose(masked, jax.jit(gated.apply)({"params": gparams}, tokens)[0],
                               atol=1e-5, rtol=1e-5)
    # decode: prefill 5 (one chunk: every head full causal, within the window), then one
    # token at a time well past the point where the streaming ring wraps (9 slots)
    step = jax.jit(lambda c, t: deployed.apply({"params": dparams}, t, decode=True, cache=c))
    cache = gen.init_cache(deployed, 2, 30)
    assert "k" not in cache[1] and cache[0]["k"].shape == (2, 30, 1, 8)
    assert cache[1]["sk"].shape == (2, SINK + RECENT, kv_heads, 8)
    logits, _, cache = step(cache, tokens[:, :5])
    outs = [logits]
    for t in range(5, 30):
        logits, _, cache = step(cache, tokens[:, t:t + 1])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), masked, atol=1e-5, rtol=1e-5)


def test_all_retrieval_is_the_plain_model_and_streaming_memory_is_constant():
    cfg, params = small_lm(n_layers=2)
    layers = [0, 1]
    dcfg, dparams = duo.deploy(cfg, params, np.ones((2, 2), bool), layers, SINK, RECENT)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 24), 0, 256)
    np.testing.assert_allclose(jax.jit(models.build(dcfg).apply)({"params": dparams}, tokens)[0],
                               jax.jit(models.build(cfg).apply)({"params": params}, tokens)[0],
                               atol=1e-5, rtol=1e-5)
    scfg, _ = duo.deploy(cfg, params, np.zeros((2, 2), bool), layers, SINK, RECENT)
    streaming = models.build(scfg)
    sizes = [sum(x.nbytes for x in jax.tree.leaves(gen.init_cache(streaming, 1, n)))
             for n in (64, 65536)]
    assert sizes[0] == sizes[1]


def test_heads_file_errors(tmp_path):
    cfg, params = small_lm()
    path = tmp_path / "duo_heads.json"
    alpha = np.full((3, 2), 0.5)
    duo.save_heads(str(tmp_path), alpha, [0, 1, 2], {"steps": 1}, 128)
    assert (tmp_path / "duo_heads.png").stat().st_size > 0
    a, layers, data = duo.load_heads(str(path), cfg)
    np.testing.assert_array_equal(a, alpha)
    other, _ = small_lm(n_layers=2)
    with pytest.raises(ConfigError, match="do not match the model"):
        duo.load_heads(str(path), other)
    with pytest.raises(ConfigError, match="no such file"):
        duo.load_heads(str(tmp_path / "missing.json"), cfg)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a duo_heads.json"):
        duo.load_heads(str(tmp_path / "bad.json"), cfg)
    warnings = []
    duo.load_deployed(cfg, params, str(path), sparsity=0.5, sink=64, recent=100,
                      warn=warnings.append)
    assert len(warnings) == 1 and "trained on" in warnings[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A GQA passkey-shaped workdir (byte vocabulary) written like train.py's."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import transformer_lm
    from jaxmix.convert import write_workdir
    config = transformer_lm.get_config("smoke")
    config.model.mixers.attention.update(n_heads=4, n_kv_heads=2, max_cache_len=40)
    config.data.source = "synthetic:passkey"
    config.train.seq_len = 300
    model = models.build(config.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                          jnp.zeros((1, 4), jnp.int32))["params"])
    out = str(tmp_path_factory.mktemp("duo_workdir"))
    write_workdir(out, config, jax.tree.map(np.asarray, params))
    return out


def errors_of(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.slow
def test_identify_and_generate_cli(workdir, capsys):
    assert duo_cli.main(["identify", "--workdir", workdir, "--steps", "4", "--batch", "2",
                     "--sink", "16", "--recent", "32"]) == 0
    data = json.load(open(os.path.join(workdir, "duo_heads.json")))
    alpha = np.asarray(data["alpha"])
    assert alpha.shape == (2, 2) and np.all((alpha >= 0) & (alpha <= 1)) and alpha.max() < 1
    assert os.path.getsize(os.path.join(workdir, "duo_heads.png")) > 0
    heads = os.path.join(workdir, "duo_heads.json")
    capsys.readouterr()
    assert gen.main(["--workdir", workdir, "--prompt", "abcdefg", "--max_new_tokens", "6",
                     "--temperature", "0", "--duo", heads, "--sparsity", "0.5",
                     "--prefill_chunk", "3"]) == 0
    # a full cache too short for prompt + new tokens: one error line before decoding
    for argv, field in (
            (["--max_new_tokens", "60"], "max_cache_len=40"),
            (["--duo", heads, "--sparsity", "1.0"], "sparsity"),
            (["--duo", os.path.join(workdir, "config.json")], "not a duo_heads.json"),
            (["--sparsity", "0.5"], "need --duo"),
            (["--prefill_chunk", "0"], "prefill_chunk")):
        assert gen.main(["--workdir", workdir, "--prompt", "abc"] + argv) == 2
        errors, err = errors_of(capsys)
        assert len(errors) == 1 and field in errors[0], err
        assert "Traceback" not in err
    # streaming every head: constant memory, so no max_cache_len limit on the length
    assert gen.main(["--workdir", workdir, "--prompt", "abc", "--max_new_tokens", "60",
                     "--temperature", "0", "--duo", heads, "--threshold", "2"]) == 0
    from jaxmix import evaluate
    out = os.path.join(workdir, "eval")
    assert evaluate.main(["--workdir", workdir, "--task", "passkey", "--lengths", "300",
                          "--examples", "2", "--batch", "2", "--duo", heads, "--sparsity",
                          "0.5", "--out", out]) == 0
    row = json.loads(open(os.path.join(out, "eval_passkey.jsonl")).readline())
    assert row["status"] == "ok" and row["workdir"].endswith("duo 50% retrieval")
    for argv, field in ((["--steps", "0"], "--steps"), (["--seq_len", "100"], "--seq_len"),
                        (["--sink", "-1"], "--sink")):
        assert duo_cli.main(["identify", "--workdir", workdir] + argv) == 2
        errors, err = errors_of(capsys)
        assert len(errors) == 1 and field in errors[0], err
