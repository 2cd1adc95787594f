"""Fine-tuning a model you already have: a jaxmix workdir, or a Hugging Face Mamba or
Llama directory (imported first with `python -m jaxmix.convert`, or read directly).

  python train.py --config configs/finetune.py:runs/mamba-130m \
      --config.data.source=arrayrecord:data/corpus [--workdir runs/mamba-130m-ft]

Without --workdir the run goes to runs/finetune-<MODEL's folder name>; it never writes
into MODEL.

The preset is the model to start from. Its model section is used as it is (on top of
configs/mamba_lm.py for a pure Mamba model, configs/transformer_lm.py otherwise),
`init_from` points at it, documents are packed as segments, and when it carries a
tokenizer (WORKDIR/tokenizer, or tokenizer.json in the HF directory) that becomes
`data.tokenizer`: an `arrayrecord:` corpus must have been prepared with it, and the
default source (the stdlib) is tokenized with it.
"""
import os


def _tokenizer_of(path):
    from jaxmix.data.tokenizer import TOKENIZER_JSON, tokenizer_folder
    folder = tokenizer_folder(path)
    return folder if os.path.isfile(os.path.join(folder, TOKENIZER_JSON)) else "bytes"


def get_config(preset=""):
    if not preset:
        raise ValueError("configs/finetune.py needs the model to start from: "
                         "--config configs/finetune.py:WORKDIR_OR_HF_DIR")
    from jaxmix import convert, workdir
    path = os.path.expanduser(preset)
    configs_dir = os.path.dirname(os.path.abspath(__file__))
    c = convert.preset_config(workdir.load_model_config(path), configs_dir)
    c.init_from = path
    c.data.update(tokenizer=_tokenizer_of(path), packing="segments")
    c.train.update(steps=1000, decay_steps=1000, learning_rate=1e-4, warmup_steps=50,
                   min_lr_ratio=0.1, eval_every=200, checkpoint_every=200)
    return c
