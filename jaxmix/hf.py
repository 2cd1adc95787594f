"""Hugging Face <-> jaxmix weights for MambaForCausalLM (and mamba_ssm checkpoints) and
LlamaForCausalLM.

  model_config, params = hf.load(directory)       # config.json + *.safetensors or *.bin
  hf.save(directory, model_config, params)        # config.json + model.safetensors

`jaxmix.workdir.load_params` reads either an HF directory (through `load`) or a jaxmix
workdir, for train.py's --config.init_from.

Reading safetensors needs no torch; `pytorch_model.bin` files import torch lazily.
torch Linear weights are [out, in] (jaxmix kernels are [in, out]); every mapping below
is a pair of exact inverse layout changes, so jaxmix -> HF -> jaxmix is lossless.
"""
import contextlib
import json
import os
import struct

import ml_collections
import numpy as np

from jaxmix.errors import ConfigError, read_json

# ----------------------------------------------------------------------------- layouts
# (to_jaxmix, to_hf) pairs; `d` is the jaxmix array's leading-dims hint when needed.
COPY = (lambda w: w, lambda w: w)
LINEAR = (lambda w: w.T, lambda w: w.T)                       # [out, in] <-> [in, out]
CONV = (lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :])    # [I, 1, K] <-> [K, I]
IN_PROJ = (lambda w: w.reshape(2, -1, w.shape[-1]).transpose(2, 0, 1),   # [2I, D] -> [D, 2, I]
           lambda w: w.transpose(1, 2, 0).reshape(-1, w.shape[0]))
IN_BIAS = (lambda b: b.reshape(2, -1), lambda b: b.reshape(-1))   # [2I] <-> [2, I]


def _model_config(shared, mixer, **fields):
    """A model config: the shared fields, and one model.mixers entry (`mixer`)."""
    from jaxmix.models import default_mixers
    mixers = default_mixers(mixer)
    mixers[mixer].update(fields)
    return ml_collections.ConfigDict(dict(family="lm", dtype="float32", remat="none",
                                          mixer_pattern=(mixer,), mixers=mixers, **shared))


# ----------------------------------------------------------------------------- configs

def _get(hf, *names, default=None):
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def _check_act(hf):
    act = _get(hf, "hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config.json: hidden_act={act!r}; jaxmix supports silu only")


def _arch(hf):
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "")
    if model_type == "mamba" or "MambaForCausalLM" in archs:
        return "mamba"
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        return "llama"
    if "d_model" in hf and "n_layer" in hf:
        return "mamba_ssm"
    raise ConfigError(f"config.json: model_type={model_type!r}, architectures={archs}; "
                      f"jaxmix converts MambaForCausalLM, mamba_ssm and LlamaForCausalLM")


def mamba_config(hf):
    """jaxmix mamba_lm model config from an HF MambaConfig dict."""
    _check_act(hf)
    d_model = hf["hidden_size"]
    expand = hf.get("expand", 2)
    if int(expand * d_model) != expand * d_model:
        raise ConfigError(f"config.json: expand={expand} * hidden_size={d_model} is not whole")
    rank = hf.get("time_step_rank", "auto")
    shared = dict(d_model=d_model, n_layers=hf["num_hidden_layers"],
                  vocab_size=hf["vocab_size"], vocab_multiple=1, d_ff=0,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    return _model_config(shared, "mamba", d_state=hf.get("state_size", 16), expand=expand,
                         d_conv=hf.get("conv_kernel", 4),
                         dt_rank=0 if rank == "auto" else int(rank),
                         proj_bias=bool(hf.get("use_bias")))


def mamba_ssm_config(hf, embed_rows):
    """jaxmix mamba_lm model config from a mamba_ssm MambaConfig dict."""
    ssm = hf.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ConfigError(f"config.json: ssm_cfg.layer={ssm['layer']!r}; only Mamba1 converts")
    if hf.get("d_intermediate", 0) or not hf.get("rms_norm", True):
        raise ConfigError("config.json: d_intermediate > 0 or rms_norm=false is not supported")
    if "attn_layer_idx" in hf and hf["attn_layer_idx"]:
        raise ConfigError("config.json: attn_layer_idx is set; hybrid mamba_ssm is not supported")
    rank = ssm.get("dt_rank", "auto")
    vocab, multiple = hf["vocab_size"], hf.get("pad_vocab_size_multiple", 1)
    if -(-vocab // multiple) * multiple != embed_rows:
        vocab, multiple = embed_rows, 1
    shared = dict(d_model=hf["d_model"], n_layers=hf["n_layer"], vocab_size=vocab,
                  vocab_multiple=multiple, d_ff=0,
                  tie_embeddings=bool(hf.get("tie_embeddings", True)), norm_eps=1e-5)
    return _model_config(shared, "mamba", d_state=ssm.get("d_state", 16),
                         expand=ssm.get("expand", 2), d_conv=ssm.get("d_conv", 4),
                         dt_rank=0 if rank == "auto" else int(rank),
                         proj_bias=bool(ssm.get("bias")))


def llama_config(hf):
    """jaxmix transformer_lm model config from an HF LlamaConfig dict (v4 or v5 keys)."""
    _check_act(hf)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"config.json: rope_type={kind!r}; jaxmix supports default RoPE only")
    theta = _get(rope, "rope_theta", default=None) or hf.get("rope_theta", 10000.0)
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    shared = dict(d_model=d_model, n_layers=hf["num_hidden_layers"],
                  vocab_size=hf["vocab_size"], vocab_multiple=1, d_ff=hf["intermediate_size"],
                  mlp_bias=bool(hf.get("mlp_bias")),
                  tie_embeddings=bool(hf.get("tie_word_embeddings")),
                  norm_eps=hf.get("rms_norm_eps", 1e-6))
    return _model_config(shared, "attention", n_heads=n_heads,
                         n_kv_heads=_get(hf, "num_key_value_heads", default=n_heads),
                         head_dim=_get(hf, "head_dim", default=d_model // n_heads),
                         rope_theta=float(theta), attn_bias=bool(hf.get("attention_bias")),
                         max_cache_len=hf.get("max_position_embeddings", 2048))


def _single_mixer(cfg):
    """(kind, merged mixer config) of a model whose layers all use one mixer entry, else
    (None, None)."""
    from jaxmix.models import kind_of, layer_kinds, mixer_config
    names = set(layer_kinds(cfg))
    if len(names) != 1:
        return None, None
    name = names.pop()
    return kind_of(cfg, name), mixer_config(cfg, name)


def hf_config(cfg):
    """The HF config.json dict for a jaxmix model config (pure Mamba or pure Llama)."""
    from jaxmix.models import padded_vocab
    kind, m = _single_mixer(cfg)
    vocab = padded_vocab(cfg)
    common = dict(vocab_size=vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  tie_word_embeddings=bool(cfg.get("tie_embeddings", True)), hidden_act="silu")
    if kind == "mamba" and not cfg.get("d_ff", 0):
        from jaxmix.mixers.mamba import dt_rank_of
        return dict(common, architectures=["MambaForCausalLM"], model_type="mamba",
                    state_size=m.d_state, expand=m.expand, conv_kernel=m.d_conv,
                    time_step_rank=dt_rank_of(m), use_bias=bool(m.proj_bias),
                    use_conv_bias=True, layer_norm_epsilon=cfg.get("norm_eps", 1e-5),
                    residual_in_fp32=True)
    if kind == "attention" and cfg.get("d_ff", 0) and not m.sliding_window:
        from jaxmix.mixers.attention import head_shape
        hq, hkv, hd = head_shape(m)
        theta = float(m.rope_theta)
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                    intermediate_size=cfg.d_ff, num_attention_heads=hq, num_key_value_heads=hkv,
                    head_dim=hd, rms_norm_eps=cfg.get("norm_eps", 1e-5), rope_theta=theta,
                    rope_parameters={"rope_type": "default", "rope_theta": theta},
                    attention_bias=bool(m.attn_bias),
                    mlp_bias=bool(cfg.get("mlp_bias", False)),
                    max_position_embeddings=m.max_cache_len)
    raise ConfigError(f"hf.save: model.mixer_pattern={tuple(cfg.mixer_pattern)} with "
                      f"d_ff={cfg.get('d_ff', 0)} has no HF counterpart; save pure Mamba "
                      f"(d_ff=0) or pure attention (d_ff>0, no sliding_window) models")


# ----------------------------------------------------------------------------- name maps

def mamba_names(cfg):
    """[(hf name, jaxmix path, layout)] for a Mamba LM."""
    bias = _single_mixer(cfg)[1].proj_bias
    out = [("backbone.embeddings.weight", ("embed", "embedding"), COPY)]
    for i in range(cfg.n_layers):
        h, j = f"backbone.layers.{i}.", f"layers_{i}"
        m = h + "mixer."
        out += [(h + "norm.weight", (j, "norm", "scale"), COPY),
                (m + "in_proj.weight", (j, "mixer", "in_proj"), IN_PROJ),
                (m + "conv1d.weight", (j, "mixer", "conv_weight"), CONV),
                (m + "conv1d.bias", (j, "mixer", "conv_bias"), COPY),
                (m + "x_proj.weight", (j, "mixer", "x_proj", "kernel"), LINEAR),
                (m + "dt_proj.weight", (j, "mixer", "dt_proj_kernel"), LINEAR),
                (m + "dt_proj.bias", (j, "mixer", "dt_proj_bias"), COPY),
                (m + "A_log", (j, "mixer", "A_log"), COPY),
                (m + "D", (j, "mixer", "D"), COPY),
                (m + "out_proj.weight", (j, "mixer", "out_proj"), LINEAR)]
        if bias:
            out += [(m + "in_proj.bias", (j, "mixer", "in_proj_bias"), IN_BIAS),
                    (m + "out_proj.bias", (j, "mixer", "out_proj_bias"), COPY)]
    out.append(("backbone.norm_f.weight", ("norm_f", "scale"), COPY))
    if not cfg.get("tie_embeddings", True):
        out.append(("lm_head.weight", ("lm_head", "kernel"), LINEAR))
    return out


def llama_names(cfg):
    """[(hf name, jaxmix path, layout)] for a Llama LM."""
    out = [("model.embed_tokens.weight", ("embed", "embedding"), COPY)]
    for i in range(cfg.n_layers):
        h, j = f"model.layers.{i}.", f"layers_{i}"
        out += [(h + "input_layernorm.weight", (j, "norm", "scale"), COPY),
                (h + "post_attention_layernorm.weight", (j, "mlp_norm", "scale"), COPY)]
        groups = [("self_attn", "mixer", ("q_proj", "k_proj", "v_proj", "o_proj"),
                   _single_mixer(cfg)[1].attn_bias),
                  ("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), cfg.get("mlp_bias", False))]
        for hf_mod, jx_mod, projs, bias in groups:
            for p in projs:
                out.append((f"{h}{hf_mod}.{p}.weight", (j, jx_mod, p, "kernel"), LINEAR))
                if bias:
                    out.append((f"{h}{hf_mod}.{p}.bias", (j, jx_mod, p, "bias"), COPY))
    out.append(("model.norm.weight", ("norm_f", "scale"), COPY))
    if not cfg.get("tie_embeddings", True):
        out.append(("lm_head.weight", ("lm_head", "kernel"), LINEAR))
    return out


def names_of(cfg):
    return mamba_names(cfg) if _single_mixer(cfg)[0] == "mamba" else llama_names(cfg)


# ----------------------------------------------------------------------------- file IO

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
    """{name: np.ndarray} from one .safetensors file (bf16 included, via ml_dtypes)."""
    import ml_dtypes
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    data = np.memmap(path, np.uint8, "r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype).reshape(info["shape"])
    return out


def read_torch_bin(path):
    import torch  # optional: only for pytorch_model.bin checkpoints
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def read_state_dict(directory):
    """{name: np.ndarray} of all weights in an HF model directory (sharded or not)."""
    for index, reader in (("model.safetensors.index.json", read_safetensors),
                          ("pytorch_model.bin.index.json", read_torch_bin)):
        path = os.path.join(directory, index)
        if os.path.exists(path):
            with open(path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for name in files:
                state.update(reader(os.path.join(directory, name)))
            return state
    for name, reader in (("model.safetensors", read_safetensors),
                         ("pytorch_model.bin", read_torch_bin)):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return reader(path)
    raise ConfigError(f"{directory}: no model.safetensors, pytorch_model.bin or their "
                      f"*.index.json; point at a Hugging Face model directory")


def read_hf_config(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{directory}: no config.json; point at a Hugging Face model directory")
    return read_json(path, "config.json", "fix it, or download the model again")


# ----------------------------------------------------------------------------- public API

def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@contextlib.contextmanager
def _fields_of(directory):
    """A field missing from config.json (KeyError) as one ConfigError line."""
    try:
        yield
    except KeyError as e:
        raise ConfigError(f"{os.path.join(directory, 'config.json')} has no field "
                          f"{e.args[0]!r}; fix it, or download the model again") from None


def load(directory):
    """(model_config, params) from an HF model directory; params are float32 numpy
    arrays in the pytree `models.build(model_config).init(...)` returns (unboxed)."""
    hf = read_hf_config(directory)
    arch = _arch(hf)
    with _fields_of(directory):  # the config first: its mistakes before the weights'
        cfg = (None if arch == "mamba_ssm"  # sized by the weights, below
               else mamba_config(hf) if arch == "mamba" else llama_config(hf))
    state = read_state_dict(directory)
    if arch == "mamba_ssm" or "backbone.embedding.weight" in state:
        state = {k.replace("backbone.embedding.", "backbone.embeddings."): v
                 for k, v in state.items()}
    if arch == "mamba_ssm":
        with _fields_of(directory):
            cfg = mamba_ssm_config(hf, state["backbone.embeddings.weight"].shape[0])
    if arch != "llama":  # the weights decide (configs written by older versions omit it)
        cfg.mixers.mamba.proj_bias = "backbone.layers.0.mixer.in_proj.bias" in state
    params = {}
    for name, path, (to_jax, _) in names_of(cfg):
        if name not in state:
            if name.endswith("conv1d.bias"):  # use_conv_bias=False: an all-zero bias
                value = np.zeros(state[name[:-4] + "weight"].shape[0], np.float32)
            else:
                raise ConfigError(f"{directory}: weight {name} is missing from the checkpoint "
                                  f"(config.json does not match the weights)")
        else:
            value = np.ascontiguousarray(to_jax(np.asarray(state[name], np.float32)))
        _set(params, path, value)
    return cfg, params


def save(directory, model_config, params):
    """Writes config.json and model.safetensors (float32) for HF `from_pretrained`."""
    from safetensors.numpy import save_file
    from jaxmix.models import normalize_config
    cfg = ml_collections.FrozenConfigDict(normalize_config(model_config))
    config = hf_config(cfg)
    tensors = {}
    for name, path, (_, to_hf) in names_of(cfg):
        value = np.asarray(_lookup(params, path), np.float32)
        tensors[name] = np.ascontiguousarray(to_hf(value))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
