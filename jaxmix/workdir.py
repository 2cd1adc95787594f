"""Workdir I/O shared by training, conversion, generation and evaluation.

A workdir holds config.json (the full run config) and checkpoints/<step>/ written by
orbax: the TrainState under `state` and, for training runs, each process's data-iterator
position under `data`.

State (params, optimizer state, step) is saved with its shardings and restored into
whatever shardings the current mesh wants, so a checkpoint written under one mesh or
process count restores under another. The data iterator's state is saved per process
(grain's handler); when the process count changed it cannot be used, and the caller
re-positions the data by step instead.

config.json's `jaxmix_workdir` section says who wrote the folder: "trained" (train.py)
or "converted" (`python -m jaxmix.convert --from-hf`, with the source folder). A
command writes only into a folder that is new, empty, or one of its own kind
(`inspect_folder` tells which a folder is); a converted model is never trained over.
"""
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxmix import models
from jaxmix.errors import ConfigError, WriteError, first_line, read_json, reason

log = logging.getLogger("jaxmix")


# ----------------------------------------------------------------------------- config.json

def plain(tree):
    """A config dict as JSON would give it back (tuples as lists, keys sorted)."""
    return json.loads(json.dumps(tree, sort_keys=True, default=list))


ORIGIN = "jaxmix_workdir"
TRAINED, CONVERTED = "trained", "converted"


def write_config(config, workdir, kind=TRAINED, **origin):
    """config.json: the run config and its `jaxmix_workdir` section ({"kind": kind,
    **origin})."""
    tree = plain(config.to_dict())
    tree[ORIGIN] = {"kind": kind, **origin}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(json.dumps(tree, indent=2))


RESTORE_CONFIG = ("it holds the run's config: put back a good copy, or delete the workdir "
                  "to start over")


def read_config(workdir):
    """The run config of a workdir, its model section in the current layout
    (models.normalize_config migrates configs written with flat mixer fields)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir {workdir}: no config.json there; point it at a "
                          f"train.py or `python -m jaxmix.convert` workdir")
    config = ml_collections.ConfigDict(read_json(path, "--workdir", RESTORE_CONFIG))
    config.model = models.normalize_config(config.model, where=f"{path}: model")
    return config


# ----------------------------------------------------------------------------- folder kinds

# What jaxmix commands write into a workdir: train.py (config.json, metrics.jsonl,
# checkpoints/, tokenizer/, loss.png, tensorboard/), `python -m jaxmix.evaluate`
# (eval_<task>[-N].jsonl/.md/.png) and `python -m jaxmix.duo identify` (duo_heads.*).
OWN_NAMES = re.compile(r"config\.json|metrics\.jsonl|checkpoints|tokenizer|loss\.png|"
                       r"tensorboard|duo_heads\.(json|png)(\.tmp)?|"
                       r"eval_\w+?(-\d+)?\.(jsonl|md|png)")
HF_MODEL_FILES = re.compile(r".*\.(safetensors|bin|gguf)|.*\.index\.json|"
                            r"generation_config\.json|tokenizer(_config)?\.json|"
                            r"special_tokens_map\.json")


@dataclasses.dataclass(frozen=True)
class Folder:
    """What a folder is: kind "missing", "file", "empty", "trained" (a train.py
    workdir), "converted" (a `jaxmix.convert --from-hf` workdir), "hf" (a Hugging Face
    model) or "other" (anything else). `detail`: a converted workdir's source, an HF
    model's model_type, or the name in an "other" folder that shows it is not a
    workdir."""
    path: str
    kind: str
    detail: str = ""


def _json_object(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def inspect_folder(path):
    """The `Folder` at `path` (a folder this process can list). A config.json with a
    `model` section makes a jaxmix workdir, whatever else the folder holds; without
    one, a folder holding only what jaxmix commands write (the leftovers of a run cut
    short) counts as a train.py workdir."""
    if not os.path.lexists(path):
        return Folder(path, "missing")
    if not os.path.isdir(path):
        return Folder(path, "file")
    names = sorted(os.listdir(path))
    if not names:
        return Folder(path, "empty")
    config = _json_object(os.path.join(path, "config.json"))
    if config is not None and "model" not in config:  # another program's config.json
        hf = "model_type" in config or "architectures" in config
        return Folder(path, "hf" if hf else "other",
                      str(config.get("model_type", "")) if hf else "config.json")
    if config is None:
        foreign = [n for n in names if not OWN_NAMES.fullmatch(n)]
        if any(HF_MODEL_FILES.fullmatch(n) for n in foreign):
            return Folder(path, "hf")
        if foreign:
            return Folder(path, "other", foreign[0])
    origin = (config or {}).get(ORIGIN) or {}
    kind = origin.get("kind")
    if kind not in (TRAINED, CONVERTED):  # written before the section existed
        converted = ("metrics.jsonl" not in names
                     and checkpoint_steps(os.path.join(path, "checkpoints")) == [0])
        kind = CONVERTED if converted else TRAINED
    return Folder(path, kind, str(origin.get("source", "")))


def is_workdir(path):
    """A jaxmix workdir (trained or converted): its config.json has a model section."""
    return "model" in (_json_object(os.path.join(path, "config.json")) or {})


IMPORT_FIRST = "import it first: python -m jaxmix.convert --from-hf {path} --out runs/NAME"


def open_workdir(path, flag="--workdir", family="lm"):
    """The config of the workdir a command reads a model from, checked before any work:
    a readable jaxmix workdir (not an HF model or another folder) of `family` with a
    checkpoint. Every problem is a one-line ConfigError naming `flag` and the fix."""
    what = ("give a train.py workdir (or one made by `python -m jaxmix.convert "
            "--from-hf`)")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not readable; fix its permissions")
    folder = inspect_folder(path)
    if folder.kind == "missing":
        raise ConfigError(f"{flag} {path}: no such folder; {what}")
    if folder.kind == "file":
        raise ConfigError(f"{flag} {path} is a file, not a workdir; {what}")
    if folder.kind == "hf":
        raise ConfigError(f"{flag} {path} holds a Hugging Face model, not a jaxmix "
                          f"workdir; {IMPORT_FIRST.format(path=path)}")
    if folder.kind in ("empty", "other") or not os.path.exists(
            os.path.join(path, "config.json")):
        raise ConfigError(f"{flag} {path} is not a jaxmix workdir (no config.json with a "
                          f"model section); {what}")
    config = read_config(path)
    found = config.model.get("family", "lm")
    if found != family:
        noun = {"lm": "a language model", "encoder": "an encoder"}
        raise ConfigError(f"{flag} {path} holds {noun.get(found, repr(found))} "
                          f"(model.family={found!r}); this command needs "
                          f"{noun.get(family, repr(family))}")
    if not checkpoint_steps(os.path.join(path, "checkpoints")):
        raise ConfigError(f"{flag} {path}: no checkpoint there yet; train first "
                          f"(train.py saves every train.checkpoint_every steps)")
    return config


# ----------------------------------------------------------------------------- checkpoints

class _Snapshot:
    """A data-iterator state captured at save time (saves may finish asynchronously)."""

    def __init__(self, state):
        self._state = json.dumps(state, indent=1).encode()

    def get_state(self):
        return self._state


def checkpoint_steps(directory):
    """The steps whose checkpoint folder is complete, read from disk (orbax renames a
    save's temporary folder to `<step>` only once everything is written)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose close() first cancels the tasks still pending on it and runs
    the loop until they have finished (and shuts down its async generators and default
    executor), as asyncio.run does before closing.

    orbax runs each restore in a fresh event loop that it closes as soon as the restore
    returns or raises, without that step. When one array read fails, the reads of the
    other arrays are still in flight: tensorstore then completes them on its own
    threads into the closed loop (an "Event loop is closed" traceback on stderr for
    each) and their coroutines are destroyed while pending (one more traceback each).
    Cancelled and awaited before the loop closes, they end quietly."""

    def close(self):
        if not self.is_running() and not self.is_closed():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.run_until_complete(self.shutdown_asyncgens())
            self.run_until_complete(self.shutdown_default_executor())
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _DrainingEventLoop()


@contextlib.contextmanager
def _draining_event_loops():
    """Event loops created inside (by orbax, which calls asyncio.new_event_loop() for
    each restore) are `_DrainingEventLoop`s; the previous policy is put back after."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def restore_failure(e):
    """Why a checkpoint does not restore, in one line. orbax wraps a failed array read
    in an exception whose text is the array's index and a dump of its TensorStore spec;
    the read error it wraps (tensorstore's, naming the array and what is wrong with its
    bytes) is what is reported then."""
    if str(e).startswith("Encountered error while reading array index") and e.__cause__:
        e = e.__cause__
    return first_line(e)


class Checkpointer:
    def __init__(self, directory, keep=3, async_save=True):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, data_iter=None, force=False):
        """Saves the state and, when given, the data iterator's position (asynchronously:
        a failure of this save is raised by the next save or by `close`, as a
        WriteError)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data_iter.get_state()))
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # whatever orbax / tensorstore raise for a failed write
            raise self.write_failed("a checkpoint", e) from None

    def write_failed(self, what, e):
        """The WriteError for a failed write of `what`, naming the last complete
        checkpoint (intact: a failed save never replaces or deletes one)."""
        steps = checkpoint_steps(self.directory)
        kept = (f"the last complete checkpoint, step {steps[-1]} in {self.directory}, is "
                f"intact" if steps else "no checkpoint was saved before it")
        return WriteError(f"could not write {what} ({reason(e)}); {kept}; free disk "
                          f"space (or raise the quota) and rerun the same command to resume")

    def restore(self, step, abstract_state, data_iter):
        """(state, data_restored: bool). The state lands in abstract_state's shardings."""
        with _draining_event_loops():
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        try:
            with _draining_event_loops():
                self.manager.restore(step, args=ocp.args.Composite(
                    data=grain.checkpoint.CheckpointRestore(data_iter)))
            return state, True
        except (ValueError, FileNotFoundError, KeyError) as e:
            log.warning("data-iterator state not restored (%s); re-positioning by step",
                        str(e).splitlines()[0])
            return state, False

    def restore_latest(self, abstract_state, data_iter):
        """(step, state, data_restored) of the newest checkpoint that restores, or None
        when there is none. One that fails (a damaged or truncated file, missing
        metadata, an empty step folder) is reported in one warning line naming the
        checkpoint it falls back to, set aside as `<step>.damaged` (kept for a look;
        later saves of that step cannot collide with it), and the one before it is
        tried. None usable: ConfigError."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                state, data_ok = self.restore(step, abstract_state, data_iter)
                return step, state, data_ok
            except Exception as e:  # whatever orbax / tensorstore raise for bad files
                after = (f"falling back to step {steps[i + 1]}" if i + 1 < len(steps)
                         else "no checkpoint before it")
                log.warning("checkpoint step %d in %s does not restore (%s); set aside as "
                            "%d.damaged, %s", step, self.directory, restore_failure(e), step,
                            after)
                self._set_aside(step)
        if steps:
            raise ConfigError(f"--workdir: no checkpoint in {self.directory} restores "
                              f"(steps {', '.join(map(str, steps))}, set aside as "
                              f"*.damaged); train in another --workdir, or delete "
                              f"{self.directory} to start over")
        return None

    def _set_aside(self, step):
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            os.replace(path, f"{path}.damaged")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxmix set aside checkpoint {step}")
        self.manager.reload()

    def close(self, raise_errors=True):
        """Waits for the saves in flight; a failed one raises a WriteError (unless
        `raise_errors` is False: the run is already stopping on another error)."""
        failures = []
        for call in (self.manager.wait_until_finished, self.manager.close):
            try:
                call()
            except Exception as e:  # noqa: BLE001 - a failed async save surfaces here
                failures.append(e)
        if failures and raise_errors:
            raise self.write_failed("a checkpoint", failures[0]) from None


def restore_params(checkpoint_dir, step=None):
    """(params, step): the params subtree only of the TrainState saved at `step`
    (default: the latest), as host-local arrays on the default device."""
    manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir), item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{checkpoint_dir}: no checkpoint there yet; train first "
                              f"(train.py saves every train.checkpoint_every steps)")
        tree = manager.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree["params"])
        args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
        with _draining_event_loops():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore({"params": target}, restore_args={"params": args},
                                             partial_restore=True)))
    finally:
        manager.close()
    return restored["state"]["params"], step


def check_params(model, params, where):
    """One-line error when `params` do not fit `model` (names or shapes)."""
    have = models.named_params(params)
    for name, leaf in models.named_params(models.abstract_params(model)).items():
        if name not in have:
            raise ConfigError(f"{where}: param {name} is missing; the checkpoint was "
                              f"written for another model config")
        models.check_param_shape(where, name, have[name], leaf)


def load_workdir(workdir, step=None, family="lm"):
    """(model, params, config) from a workdir: its config.json and the params of its
    latest (or `step`'s) checkpoint; the optimizer state is not read. Anything but a
    workdir of a `family` model with a checkpoint is a one-line error (`open_workdir`)."""
    config = open_workdir(workdir, family=family)
    model = models.build(config.model)
    params, _ = restore_params(os.path.join(workdir, "checkpoints"), step)
    check_params(model, params, f"--workdir {workdir}")
    return model, params, config


# ----------------------------------------------------------------------------- init_from

def load_model_config(path):
    """The jaxmix model config of an HF model directory or a jaxmix workdir."""
    from jaxmix import hf
    return read_config(path).model if is_workdir(path) else hf.load(path)[0]


def load_params(path, model=None):
    """Params only, from an HF model directory or a jaxmix workdir (latest checkpoint),
    converted for `model` when given (a dense attention model's params for a MoH model,
    say: `models.adapt_params`) and checked against it (one-line error naming the param)."""
    from jaxmix import hf
    if not os.path.isdir(path):
        raise ConfigError(f"init_from={path!r} is not a directory; give an HF model "
                          f"directory or a jaxmix workdir")
    try:
        if is_workdir(path):
            params, _ = restore_params(os.path.join(path, "checkpoints"))
        else:
            params = hf.load(path)[1]
    except ConfigError as e:
        raise ConfigError(f"init_from: {e}") from None
    if model is not None:
        params = models.adapt_params(params, model.cfg)
        check_params(model, params, f"init_from={path}")
    return params
