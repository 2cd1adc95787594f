"""User-facing errors: one line naming the field and the fix."""
import errno
import json


class ConfigError(ValueError):
    """A bad config value, data path or shape that the user can fix.

    The CLI prints `error: <message>` on one line and exits with status 2.
    """
    exit_status = 2


class NonFiniteError(RuntimeError):
    """A training step's loss or gradients were not finite and train.nonfinite says
    stop. The CLI prints `error: <message>` on one line and exits with status 3."""
    exit_status = 3


class WriteError(RuntimeError):
    """The workdir could not be written (a full disk or quota, a file-size limit, a
    read-only filesystem) or a checkpoint save failed. The message says which
    checkpoint is the last complete one. The CLI prints `error: <message>` on one line
    and exits with status 4."""
    exit_status = 4


# errno values that only a write can raise: the run stops with a WriteError.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def is_write_failure(e):
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def first_line(e):
    """The first line of an exception's message (its type name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def reason(e):
    """Why an operation failed, in a few words: an OSError's own text ("No space left on
    device"; the caller names the file), or else the first line of the message."""
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def read_json(path, field, fix):
    """The JSON object in the file at `path`. A missing, unreadable or invalid file, or
    JSON that is not an object, is a ConfigError: `{field}: {path} is unreadable
    (reason); {fix}`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {path} is unreadable ({reason(e)}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {path} is not a JSON object; {fix}")
    return data
