"""Bidirectional encoders over bytes, trained by masked-token prediction on the
embedded stdlib corpus (15% of the input bytes replaced by a mask embedding, the
cross-entropy of the model's guesses there).

Presets: the mixers of configs/audio_encoder.py (`ssamba`, `attention`, `mambamixer`)
at its CPU shapes, plus `smoke` (seconds).
  python train.py --config configs/byte_encoder.py:ssamba
"""
from jaxmix import config_files

MIXERS = ("ssamba", "attention", "mambamixer")


def get_config(preset="ssamba"):
    audio = config_files.sibling(__file__, "audio_encoder.py")
    mixer = "ssamba" if preset in ("smoke", "", None) else preset
    if mixer not in MIXERS:
        raise ValueError(f"unknown preset {preset!r}; choose {', '.join(MIXERS)} or smoke")
    c = audio.get_config(mixer)
    seq_len = 256
    c.model.update(vocab_size=256, vocab_multiple=8, patch_dim=0, max_len=seq_len,
                   head="masked_token", n_classes=0, tie_embeddings=True)
    c.data = type(c.data)(dict(source="stdlib", val_fraction=0.02, shuffle=True,
                               tokenizer="bytes", packing="concat"))
    c.train.update(steps=400, decay_steps=400, batch_size=16, seq_len=seq_len,
                   learning_rate=2e-3, warmup_steps=50, log_every=10, eval_every=100,
                   eval_batches=8, checkpoint_every=100)
    if preset == "smoke":
        c.model.update(d_model=32, n_layers=2, max_len=32)
        c.train.update(steps=4, decay_steps=4, batch_size=4, seq_len=32, warmup_steps=1,
                       log_every=2, eval_every=2, eval_batches=1, checkpoint_every=2)
    return c
