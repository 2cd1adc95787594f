"""User-facing errors: one line naming the field and the fix."""
import sys


class ConfigError(ValueError):
    """A bad config value, data path or shape that the user can fix.

    The CLI prints `error: <message>` on one line and exits with status 2.
    """


class NonFiniteError(RuntimeError):
    """A training step's loss or gradients were not finite and train.nonfinite says
    stop. The CLI prints `error: <message>` on one line and exits with status 3."""


def first_line(e):
    """The first line of an exception's message (its type name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def exit_status(body):
    """Runs a command's `body()`: exit status 0, or 2 after one `error: ...` line on
    stderr when it raises a ConfigError."""
    try:
        body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
