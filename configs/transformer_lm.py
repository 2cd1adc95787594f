"""Byte-level Llama-style Transformer LM (and Mamba/attention hybrids).

Pre-norm RMSNorm blocks: attention (GQA, rotary embeddings) then a SwiGLU MLP
(the LM backbone adds it because d_ff > 0). Embeddings tied or not by
`model.tie_embeddings`.

Presets: `default` (CPU, minutes), `smoke` (seconds, tests), `hybrid` (two Mamba
layers per attention layer, CPU-sized) and pod-scale Llama shapes with a byte
vocabulary: `llama-160m`, `llama-410m`, `llama-1b`, `llama-7b`, `llama-8b`.
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
    c.model.update(mixer_pattern=("attention",), d_model=256, n_layers=4, n_heads=4,
                   n_kv_heads=2, head_dim=0, d_ff=512, rope_theta=10000.0, sliding_window=0,
                   attn_impl="auto", attn_bias=False, max_cache_len=2048,
                   tie_embeddings=True)
    c.train.update(learning_rate=2e-3)
    return c


def get_config(preset="default"):
    mamba_lm = _mamba_lm()
    c = base_config()
    if preset in ("default", ""):
        pass
    elif preset == "smoke":
        c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, d_state=4)
        mamba_lm.smoke_train(c)
    elif preset == "hybrid":
        c.model.update(mixer_pattern=("mamba", "mamba", "attention"), n_layers=3)
    elif preset in POD_SHAPES:
        d_model, n_layers, n_heads, n_kv_heads, d_ff, theta = POD_SHAPES[preset]
        c.model.update(d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_ff=d_ff, rope_theta=theta,
                       tie_embeddings=False, dtype="bfloat16", remat=True,
                       max_cache_len=8192)
        mamba_lm.pod_train(c, learning_rate=3e-4)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose default, smoke, hybrid or "
                         f"{', '.join(POD_SHAPES)}")
    return c
