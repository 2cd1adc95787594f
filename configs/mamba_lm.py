"""Mamba language model, byte-level unless a preset says otherwise.

Presets: `default` (CPU, minutes), `smoke` (seconds, tests), and pod-scale
shapes of the published Mamba models: `130m`, `370m`, `790m`, `1.4b`, `2.8b` with the
byte vocabulary (256), and `130m-neox` ... `2.8b-neox` with the GPT-NeoX tokenizer's
50,280 tokens, the vocabulary of the published models (train those with
`--config.data.tokenizer=<a GPT-NeoX tokenizer folder>`). The names are the published
models'; the byte-level ones hold fewer parameters, since the embedding is most of a
small model (POD_PARAMS, checked against the built models by the tests):
  130m 90.7M    370m 320.3M    790m 716.4M    1.4b 1,269.7M    2.8b 2,640.3M
  130m-neox 129.1M  370m-neox 371.5M  790m-neox 793.2M  1.4b-neox 1,372.2M
  2.8b-neox 2,768.3M
  python train.py --config configs/mamba_lm.py[:PRESET] [--config.a.b=value ...]

Pod presets (`pod_train`, shared with configs/transformer_lm.py): 256 x 2048 tokens per
step, bf16 compute, every block rematerialised, and FSDP over all chips
(mesh.data=1, mesh.fsdp=-1): params, gradients and AdamW moments are split over the
chips (ZeRO-3) and so is the batch, so per-chip memory falls with the chip count
instead of every chip holding a whole copy. One axis is the simplest mesh that fits;
for several slices set mesh.data to the slice count (data parallel across slices, FSDP
inside each). POD_CHIPS is each preset's documented pod size: the smallest TPU v5e
slice (4 to 256 chips, 16 GiB each) whose per-chip estimate from
`python -m jaxmix.train.memory` is at most 12 GiB (a quarter left for XLA's own
buffers and the estimate's error). Another chip count works if it divides the batch
(256) and d_model and its estimate fits.
"""
import ml_collections

from jaxmix import models
from jaxmix.parallel.mesh import DEFAULT_RULES

# name: (d_model, n_layers), as in the Mamba paper's model family.
POD_SHAPES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48),
              "1.4b": (2048, 48), "2.8b": (2560, 64)}
NEOX_VOCAB = 50_280  # the GPT-NeoX tokenizer's vocabulary (a multiple of 8)
# name: chips (a TPU v5e slice; see the module docstring).
POD_CHIPS = {"130m": 8, "370m": 16, "790m": 32, "1.4b": 32, "2.8b": 64,
             "130m-neox": 32, "370m-neox": 64, "790m-neox": 64, "1.4b-neox": 64,
             "2.8b-neox": 128}
# name: parameter count of the built model.
POD_PARAMS = {"130m": 90_716_928, "370m": 320_291_840, "790m": 716_367_360,
              "1.4b": 1_269_729_280, "2.8b": 2_640_284_160, "130m-neox": 129_135_360,
              "370m-neox": 371_516_416, "790m-neox": 793_204_224, "1.4b-neox": 1_372_178_432,
              "2.8b-neox": 2_768_345_600}


def base_config():
    c = ml_collections.ConfigDict()
    # Shared fields, then one entry per mixer (models.config): the pattern names entries.
    c.model = ml_collections.ConfigDict(dict(
        family="lm", d_model=256, n_layers=4, vocab_size=256, vocab_multiple=8,
        mixer_pattern=("mamba",), d_ff=0, tie_embeddings=True, norm_eps=1e-5,
        dtype="float32", remat="none", scan_layers="auto", mlp_bias=False,
        mixers=models.default_mixers()))
    c.train = ml_collections.ConfigDict(dict(
        steps=400, decay_steps=400, batch_size=16, seq_len=256, learning_rate=4e-3, warmup_steps=50,
        min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
        log_every=10, eval_every=100, eval_batches=8, checkpoint_every=100,
        keep_checkpoints=3, seed=0,
        # A step with a non-finite loss or gradient norm never updates the params; then
        # "stop" (exit status 3 with a diagnosis) or "skip" (go on; stop after
        # nonfinite_max such steps in a row).
        nonfinite="stop", nonfinite_max=10,
        cpu_devices=0))  # CPU hosts: data-parallel over up to this many cores (0 = all, 1 = off)
    # tokenizer: "bytes" or an HF tokenizer folder / tokenizer.json; packing: "concat"
    # (documents run together) or "segments" (no position sees across a document).
    c.data = ml_collections.ConfigDict(dict(source="stdlib", val_fraction=0.02, shuffle=True,
                                            tokenizer="bytes", packing="concat"))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
    c.init_from = ""  # an HF model directory or a jaxmix workdir to start from
    c.sample_at_end = True
    return c


def smoke_train(c):
    """The `smoke` preset's run shape (seconds on a CPU), shared by every config file."""
    c.train.update(steps=10, decay_steps=10, batch_size=4, seq_len=32, warmup_steps=2,
                   log_every=2, eval_every=5, eval_batches=2, checkpoint_every=5)


def pod_train(c, learning_rate):
    """The run shape of the pod-scale presets: FSDP over every chip (see the docstring)."""
    c.mesh.update(data=1, fsdp=-1, tensor=1, sequence=1)
    c.model.scan_layers = "scan"  # one layer compiled, on every backend
    c.train.update(steps=100_000, decay_steps=100_000, batch_size=256, seq_len=2048,
                   learning_rate=learning_rate, warmup_steps=2000, log_every=50,
                   eval_every=2000, checkpoint_every=1000)


def get_config(preset="default"):
    c = base_config()
    if preset in ("default", ""):
        pass
    elif preset == "smoke":
        c.model.update(d_model=32, n_layers=2)
        c.model.mixers.mamba.d_state = 4
        smoke_train(c)
    elif preset in POD_CHIPS:
        shape, _, vocab = preset.partition("-")
        d_model, n_layers = POD_SHAPES[shape]
        # remat "block": the least memory, which the v5e slices of POD_CHIPS need;
        # "save_kernels" (no scan forward rerun) about doubles the activations.
        c.model.update(d_model=d_model, n_layers=n_layers, dtype="bfloat16", remat="block")
        if vocab == "neox":
            c.model.vocab_size = NEOX_VOCAB
        pod_train(c, learning_rate=6e-4)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose default, smoke or "
                         f"{', '.join(POD_CHIPS)}")
    return c
