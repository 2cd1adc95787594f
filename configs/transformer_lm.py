"""Byte-level Llama-style Transformer LM (and Mamba/attention hybrids).

Pre-norm RMSNorm blocks: attention (GQA, rotary embeddings) then a SwiGLU MLP
(the LM backbone adds it because d_ff > 0). Embeddings tied or not by
`model.tie_embeddings`.

Presets: `default` (CPU, minutes), `smoke` (seconds, tests), `hybrid` (two Mamba
layers per attention layer, CPU-sized), `moh` / `moh-50` (the default model with
mixture-of-head attention, 75% / 50% of the heads active per token), `hybrid-moh`
(two Mamba layers per MoH layer) and pod-scale Llama shapes with a byte vocabulary:
`llama-160m`, `llama-410m`, `llama-1b`, `llama-7b`, `llama-8b`.

Mixer settings live in model.mixers.<entry> (attention, moh, mamba), e.g.
  --config.model.mixers.attention.attn_impl=pallas --config.model.mixers.moh.top_k=2
  python train.py --config configs/transformer_lm.py[:PRESET] [--config.a.b=value ...]

Pod presets run as configs/mamba_lm.py's (its docstring): 256 x 2048 tokens per step,
bf16, remat, FSDP over all chips (mesh.data=1, mesh.fsdp=-1; for several slices set
mesh.data to the slice count). POD_CHIPS is each preset's documented TPU v5e slice:
the smallest whose per-chip estimate (`python -m jaxmix.train.memory`) is at most
12 GiB of the chip's 16 GiB.
"""
from jaxmix import config_files


def _mamba_lm():
    """configs/mamba_lm.py, loaded by path (works whatever sys.path holds)."""
    return config_files.sibling(__file__, "mamba_lm.py")


# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, rope_theta)
POD_SHAPES = {
    "llama-160m": (768, 12, 12, 12, 2048, 10000.0),
    "llama-410m": (1024, 24, 16, 16, 2816, 10000.0),
    "llama-1b": (2048, 16, 32, 8, 8192, 500000.0),     # Llama-3.2-1B shape
    "llama-7b": (4096, 32, 32, 32, 11008, 10000.0),    # Llama-2-7B shape
    "llama-8b": (4096, 32, 32, 8, 14336, 500000.0),    # Llama-3-8B shape
}
# name: chips (a TPU v5e slice; see the module docstring).
POD_CHIPS = {"llama-160m": 4, "llama-410m": 8, "llama-1b": 16, "llama-7b": 64,
             "llama-8b": 64}


def base_config():
    c = _mamba_lm().base_config()
    c.model.update(mixer_pattern=("attention",), d_model=256, n_layers=4, d_ff=512,
                   tie_embeddings=True)
    heads = dict(n_heads=4, n_kv_heads=2)
    c.model.mixers.attention.update(heads)
    # MoH at 75% active heads: 2 shared + the top 1 of 2 routed (per token).
    c.model.mixers.moh.update(heads, shared_heads=2, top_k=1)
    c.train.update(learning_rate=2e-3)
    return c


def set_heads(c, **fields):
    """Head fields (n_heads, n_kv_heads, rope_theta, ...) of every attention-like mixer."""
    c.model.mixers.attention.update(fields)
    c.model.mixers.moh.update(fields)


def get_config(preset="default"):
    mamba_lm = _mamba_lm()
    c = base_config()
    if preset in ("default", ""):
        pass
    elif preset == "smoke":
        c.model.update(d_model=32, n_layers=2, d_ff=64)
        set_heads(c, n_heads=2, n_kv_heads=1)
        c.model.mixers.moh.update(shared_heads=1, top_k=1)
        c.model.mixers.mamba.d_state = 4
        mamba_lm.smoke_train(c)
    elif preset == "hybrid":
        c.model.update(mixer_pattern=("mamba", "mamba", "attention"), n_layers=3)
    elif preset == "moh":  # 75% of the heads active per token
        c.model.mixer_pattern = ("moh",)
    elif preset == "moh-50":  # 50%: 1 shared + the top 1 of 3 routed
        c.model.mixer_pattern = ("moh",)
        c.model.mixers.moh.update(shared_heads=1, top_k=1)
    elif preset == "hybrid-moh":
        c.model.update(mixer_pattern=("mamba", "mamba", "moh"), n_layers=3)
    elif preset in POD_SHAPES:
        d_model, n_layers, n_heads, n_kv_heads, d_ff, theta = POD_SHAPES[preset]
        c.model.update(d_model=d_model, n_layers=n_layers, d_ff=d_ff, tie_embeddings=False,
                       dtype="bfloat16", remat="block")
        set_heads(c, n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=theta,
                  max_cache_len=8192)
        c.model.mixers.moh.update(shared_heads=n_heads // 2, top_k=n_heads // 4)
        mamba_lm.pod_train(c, learning_rate=3e-4)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose default, smoke, hybrid, moh, "
                         f"moh-50, hybrid-moh or {', '.join(POD_SHAPES)}")
    return c
