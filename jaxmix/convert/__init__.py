"""Checkpoint conversion: Hugging Face directories <-> jaxmix workdirs.

  python -m jaxmix.convert --from-hf HF_DIR --out WORKDIR     # import
  python -m jaxmix.convert --to-hf HF_DIR --workdir WORKDIR   # export

A converted workdir holds config.json (the matching configs/*.py default preset with
the model section replaced, marked as converted from HF_DIR), an orbax TrainState
checkpoint at step 0 (fresh optimizer state) and the HF tokenizer files in
tokenizer/. `python -m jaxmix.generate --workdir WORKDIR` samples from it, and
`train.py --config configs/finetune.py:WORKDIR` fine-tunes it into another folder
(train.py never trains inside a converted workdir). An export writes config.json,
model.safetensors and the tokenizer: the workdir's own, or for a byte-level model a
tokenizer.json that maps each byte to its id.

Both directions check everything before writing, write into a temporary folder beside
the output and rename it into place when complete: an output is whole or absent.
"""
import contextlib
import os
import shutil
import uuid

from jaxmix import config_files, hf, paths, workdir
from jaxmix.errors import ConfigError, WriteError, is_write_failure, reason

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")
NEW_FOLDER = "give a new or empty folder"


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
    config.model.update(models.normalize_config(model_config).to_dict())
    config.model.mixer_pattern = tuple(model_config.mixer_pattern)
    return config


@contextlib.contextmanager
def staged(out, flag):
    """A temporary folder beside `out`, renamed to `out` when the block completes and
    removed when it fails. A failed write is a WriteError naming `flag`."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out),
                       f".{os.path.basename(out)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        yield tmp
        os.replace(tmp, out)  # `out` is absent or an empty folder (checked before)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(e):
            raise WriteError(f"{flag} {out}: could not write {e.filename or 'it'} "
                             f"({reason(e)}); nothing was written; free disk space and "
                             f"rerun") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_workdir(out, config, params, step=0, **origin):
    """A train.py-compatible workdir: config.json + TrainState(step, params, fresh
    opt_state) saved by orbax under out/checkpoints/<step>/state. `origin` marks it
    (workdir.write_config): converted, from its source."""
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
    ckpt = workdir.Checkpointer(os.path.join(os.path.abspath(out), "checkpoints"),
                                async_save=False)
    ckpt.save(step, state)  # no data item: the trainer positions the data by step
    ckpt.close()
    workdir.write_config(config, out, workdir.CONVERTED, **origin)
    return out


def check_from_hf(hf_dir, out):
    """The import's arguments, before anything is read or written."""
    folder = workdir.inspect_folder(hf_dir)
    if folder.kind in ("missing", "file"):
        what = "no such folder" if folder.kind == "missing" else "a file, not a folder"
        raise ConfigError(f"--from-hf {hf_dir}: {what}; give a Hugging Face model folder "
                          f"(config.json and weights)")
    if folder.kind in (workdir.TRAINED, workdir.CONVERTED):
        raise ConfigError(f"--from-hf {hf_dir} is a jaxmix workdir already; use it as it "
                          f"is (--workdir {hf_dir}, or --config.init_from={hf_dir})")
    paths.check_new_folder(out, "--out", NEW_FOLDER)
    if paths.is_inside(out, hf_dir) or paths.is_inside(hf_dir, out):
        raise ConfigError(f"--out {out} overlaps --from-hf {hf_dir}; give a folder "
                          f"outside the Hugging Face model")


def from_hf(hf_dir, out):
    """Imports an HF model directory into a new workdir; returns (the full config, the
    tokenizer files copied)."""
    check_from_hf(hf_dir, out)
    try:
        model_config, params = hf.load(hf_dir)
    except ConfigError as e:  # its message may start with the folder: name it once
        raise ConfigError(f"--from-hf {hf_dir}: "
                          f"{str(e).removeprefix(f'{hf_dir}: ')}") from None
    config = preset_config(model_config)
    names = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]
    if "tokenizer.json" in names:
        config.data.tokenizer = os.path.join(os.path.abspath(out), "tokenizer")
    with staged(out, "--out") as tmp:
        write_workdir(tmp, config, params, source=os.path.abspath(hf_dir))
        if names:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            for n in names:
                shutil.copyfile(os.path.join(hf_dir, n), os.path.join(tmp, "tokenizer", n))
    return config, names


def check_to_hf(workdir_path, hf_dir):
    """The export's arguments, before anything is read or written; returns the
    workdir's config."""
    from jaxmix import models
    config = workdir.open_workdir(workdir_path)
    try:
        hf.hf_config(models.normalize_config(config.model))
    except ConfigError as e:
        why = str(e).removeprefix("hf.save: ")
        raise ConfigError(f"--workdir {workdir_path}: {why}") from None
    paths.check_new_folder(hf_dir, "--to-hf", NEW_FOLDER)
    if paths.is_inside(hf_dir, workdir_path):
        raise ConfigError(f"--to-hf {hf_dir} is inside --workdir {workdir_path}; give a "
                          f"folder outside the workdir")
    return config


def to_hf(workdir_path, hf_dir):
    """Exports a workdir's latest params, and its tokenizer, as an HF model directory;
    returns (the workdir's config, what was written for the tokenizer)."""
    from jaxmix.data.tokenizer import Tokenizer
    check_to_hf(workdir_path, hf_dir)
    _, params, config = workdir.load_workdir(workdir_path)
    tok_dir = os.path.join(workdir_path, "tokenizer")
    with staged(hf_dir, "--to-hf") as tmp:
        hf.save(tmp, config.model, params)
        if os.path.isdir(tok_dir):
            for n in sorted(os.listdir(tok_dir)):
                if os.path.isfile(os.path.join(tok_dir, n)):
                    shutil.copyfile(os.path.join(tok_dir, n), os.path.join(tmp, n))
            tokenizer = f"the workdir's tokenizer ({tok_dir})"
        elif int(config.model.vocab_size) == 256:
            Tokenizer().save_for_hf(tmp)
            tokenizer = "a byte-level tokenizer (token i = byte i)"
        else:
            tokenizer = None
    return config, tokenizer


__all__ = ["hf", "from_hf", "to_hf", "write_workdir", "preset_config"]
