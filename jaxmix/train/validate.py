"""Early checks of the config, the mesh and the workdir: one-line errors, outside jit."""
import os

from jaxmix import mixers, paths
from jaxmix import workdir as workdir_lib
from jaxmix.data import synthetic
from jaxmix.errors import ConfigError, read_json
from jaxmix.models import normalize_config
from jaxmix.ops import _impl
from jaxmix.train import guard
from jaxmix.workdir import RESTORE_CONFIG, plain

POSITIVE = ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
            "checkpoint_every", "keep_checkpoints")


def check_config(config):
    t, m = config.train, config.model
    for field in POSITIVE:
        if int(t[field]) <= 0:
            raise ConfigError(f"train.{field}={t[field]} must be a positive integer")
    if int(t.get("cpu_devices", 0)) < 0:
        raise ConfigError(f"train.cpu_devices={t.cpu_devices} must be >= 0 (0 = every core)")
    if t.get("nonfinite", "stop") not in guard.POLICIES:
        raise ConfigError(f"train.nonfinite={t.nonfinite!r}: use 'stop' (end the run at a "
                          f"non-finite loss or gradient) or 'skip' (drop that update)")
    if int(t.get("nonfinite_max", 10)) < 1:
        raise ConfigError(f"train.nonfinite_max={t.nonfinite_max} must be >= 1 (non-finite "
                          f"steps in a row before a 'skip' run stops)")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate={t.learning_rate} must be positive")
    for field, meaning in (("grad_clip", "0 = no clipping"), ("warmup_steps", "0 = none"),
                           ("weight_decay", "0 = none")):
        if t.get(field, 0) < 0:
            raise ConfigError(f"train.{field}={t[field]} must be >= 0 ({meaning})")
    for field in ("d_model", "n_layers", "vocab_size"):
        if int(m[field]) <= 0:
            raise ConfigError(f"model.{field}={m[field]} must be a positive integer")
    if m.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={m.dtype!r}: use float32, bfloat16 or float16")
    if m.get("family", "lm") == "encoder":
        check_encoder_length(config)
    check_mixer_fields(m)


# Mixer entry fields that must be positive integers (0 means "default" for the others,
# such as n_kv_heads, head_dim and dt_rank).
MIXER_POSITIVE = ("d_state", "d_conv", "expand", "n_heads", "chunk_size", "n_memories",
                  "top_k")


def check_mixer_fields(m):
    """The implementation names and the counts of the mixer entries the pattern uses."""
    for name in dict.fromkeys(m.get("mixer_pattern", ())):
        entry = (m.get("mixers") or {}).get(name)
        for field, value in (entry.items() if entry is not None else ()):
            where = f"model.mixers.{name}.{field}={value!r}"
            if field.endswith("_impl") and value not in _impl.IMPLS:
                raise ConfigError(f"{where}: use one of {', '.join(_impl.IMPLS)}")
            if field in MIXER_POSITIVE and (isinstance(value, bool)
                                            or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{where} must be a positive integer")


def check_workdir_path(workdir, init_from=""):
    """--workdir names a folder this process can read and write, or create, that is new,
    empty or a train.py workdir (whose model `check_workdir` compares later), and that
    is neither the `init_from` folder nor inside it. Anything else (a converted or
    Hugging Face model, a folder of files no jaxmix run wrote) is refused before a byte
    is written."""
    flag = f"--workdir {workdir}"
    paths.check_output_folder(workdir, "--workdir", "give a new folder or the workdir of a run")
    if init_from and os.path.exists(init_from) and paths.is_inside(workdir, init_from):
        raise ConfigError(f"{flag} is the init_from folder {init_from} (or inside it), "
                          f"which training would write into; give another --workdir")
    folder = workdir_lib.inspect_folder(workdir)
    if folder.kind == workdir_lib.CONVERTED:
        source = f" from {folder.detail}" if folder.detail else ""
        raise ConfigError(f"{flag} holds a model converted{source} by `python -m "
                          f"jaxmix.convert`, kept as it is; fine-tune it into a new folder: "
                          f"--config configs/finetune.py:{workdir} (or --config.init_from="
                          f"{workdir} --workdir NEW)")
    if folder.kind == "hf":
        raise ConfigError(f"{flag} holds a Hugging Face model, which training would "
                          f"overwrite; give a new --workdir (with --config.init_from="
                          f"{workdir} to start from that model)")
    if folder.kind == "other":
        raise ConfigError(f"{flag} holds {folder.detail!r}, which no jaxmix run wrote; "
                          f"give a new or empty folder, or the workdir of a run")


def check_encoder_length(config):
    """An encoder's inputs fit its position table; a channel mixer (weights along the
    token axis) takes exactly max_len positions."""
    m, seq_len = config.model, int(config.train.seq_len)
    max_len = int(m.get("max_len", 512))
    if seq_len > max_len:
        raise ConfigError(f"train.seq_len={seq_len} is more than model.max_len={max_len} "
                          f"learned positions; raise model.max_len")
    kinds = {(m.mixers[n].get("kind", n) if n in (m.get("mixers") or {}) else n)
             for n in m.mixer_pattern}
    channel = [k for k in kinds if hasattr(mixers.get(k), "channel_mixer")]
    if channel and seq_len != max_len:
        raise ConfigError(f"train.seq_len={seq_len}: the {channel[0]} mixer's channel "
                          f"mixer is sized for model.max_len={max_len} positions; set both "
                          f"to the same length")


def check_mesh(config, mesh, process_count):
    """Batch and sequence divisibility by the mesh and the process count."""
    b, length = config.train.batch_size, config.train.seq_len
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % batch_devices:
        raise ConfigError(
            f"train.batch_size={b} is not divisible by mesh.data*mesh.fsdp={batch_devices} "
            f"(the devices that split the batch); use a multiple of {batch_devices}")
    if b % process_count:
        raise ConfigError(f"train.batch_size={b} is not divisible by the {process_count} "
                          f"processes; use a multiple of {process_count}")
    if length % mesh.shape["sequence"]:
        raise ConfigError(f"train.seq_len={length} is not divisible by "
                          f"mesh.sequence={mesh.shape['sequence']}")
    warm, _ = synthetic.warmup(config.data.get("synthetic") or {})
    if warm % mesh.shape["sequence"]:
        raise ConfigError(f"data.synthetic.warmup_len={warm} is not divisible by "
                          f"mesh.sequence={mesh.shape['sequence']}")


def _first_difference(old, new, prefix="model"):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}.{key}")
            if found:
                return found
        elif a != b:
            return f"{prefix}.{key}: {a!r} in the workdir, {b!r} now"
    return None


# Fields that change how the model computes but not its parameters (model or entry).
_RUNTIME_FIELDS = ("scan_impl", "attn_impl", "remat", "scan_layers", "dtype", "aux_weight")


def _without_runtime(model):
    """The fields that decide the parameters: runtime fields dropped, and only the mixer
    entries the pattern uses (an unused entry, or a newly registered mixer's default
    entry, changes nothing)."""
    model = {k: v for k, v in model.items() if k not in _RUNTIME_FIELDS}
    used = set(model.get("mixer_pattern", ()))
    model["mixers"] = {name: {k: v for k, v in _with_defaults(name, entry).items()
                              if k not in _RUNTIME_FIELDS}
                       for name, entry in model.get("mixers", {}).items() if name in used}
    return model


def _with_defaults(name, entry):
    """An entry as its mixer sees it: its class's DEFAULTS under its own fields (a field
    added to a mixer later reads as its default in older workdirs)."""
    return plain({**mixers.get(entry.get("kind", name)).DEFAULTS, **entry})


def check_workdir(config, workdir, has_checkpoints):
    """Refuses to resume checkpoints written for a different model."""
    path = os.path.join(workdir, "config.json")
    if not (has_checkpoints and os.path.exists(path)):
        return
    old = read_json(path, "--workdir", RESTORE_CONFIG).get("model", {})
    old = plain(normalize_config(old, where=f"{path}: model").to_dict())
    new = plain(normalize_config(config.model).to_dict())
    diff = _first_difference(_without_runtime(old), _without_runtime(new))
    if diff:
        raise ConfigError(f"--workdir {workdir} holds checkpoints of another model ({diff}); "
                          f"use a new --workdir or delete that one")


def check_classes(config, data):
    """A classifier's output count equals the data's class count (labels past it would
    be silently wrong, unused outputs waste nothing but mislead)."""
    m = config.model
    n_data = getattr(data, "n_classes", None)
    if m.get("head") != "classify" or n_data is None:
        return
    if int(m.n_classes) != int(n_data):
        raise ConfigError(f"model.n_classes={m.n_classes} but data.source "
                          f"{config.data.source!r} has {n_data} classes; set "
                          f"--config.model.n_classes={n_data}")


def check_vocab(config, data):
    """The model's vocabulary holds every id the data's tokenizer can produce, and a
    packed-segments run is a language model's."""
    tokenizer = getattr(data, "tokenizer", None)
    if getattr(data, "segments", False) and config.model.get("family", "lm") != "lm":
        raise ConfigError("data.packing='segments' is for language models; use "
                          "data.packing='concat' with model.family="
                          f"{config.model.family!r}")
    if tokenizer is None or int(config.model.vocab_size) >= tokenizer.vocab_size:
        return
    n = tokenizer.vocab_size
    if str(config.data.source).startswith("arrayrecord:"):
        raise ConfigError(f"data.source: {config.data.source!r} was prepared with a "
                          f"tokenizer of {n:,} tokens, more than model.vocab_size="
                          f"{config.model.vocab_size}; set --config.model.vocab_size={n} "
                          f"or prepare the corpus with the model's tokenizer")
    raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                      f"vocabulary of data.tokenizer={config.data.get('tokenizer', 'bytes')!r} "
                      f"({n:,} tokens); set --config.model.vocab_size={n}")
