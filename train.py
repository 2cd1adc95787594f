"""Train a jaxmix model.

  python train.py --config configs/mamba_lm.py[:PRESET] [--config.train.steps=100] [--workdir DIR]

Multi-host: --coordinator_address HOST:PORT --num_processes N --process_id I (with no
flags JAX's auto-detection is used on TPU pods and SLURM; otherwise a single process).
Re-running the same command resumes from the latest checkpoint in the workdir.
"""
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, optionally `path:preset`",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output folder (default: runs/<config file stem>, or "
                    "runs/<stem>-<preset> for a preset other than the default)")
flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.DEFINE_string("cpu_collectives", "gloo", "CPU cross-process collectives (gloo|mpi)")
flags.DEFINE_integer("heartbeat_timeout", 100,
                     "multi-host: seconds without a peer's heartbeat before every process "
                     "stops (non-zero status, the log names the missing process)")
FLAGS = flags.FLAGS


def init_distributed():
    import jax
    if FLAGS.num_processes is not None and FLAGS.num_processes > 1:
        # Only affects the CPU client (tests, laptops); GPU/TPU use their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id,
                                   heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    elif FLAGS.coordinator_address is None and _cluster_detected():
        jax.distributed.initialize()


def _cluster_detected():
    """True on environments where jax.distributed.initialize() can find its peers."""
    return any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                         "MEGASCALE_COORDINATOR_ADDRESS")) \
        and int(os.environ.get("SLURM_NTASKS", "2")) > 1


def single_process():
    return (FLAGS.num_processes in (None, 1) and FLAGS.coordinator_address is None
            and not _cluster_detected())


class _FirstLineOnly(logging.Filter):
    """Library warnings and errors as one line each: the tracebacks that orbax's save
    threads log for a failed write repeat what the run's own error line reports."""

    def filter(self, record):
        record.msg, record.args = record.getMessage().split("\n", 1)[0], None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def setup_logging():
    """jaxmix's own progress lines on stderr; library chatter (orbax, absl) only if it
    warns, one line per message."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_logger().addFilter(_FirstLineOnly())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("jaxmix")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxmix.errors import ConfigError, NonFiniteError, WriteError
    if FLAGS.config is None:
        print("error: --config is required, e.g. --config configs/mamba_lm.py", file=sys.stderr)
        sys.exit(2)
    setup_logging()
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    try:
        if single_process():
            from jaxmix import cpu
            for note in cpu.prepare_training_host(FLAGS.config):
                logging.getLogger("jaxmix").warning(note)
        init_distributed()
        import jax
        if jax.process_index() != 0:  # process 0 speaks for the run
            logging.getLogger("jaxmix").setLevel(logging.WARNING)
        from jaxmix import train
        train.run(FLAGS.config, workdir)
    except (ConfigError, NonFiniteError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step
        print("interrupted; the last checkpoint stays; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


def default_workdir(spec):
    """runs/<stem> for a config file's default preset, runs/<stem>-<preset> for another:
    configs/mamba_lm.py -> runs/mamba_lm, configs/mamba_lm.py:smoke ->
    runs/mamba_lm-smoke, configs/finetune.py:runs/imported -> runs/finetune-imported
    (a preset that is a path gives its last part)."""
    path, _, preset = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    preset = os.path.basename(os.path.normpath(preset)) if preset else ""
    preset = re.sub(r"[^\w.-]+", "_", preset).strip("._")
    return os.path.join("runs", f"{stem}-{preset}" if preset and preset != "default"
                        else stem)


def _unknown_override(argv):
    """The first `--config.a.b=v` whose field path does not exist, as an error line."""
    from jaxmix import config_files
    spec_arg = next(a.split("=", 1)[1] if "=" in a else argv[i + 1]
                    for i, a in enumerate(argv) if a.split("=", 1)[0] == "--config")
    config = config_files.load_config(spec_arg)
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, path.split(".")
        for i, part in enumerate(parts):
            moved = [n for n, e in node.get("mixers", {}).items() if part in e] \
                if i == 1 and parts[0] == "model" and part not in node.keys() else []
            if moved:
                return (f"--config.{path}: mixer fields moved to model.mixers.<entry>; use "
                        + " or ".join(f"--config.model.mixers.{n}.{part}" for n in moved))
            if not hasattr(node, "keys") or part not in node.keys():
                where = ".".join(parts[:i]) or "the config"
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
                return f"--config.{path}: {where} has no field {part!r} (fields: {known})"
            node = node[part]
    return None


def parse_flags(argv):
    """absl flag parsing with one-line errors instead of tracebacks."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        path = value and value.split(":", 1)[0]
        if path and not os.path.isfile(path):
            print(f"error: --config: no such file {path!r}", file=sys.stderr)
            sys.exit(2)
        if path and not os.access(path, os.R_OK):
            print(f"error: --config: {path!r} is not readable (permission denied); fix its "
                  f"permissions", file=sys.stderr)
            sys.exit(2)
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - any parse failure is a user error here
        try:
            message = _unknown_override(argv)
        except Exception:  # noqa: BLE001 - the config itself failed to load
            message = None
        if message is None:
            lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
            message = lines[-1] if lines else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main, flags_parser=parse_flags)
