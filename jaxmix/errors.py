"""User-facing errors: one line naming the field and the fix."""


class ConfigError(ValueError):
    """A bad config value, data path or shape that the user can fix.

    The CLI prints `error: <message>` on one line and exits with status 2.
    """
