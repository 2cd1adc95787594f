"""Long-context presets: the sequence split over `mesh.sequence` devices.

Attention layers run as ring attention (zigzag layout) and Mamba layers as the
sequence-parallel selective scan whenever mesh.sequence > 1; every block is
rematerialised. Sized for 8 (simulated) devices on a 24 GiB CPU machine: one
sequence per step, small widths. Presets:
  attention-128k   Llama-style attention LM, 131,072-token context
  hybrid-128k      Mamba + attention layers, 131,072-token context
  mamba-1m         Mamba LM, 1,048,576-token context
  smoke            a Mamba + attention hybrid, 4,096 tokens over 8 devices (seconds)
  python train.py --config configs/long_context.py:mamba-1m
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      .venv/bin/python benchmarks/bench_ring.py step --config configs/long_context.py:mamba-1m
On a pod, raise d_model / n_layers and set mesh.data / fsdp / tensor for the rest.
"""
from jaxmix import config_files


def _mamba_lm():
    """configs/mamba_lm.py, loaded by path (works whatever sys.path holds)."""
    return config_files.sibling(__file__, "mamba_lm.py")


PRESETS = ("attention-128k", "hybrid-128k", "mamba-1m", "smoke")


def base_config():
    c = _mamba_lm().base_config()
    c.model.remat = "block"
    c.model.mixers.attention.update(n_heads=4, n_kv_heads=2, rope_theta=500000.0,
                                    ring_layout="zigzag")
    c.train.update(batch_size=1, steps=100, decay_steps=100, warmup_steps=10,
                   learning_rate=1e-3, log_every=1, eval_every=50, eval_batches=1,
                   checkpoint_every=50, keep_checkpoints=2)
    c.mesh.update(data=1, fsdp=1, tensor=1, sequence=8)
    return c


def get_config(preset="mamba-1m"):
    c = base_config()
    if preset in ("", "default"):
        preset = "mamba-1m"
    if preset == "attention-128k":
        c.model.update(mixer_pattern=("attention",), d_model=128, n_layers=2, d_ff=256)
        c.model.mixers.attention.n_kv_heads = 1
        c.train.update(seq_len=131_072)
    elif preset == "hybrid-128k":
        c.model.update(mixer_pattern=("mamba", "attention"), d_model=128, n_layers=2,
                       d_ff=256)
        c.model.mixers.attention.n_kv_heads = 1
        c.train.update(seq_len=131_072)
    elif preset == "mamba-1m":
        c.model.update(mixer_pattern=("mamba",), d_model=32, n_layers=2, d_ff=0)
        c.train.update(seq_len=1_048_576)
        c.data.update(val_fraction=0.2)  # the split must hold one 1M-token window
    elif preset == "smoke":
        c.model.update(mixer_pattern=("mamba", "attention"), d_model=32, n_layers=2, d_ff=64)
        c.model.mixers.mamba.d_state = 4
        c.model.mixers.attention.update(n_heads=2, n_kv_heads=1)
        c.train.update(seq_len=4096, steps=4, decay_steps=4, warmup_steps=1, log_every=1,
                       eval_every=2, checkpoint_every=2)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return c
