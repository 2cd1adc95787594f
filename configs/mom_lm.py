"""Byte-level Mixture-of-Memories LM (and Gated DeltaNet / attention hybrids).

Pre-norm blocks: a MoM mixer (jaxmix.mixers.mom: 4 gated-delta-rule memories, each
token routed to 2, plus a shared memory) then a SwiGLU MLP.

Presets:
  default      CPU-sized (d_model 256, 4 layers, 2 heads of 32), stdlib bytes, 240 steps
  smoke        seconds, for tests
  gdn          the default model with one Gated DeltaNet memory per layer instead
  hybrid       7 MoM layers then 1 attention layer (the paper's hybrid ratio), CPU-sized
  340m, 1.3b   the official configs' shapes (24 layers, d_model 1024 / 2048, 4 heads of
               256, MLP d_ff as fla's hidden_ratio 3 / 4 gives) with a byte vocabulary,
               run as configs/mamba_lm.py's pod presets (FSDP over all chips, bf16, remat)
  python train.py --config configs/mom_lm.py[:PRESET] [--config.a.b=value ...]
Mixer settings: --config.model.mixers.mom.top_k=1, --config.model.mixers.mom.aux_weight=...
"""
from jaxmix import config_files

PRESETS = ("default", "smoke", "gdn", "hybrid", "340m", "1.3b")
# name: (d_model, d_ff); 24 layers each. d_ff = hidden * ratio * 2/3, rounded up to 256.
POD_SHAPES = {"340m": (1024, 2048), "1.3b": (2048, 5632)}


def _mamba_lm():
    return config_files.sibling(__file__, "mamba_lm.py")


def set_memory_heads(c, **fields):
    """Head fields of the delta-rule mixers (mom and gdn alike)."""
    c.model.mixers.mom.update(fields)
    c.model.mixers.gdn.update(fields)


def base_config():
    c = _mamba_lm().base_config()
    c.model.update(mixer_pattern=("mom",), d_model=256, n_layers=4, d_ff=512)
    # CPU-sized memories: 2 heads of 32 and chunks of 32 (the op's cost per token grows
    # with the chunk and the state; 64/64 runs at 935 tokens/s here, 32/32 at 2,350).
    set_memory_heads(c, n_heads=2, head_dim=32, chunk_size=32)
    c.model.mixers.mom.update(n_memories=4, top_k=2, shared_memory=True, aux_weight=0.01)
    # 240 steps of 16 x 256 (under 10 minutes here); one CPU device: for this model XLA's
    # threads inside one device beat data parallelism over per-core devices
    # (2,350 vs 1,430 tokens/s on 2 cores).
    c.train.update(learning_rate=2e-3, steps=240, decay_steps=240, cpu_devices=1)
    return c


def get_config(preset="default"):
    mamba_lm = _mamba_lm()
    c = base_config()
    if preset in ("default", ""):
        pass
    elif preset == "smoke":
        c.model.update(d_model=32, n_layers=2, d_ff=64)
        set_memory_heads(c, n_heads=2, head_dim=16, chunk_size=8)
        mamba_lm.smoke_train(c)
    elif preset == "gdn":
        c.model.mixer_pattern = ("gdn",)
    elif preset == "hybrid":
        c.model.update(mixer_pattern=("mom",) * 7 + ("attention",), n_layers=8)
        c.model.mixers.attention.update(n_heads=4, n_kv_heads=2)
    elif preset in POD_SHAPES:
        d_model, d_ff = POD_SHAPES[preset]
        c.model.update(d_model=d_model, n_layers=24, d_ff=d_ff, dtype="bfloat16", remat="block")
        set_memory_heads(c, n_heads=4, head_dim=256, chunk_size=64)
        mamba_lm.pod_train(c, learning_rate=3e-4)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return c
