"""Audio encoders over log-mel spectrogram patches (SSAMBA, an AST-like transformer,
MambaMixer), pretrained by masked-patch prediction and fine-tuned as classifiers.

Presets: MIXER[-STAGE][-SIZE]
  MIXER  ssamba      bidirectional Mamba blocks (Vision Mamba "v2": shared in/out
                     projections, the backward direction's own conv and SSM, outputs
                     averaged), as SSAMBA;
         attention   an AST-like transformer: bidirectional attention + SwiGLU MLP;
         mambamixer  MambaMixer: selective token mixer + selective channel mixer and
                     the weighted averaging of all earlier layers' outputs;
  STAGE  finetune    (default) supervised classification (model.head="classify",
                     mean of the patch features); start it from a pretrained workdir
                     with --config.init_from=WORKDIR;
         pretrain    SSAMBA's joint masked-patch pretraining (InfoNCE + 10 x MSE on
                     `data.audio.mask_patches` cluster-masked patches, no labels);
  SIZE   cpu         (default) tiny CPU shapes: 1.28 s clips, 64 mel bins, 32 patches;
         tiny/small/base  SSAMBA's shapes for pods (24 layers, d_model 192/384/768,
                     128 mel bins x 1024 frames = 512 patches of 16 x 16, 400 masked).
The CPU models have about the same parameter count (see README). SSAMBA's code pairs
every two layers on flipped inputs (four scans per pair); these presets use plain
Vision Mamba "v2" blocks (two scans per layer), as the paper's figure draws it.

Data: `audio:synthetic` (the default: labelled mixtures of tones, chirps, clicks and
noise bursts made from the seed; `data.audio.n_clips` train clips) or `wav:GLOB`
(WAV files, the label is each file's folder name). `data.audio.label_fraction` keeps
that share of the training labels (fine-tuning with few labels).
  python train.py --config configs/audio_encoder.py:ssamba-pretrain --workdir runs/pre
  python train.py --config configs/audio_encoder.py:ssamba \\
      --config.init_from=runs/pre --config.data.audio.label_fraction=0.1
"""
import ml_collections

from jaxmix.data import audio
from jaxmix.parallel.mesh import DEFAULT_RULES

MIXERS = ("ssamba", "attention", "mambamixer")
STAGES = ("finetune", "pretrain")
# name: (d_model, n_layers); SSAMBA-tiny/small/base (ViT-style widths, depth 24).
POD_SHAPES = {"tiny": (192, 24), "small": (384, 24), "base": (768, 24)}
# CPU shapes chosen for about equal parameter counts (mixer: (d_model, n_layers)).
CPU_SHAPES = {"ssamba": (128, 4), "attention": (96, 4), "mambamixer": (96, 4)}


def mixer_entry(mixer):
    """(mixer_pattern, mixers, extra model fields) of one encoder kind."""
    if mixer == "ssamba":
        return ("bimamba",), {"bimamba": dict(d_state=16, d_conv=4, expand=2)}, {}
    if mixer == "attention":
        return ("attention",), {"attention": dict(n_heads=4, causal=False)}, {"d_ff": -1}
    return (("mambamixer",), {"mambamixer": dict(d_state=16, d_conv=4, expand=2,
                                                 channel_inner=0)},
            {"layer_average": True})


def base_config(mixer, stage, size):
    c = ml_collections.ConfigDict()
    d_model, n_layers = POD_SHAPES[size] if size in POD_SHAPES else CPU_SHAPES[mixer]
    pattern, entries, extra = mixer_entry(mixer)
    s = dict(audio.DEFAULTS)
    if size in POD_SHAPES:  # 10.24 s: 128 mel bins x 1024 frames, 512 patches
        s.update(clip_seconds=10.24, n_mels=128, mask_patches=400 if stage == "pretrain" else 0)
    else:
        s.update(clip_seconds=1.28, n_mels=64, n_clips=2000, val_clips=400,
                 mask_patches=12 if stage == "pretrain" else 0)
    n_patches = audio.n_patches(s)
    d_ff = 4 * d_model if extra.pop("d_ff", 0) else 0
    c.model = ml_collections.ConfigDict(dict(
        family="encoder", d_model=d_model, n_layers=n_layers, vocab_size=2, d_ff=d_ff,
        mixer_pattern=pattern, mixers=entries, norm_eps=1e-5, dtype="float32",
        remat="none", mlp_bias=False, patch_dim=s["patch"] ** 2, max_len=n_patches,
        cls_token=False, pool="mean", n_classes=s["n_classes"],
        head="masked_patch" if stage == "pretrain" else "classify", layer_average=False))
    c.model.update(extra)
    cpu = size not in POD_SHAPES
    c.train = ml_collections.ConfigDict(dict(
        steps=600 if cpu else 40_000, decay_steps=600 if cpu else 40_000,
        batch_size=32 if cpu else 64, seq_len=n_patches,
        learning_rate=2e-3 if cpu else 1e-4, warmup_steps=50 if cpu else 1000,
        min_lr_ratio=0.1, weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0,
        log_every=20 if cpu else 100, eval_every=200 if cpu else 2000,
        eval_batches=max(1, s["val_clips"] // (32 if cpu else 64)),
        checkpoint_every=200 if cpu else 1000, keep_checkpoints=3, seed=0, cpu_devices=0,
        nonfinite="stop", nonfinite_max=10))
    c.data = ml_collections.ConfigDict(dict(source="audio:synthetic", val_fraction=0.1,
                                            shuffle=True, audio=s))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
    c.init_from = ""  # a pretrained workdir: its backbone, a fresh head
    c.sample_at_end = False
    return c


def get_config(preset="ssamba"):
    parts = (preset or "ssamba").split("-")
    mixer, rest = parts[0], parts[1:]
    stage = next((p for p in rest if p in STAGES), "finetune")
    size = next((p for p in rest if p in POD_SHAPES or p == "cpu"), "cpu")
    unknown = [p for p in rest if p not in STAGES and p not in POD_SHAPES and p != "cpu"]
    if mixer not in MIXERS or unknown:
        raise ValueError(f"unknown preset {preset!r}; use MIXER[-STAGE][-SIZE] with MIXER in "
                         f"{', '.join(MIXERS)}, STAGE in {', '.join(STAGES)}, SIZE in "
                         f"cpu, {', '.join(POD_SHAPES)}")
    return base_config(mixer, stage, size)
