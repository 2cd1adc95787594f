"""Checkpoint conversion: Hugging Face directories <-> jaxmix workdirs.

  python -m jaxmix.convert --from-hf HF_DIR --out WORKDIR     # import
  python -m jaxmix.convert --to-hf HF_DIR --workdir WORKDIR   # export

A converted workdir holds config.json (the matching configs/*.py default preset with
the model section replaced) and an orbax TrainState checkpoint at step 0 (fresh
optimizer state), so `python -m jaxmix.generate --workdir WORKDIR` samples from it and
`train.py --config.init_from=WORKDIR` (or the HF directory itself) fine-tunes it.
"""
import os
import shutil

from jaxmix import config_files, hf, workdir
from jaxmix.errors import ConfigError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


def preset_config(model_config, configs_dir=CONFIGS_DIR):
    """The full config: configs/mamba_lm.py (pure Mamba) or configs/transformer_lm.py
    default preset, its model section updated with `model_config`."""
    from jaxmix import models
    kinds = {models.kind_of(model_config, n) for n in models.layer_kinds(model_config)}
    name = "mamba_lm" if kinds == {"mamba"} else "transformer_lm"
    path = os.path.join(configs_dir, name + ".py")
    if not os.path.exists(path):
        raise ConfigError(f"convert: {path} not found; run from a jaxmix checkout")
    config = config_files.load_config(path + ":default")
    config.model.update(model_config.to_dict())
    config.model.mixer_pattern = tuple(model_config.mixer_pattern)
    return config


def write_workdir(out, config, params, step=0):
    """A train.py-compatible workdir: config.json + TrainState(step, params, fresh
    opt_state) saved by orbax under out/checkpoints/<step>/state."""
    from jaxmix import models, parallel
    from jaxmix.train import optimizer
    from jaxmix.train import state as state_lib

    model = models.build(config.model)
    workdir.check_params(model, params, f"--out {out}")
    mesh = parallel.make_mesh(config.mesh)
    tx, _ = optimizer.make(config.train)
    _, shardings, _ = state_lib.create(model, tx, mesh, parallel.rules_of(config),
                                       config.train.seq_len, config.train.seed)
    state = state_lib.from_params(params, tx, shardings, step)
    os.makedirs(out, exist_ok=True)
    ckpt_dir = os.path.join(os.path.abspath(out), "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ConfigError(f"--out {out} already holds checkpoints; use a new directory")
    ckpt = workdir.Checkpointer(ckpt_dir, async_save=False)
    ckpt.save(step, state)  # no data item: the trainer positions the data by step
    ckpt.close()
    workdir.write_config(config, out)
    return out


def from_hf(hf_dir, out):
    """Imports an HF model directory into a new workdir; returns the full config."""
    model_config, params = hf.load(hf_dir)
    config = preset_config(model_config)
    write_workdir(out, config, params)
    names = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]
    if names:
        os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
        for n in names:
            shutil.copy(os.path.join(hf_dir, n), os.path.join(out, "tokenizer", n))
    return config


def to_hf(workdir_path, hf_dir):
    """Exports a workdir's latest params as an HF model directory."""
    _, params, config = workdir.load_workdir(workdir_path)
    hf.save(hf_dir, config.model, params)
    return config


__all__ = ["hf", "from_hf", "to_hf", "write_workdir", "preset_config"]
