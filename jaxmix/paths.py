"""Checks of the folders a command writes, before it writes: one-line ConfigErrors."""
import os

from jaxmix.errors import ConfigError


def check_output_folder(path, flag, fix):
    """`path` is a folder this process can read and write, or can create; else a
    ConfigError `{flag} {path} ...; {fix}`."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a file, not a folder; {fix}")
        for mode, what in ((os.R_OK | os.X_OK, "readable"), (os.W_OK, "writable")):
            if not os.access(path, mode):
                raise ConfigError(f"{flag} {path} is not {what}; fix its permissions or "
                                  f"{fix}")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        raise ConfigError(f"{flag} {path} cannot be created: {parent} is not a writable "
                          f"folder; {fix}")


def check_new_folder(path, flag, fix):
    """`path` can be created, or is an empty folder this process can write."""
    check_output_folder(path, flag, fix)
    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"{flag} {path} is not empty (it holds "
                          f"{sorted(os.listdir(path))[0]!r}); {fix}")


def is_inside(path, folder):
    """True when `path` is `folder` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder
