"""The argument layer every command line shares (generate, evaluate, duo, convert,
prepare, memory; train.py has its own absl flags but the same conventions):

- `Parser`: argparse whose --help gives every flag's description and its default, and
  whose usage mistakes (an unknown flag, a value of the wrong type or out of range)
  are one `error: ...` line with exit status 2, not a usage block;
- value types (`positive_int`, `fraction`, ...) that reject a bad value while parsing;
- `main(parser, argv, body)`: parses and runs a command, turning the errors a user
  can cause into one `error:` line (status 2 for bad input, 4 for a failed write, 130
  for Ctrl-C);
- `warn(message)`: one `warning: ...` line on stderr for a setting that was adjusted.

Paths are checked by the library (`jaxmix.workdir.open_workdir` for a workdir a
command reads, `jaxmix.paths` for the folders it writes) before a command does any
work, so nothing is written when an argument is wrong.
"""
import argparse
import math
import os
import sys

from jaxmix.errors import ConfigError, WriteError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default ("(default: 8)"), or "(required)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if "default" in text or action.default in (None, argparse.SUPPRESS) or \
                action.option_strings == ["-h", "--help"]:
            return text
        if action.default == "":
            return f"{text} (default: empty)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with jaxmix's conventions (see the module docstring). Every flag needs
    a help text; one whose default is None must say in it what that default means."""

    def __init__(self, prog, description, **kw):
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter,
                         **kw)

    def add_argument(self, *args, **kw):
        action = super().add_argument(*args, **kw)
        if action.option_strings and action.dest != "help":
            if not action.help:
                raise TypeError(f"{args[0]}: every flag needs a help text")
            if action.default is None and not action.required and \
                    "default" not in action.help and action.nargs != 0:
                raise TypeError(f"{args[0]}: say what the default (None) means in the help")
        return action

    def add_subparsers(self, **kw):
        kw.setdefault("parser_class", Parser)
        return super().add_subparsers(**kw)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- values

def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _bounded(kind, test, what):
    def parse(text):
        value = _number(kind, text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value
    parse.__name__ = what
    return parse


integer = _bounded(int, lambda v: True, "an integer")
positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _bounded(float, lambda v: True, "a finite number")
positive_float = _bounded(float, lambda v: v > 0, "a positive number")
nonneg_float = _bounded(float, lambda v: v >= 0, "a number >= 0")
fraction = _bounded(float, lambda v: 0 <= v < 1, "in [0, 1)")
probability = _bounded(float, lambda v: 0 < v <= 1, "in (0, 1]")


def path(text):
    """A path argument, `~` expanded; an empty one is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return os.path.expanduser(text)


# ----------------------------------------------------------------------------- running

def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def quiet_libraries():
    """Library chatter (orbax's and absl's notes) off: only errors come through."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)


def main(parser, argv, body, interrupted="interrupted; nothing was written"):
    """A command's exit status: `argv` parsed by `parser` (--help: 0; a usage mistake:
    its one error line and 2), then `body(args)` under `run`."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code
    quiet_libraries()
    return run(lambda: body(args), interrupted)


def run(body, interrupted="interrupted; nothing was written"):
    """Exit status of a command's `body()`: 0, or after one line on stderr 2 (a
    ConfigError: bad input), 4 (a WriteError: a failed write) or 130 (Ctrl-C)."""
    try:
        body()
    except (ConfigError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------- DuoAttention

def add_duo_args(p):
    """The DuoAttention flags of the commands that decode or evaluate a model."""
    p.add_argument("--duo", type=path, default=None,
                   help="use DuoAttention: a duo_heads.json from `python -m jaxmix.duo "
                   "identify` (default: off; every head keeps a full KV cache)")
    p.add_argument("--sparsity", type=fraction, default=None,
                   help="with --duo: the fraction of KV heads that stream (default: 0.5 "
                   "unless --threshold is given)")
    p.add_argument("--threshold", type=finite_float, default=None,
                   help="with --duo: retrieval heads are those whose gate is at least this; "
                   "above 1 every head streams (default: off, --sparsity decides)")
    p.add_argument("--sink", type=nonneg_int, default=None,
                   help="with --duo: sink tokens of the streaming heads (default: the file's)")
    p.add_argument("--recent", type=positive_int, default=None,
                   help="with --duo: recent tokens of the streaming heads (default: the "
                   "file's)")


def check_duo_args(a):
    """The DuoAttention flags hang together and the heads file exists."""
    if a.duo is None:
        if any(x is not None for x in (a.sparsity, a.threshold, a.sink, a.recent)):
            raise ConfigError("--sparsity, --threshold, --sink and --recent need --duo FILE")
        return
    if a.sparsity is not None and a.threshold is not None:
        raise ConfigError("give one of --sparsity and --threshold, not both")
    if not os.path.isfile(a.duo):
        raise ConfigError(f"--duo {a.duo}: no such file; write it with `python -m "
                          f"jaxmix.duo identify --workdir WORKDIR`")


def duo_deploy(a, model_config, params, trained_seq_len=None):
    """(model config, params, retrieval mask or None) as the DuoAttention flags say
    (unchanged without --duo)."""
    if a.duo is None:
        return model_config, params, None
    from jaxmix import duo
    sparsity = 0.5 if a.sparsity is None and a.threshold is None else a.sparsity
    return duo.load_deployed(model_config, params, a.duo, sparsity=sparsity,
                             threshold=a.threshold, sink=a.sink, recent=a.recent,
                             trained_seq_len=trained_seq_len, warn=warn)
