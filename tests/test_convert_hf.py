"""Hugging Face import/export: logit and greedy-token parity with transformers' own
models (randomly initialised, tiny), exact jaxmix -> HF -> jaxmix round trips, and the
`python -m jaxmix.convert` workdir that generate and the trainer read."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxmix import convert, models  # noqa: E402
from jaxmix import generate as gen  # noqa: E402
from jaxmix import hf, workdir  # noqa: E402
from jaxmix.convert.__main__ import main as convert_main  # noqa: E402

MAMBA = dict(vocab_size=67, hidden_size=32, state_size=8, num_hidden_layers=2)
LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, rms_norm_eps=1e-5)
CASES = {
    "mamba_tied": ("mamba", dict(MAMBA)),
    "mamba_untied_bias": ("mamba", dict(MAMBA, use_bias=True, use_conv_bias=False,
                                        tie_word_embeddings=False, conv_kernel=3,
                                        time_step_rank=3, expand=3)),
    "llama_gqa_tied": ("llama", dict(LLAMA, num_key_value_heads=2, rope_theta=5000.0,
                                     tie_word_embeddings=True)),
    "llama_untied_bias": ("llama", dict(LLAMA, num_key_value_heads=1, head_dim=16,
                                        attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=False)),
    "llama_mha_sharded": ("llama", dict(LLAMA, num_key_value_heads=4)),
}
PROMPT_LEN, NEW = 10, 8


def hf_model(kind, kwargs, seed=0):
    """A random HF model in eval mode, every weight perturbed (non-trivial norms/biases)."""
    torch.manual_seed(seed)
    if kind == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = None  # never stop early
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def hf_greedy(model, ids):
    t = torch.tensor(ids)
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=NEW,
                             do_sample=False)
    return out[:, ids.shape[1]:].numpy()


def prompt(vocab, batch=2, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, PROMPT_LEN))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case name -> (HF model, its save_pretrained directory), built once per module."""
    made = {}

    def get(name):
        if name not in made:
            kind, kwargs = CASES[name]
            model = hf_model(kind, kwargs)
            directory = tmp_path_factory.mktemp(name)
            shard = {"max_shard_size": "20KB"} if "sharded" in name else {}
            model.save_pretrained(directory, **shard)
            made[name] = model, str(directory)
        return made[name]
    return get


@pytest.fixture(params=sorted(CASES))
def saved(request, hf_dirs):
    return (request.param,) + hf_dirs(request.param)


def test_hf_parity_logits_and_greedy(saved):
    name, model, directory = saved
    if "sharded" in name:
        assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    cfg, params = hf.load(directory)
    lm = models.build(cfg)
    ids = prompt(cfg.vocab_size)
    ours, _ = lm.apply({"params": params}, jnp.asarray(ids))
    ours = np.asarray(ours)[..., :cfg.vocab_size]
    assert np.abs(ours - hf_logits(model, ids)).max() <= 1e-4
    tokens = np.asarray(gen.generate(lm, params, ids, max_new_tokens=NEW, temperature=0.0))
    np.testing.assert_array_equal(tokens, hf_greedy(model, ids))


def test_mamba_ssm_checkpoint(tmp_path):
    """mamba_ssm names (`backbone.embedding.weight`), its config.json and a padded vocab,
    read from pytorch_model.bin."""
    model = hf_model("mamba", dict(MAMBA, vocab_size=64))
    state = {k.replace("embeddings.", "embedding."): v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = dict(d_model=32, n_layer=2, vocab_size=60, pad_vocab_size_multiple=8,
                  ssm_cfg={"d_state": 8}, rms_norm=True, residual_in_fp32=True,
                  fused_add_norm=True, tie_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg, params = hf.load(str(tmp_path))
    assert (cfg.vocab_size, models.padded_vocab(cfg)) == (60, 64)
    ids = prompt(60)
    ours, _ = models.build(cfg).apply({"params": params}, jnp.asarray(ids))
    ref = hf_logits(model, ids)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def _jaxmix_model(kind):
    import flax.linen as nn
    import mamba_lm  # configs/ is on sys.path (conftest)
    import transformer_lm
    if kind == "mamba":
        c = mamba_lm.get_config("smoke").model
        c.update(tie_embeddings=False, vocab_size=250)
        c.mixers.mamba.proj_bias = True
    else:
        c = transformer_lm.get_config("smoke").model
        c.update(mlp_bias=True, tie_embeddings=False, vocab_size=250)
        c.mixers.attention.attn_bias = True
    lm = models.build(c)
    params = nn.unbox(lm.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"])
    rs = np.random.RandomState(0)
    params = jax.tree.map(
        lambda p: np.asarray(p) + 0.1 * rs.standard_normal(p.shape).astype(np.float32), params)
    return c, lm, params


@pytest.mark.parametrize("kind", ["mamba", "attention"])
def test_round_trip_exact_and_hf_reads_it(kind, tmp_path):
    cfg, lm, params = _jaxmix_model(kind)
    hf.save(str(tmp_path), cfg, params)
    cfg2, params2 = hf.load(str(tmp_path))
    flat, flat2 = (jax.tree_util.tree_flatten_with_path(p)[0] for p in (params, params2))
    assert [k for k, _ in flat] == [k for k, _ in flat2]
    for (_, a), (_, b) in zip(flat, flat2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert models.padded_vocab(cfg2) == models.padded_vocab(cfg)
    for field in ("d_model", "n_layers", "tie_embeddings", "norm_eps"):
        assert cfg2[field] == cfg[field], field
    cls = (transformers.MambaForCausalLM if kind == "mamba"
           else transformers.LlamaForCausalLM)
    model = cls.from_pretrained(str(tmp_path)).eval()
    ids = prompt(cfg.vocab_size)
    ours, _ = lm.apply({"params": params}, jnp.asarray(ids))
    assert np.abs(np.asarray(ours) - hf_logits(model, ids)).max() <= 1e-4


def test_convert_cli_workdir(hf_dirs, tmp_path):
    model, directory = hf_dirs("llama_gqa_tied")
    out = tmp_path / "work"
    assert convert_main(["--from-hf", directory, "--out", str(out)]) == 0
    full = json.loads((out / "config.json").read_text())
    assert {"model", "train", "data", "mesh"} <= set(full)
    lm, params, config = workdir.load_workdir(str(out))
    _, want = hf.load(directory)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(workdir.load_params(str(out), lm)),
                    jax.tree.leaves(workdir.load_params(directory)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    ids = prompt(config.model.vocab_size)
    tokens = np.asarray(gen.generate(lm, params, ids, max_new_tokens=NEW, temperature=0.0))
    np.testing.assert_array_equal(tokens, hf_greedy(model, ids))
    # export back to HF
    back = tmp_path / "back"
    assert convert_main(["--to-hf", str(back), "--workdir", str(out)]) == 0
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(back)).eval()
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(model, ids)).max() == 0.0


def test_trainer_restores_converted_workdir(hf_dirs, tmp_path):
    """The converted checkpoint is a TrainState the trainer's Checkpointer restores."""
    _, directory = hf_dirs("mamba_tied")
    from jaxmix import parallel
    from jaxmix.train import optimizer
    from jaxmix.train import state as state_lib
    config, _ = convert.from_hf(directory, str(tmp_path))
    lm = models.build(config.model)
    tx, _ = optimizer.make(config.train)
    mesh = parallel.make_mesh(config.mesh)
    _, _, abstract = state_lib.create(lm, tx, mesh, parallel.rules_of(config), 8, 0)

    class NoData:
        def get_state(self):
            return b"{}"

        def set_state(self, state):
            raise ValueError("no data state")

    ckpt = workdir.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    state, data_ok = ckpt.restore(0, abstract, NoData())
    ckpt.close()
    assert int(state.step) == 0 and not data_ok
    _, want = hf.load(directory)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_errors_are_one_line(tmp_path):
    from jaxmix.errors import ConfigError
    with pytest.raises(ConfigError, match="config.json"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        hf.load(str(tmp_path))
    with pytest.raises(ConfigError, match="not a directory"):
        workdir.load_params(str(tmp_path / "missing"))


# GQA with groups of 2 runs by default in test_duo.py; here MQA, biases and head_dim 16
@pytest.mark.parametrize("name", [pytest.param("llama_gqa_tied", marks=pytest.mark.exhaustive),
                                  "llama_untied_bias"])
def test_duo_attention_on_imported_llama(hf_dirs, name):
    """DuoAttention on an imported Llama (GQA; MQA with q/k/v biases and head_dim 16):
    all heads kept = HF's logits; a mixed choice of heads, reordered, decodes with two
    caches exactly as its per-head masked forward (= the gates at 0/1, original order)."""
    from jaxmix import duo
    model, directory = hf_dirs(name)
    cfg, params = hf.load(directory)
    layers = [i for i, _, _ in duo.attention_layers(models.normalize_config(cfg))]
    hkv = duo.attention_layers(models.normalize_config(cfg))[0][1]
    ids = prompt(cfg.vocab_size, seed=1)
    keep, _ = duo.deploy(cfg, params, np.ones((2, hkv), bool), layers, 2, 4)
    ours = jax.jit(models.build(keep).apply)({"params": params}, jnp.asarray(ids))[0]
    assert np.abs(np.asarray(ours)[..., :cfg.vocab_size] - hf_logits(model, ids)).max() <= 1e-4
    retrieval = np.zeros((2, hkv), bool)
    retrieval[1, -1] = True
    dcfg, dparams = duo.deploy(cfg, params, retrieval, layers, 2, 4)
    deployed = models.build(dcfg)
    masked = jax.jit(deployed.apply)({"params": dparams}, jnp.asarray(ids))[0]
    gated = models.build(duo.with_duo(cfg, gates=True, sink=2, recent=4))
    gparams = duo.add_gates(params, duo.attention_layers(models.normalize_config(cfg)))
    for i, row in zip(layers, retrieval, strict=True):
        gparams[f"layers_{i}"]["mixer"]["duo_alpha"] = jnp.asarray(row, jnp.float32)
    np.testing.assert_allclose(
        masked, jax.jit(gated.apply)({"params": gparams}, jnp.asarray(ids))[0], atol=1e-5,
        rtol=1e-5)
    step = jax.jit(lambda c, t: deployed.apply({"params": dparams}, t, decode=True, cache=c))
    cache = gen.init_cache(deployed, ids.shape[0], PROMPT_LEN)
    outs = []
    for t in range(PROMPT_LEN):  # one token at a time: the 6-slot ring wraps at token 7
        logits, _, cache = step(cache, jnp.asarray(ids[:, t:t + 1]))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), masked, atol=1e-5, rtol=1e-5)


def test_round_trip_with_tokenizer_loads_in_transformers(tmp_path, capsys):
    """HF -> jaxmix -> HF: the exported folder loads with transformers' Auto classes,
    its tokenizer encodes as the source's, and the model gives the source's logits."""
    from bpe import train_bpe
    source, work, back = tmp_path / "hf", tmp_path / "work", tmp_path / "back"
    model = hf_model("mamba", dict(MAMBA, vocab_size=512))
    model.save_pretrained(source)
    train_bpe(source, vocab_size=512, n_files=40)
    assert convert_main(["--from-hf", str(source), "--out", str(work)]) == 0
    assert "tokenizer files copied" in capsys.readouterr().out
    config = json.loads((work / "config.json").read_text())
    assert config["jaxmix_workdir"] == {"kind": "converted", "source": str(source)}
    assert config["data"]["tokenizer"] == str(work / "tokenizer")
    assert convert_main(["--to-hf", str(back), "--workdir", str(work)]) == 0
    assert "the workdir's tokenizer" in capsys.readouterr().out
    text = "def add(a, b):\n    return a + b  # 3 + 4 = 7\n"
    want_tok = transformers.AutoTokenizer.from_pretrained(str(source))
    got_tok = transformers.AutoTokenizer.from_pretrained(str(back))
    ids = got_tok(text)["input_ids"]
    assert ids == want_tok(text)["input_ids"] and len(ids) > 5
    assert got_tok.decode(ids) == text
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back)).eval()
    batch = np.asarray([ids])
    assert np.abs(hf_logits(reloaded, batch) - hf_logits(model, batch)).max() == 0.0
    assert sorted(os.listdir(back)) == ["config.json", "model.safetensors",
                                        "tokenizer.json", "tokenizer_config.json"]


def test_byte_level_export_has_a_byte_tokenizer(tmp_path, capsys):
    """A byte-level workdir exports a tokenizer whose token i is byte i, so the HF model
    reads text exactly as the jaxmix model does."""
    cfg, _, _ = _jaxmix_model("mamba")
    cfg.update(vocab_size=256)
    lm = models.build(cfg)
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: (0.1 * rs.standard_normal(s.shape)).astype(s.dtype),
                          models.abstract_params(lm))
    import mamba_lm
    config = mamba_lm.get_config("smoke")
    config.model = cfg
    convert.write_workdir(str(tmp_path / "work"), config, params)
    assert convert_main(["--to-hf", str(tmp_path / "back"), "--workdir",
                         str(tmp_path / "work")]) == 0
    assert "byte-level tokenizer" in capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    text = "héllo, wörld \x00\x7f 日本"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    ours, _ = lm.apply({"params": params}, jnp.asarray([ids]))
    assert np.abs(np.asarray(ours)[..., :256] - hf_logits(model, np.asarray([ids]))).max() <= 1e-4
