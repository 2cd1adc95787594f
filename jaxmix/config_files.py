"""Loading config files (`configs/*.py`) by path, as train.py's --config does."""
import importlib.util
import os


def load_module(path):
    """The Python module at `path` (a config file; need not be on sys.path)."""
    name = "_jaxmix_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec, root=None, flag="--config"):
    """`get_config(preset)` of a "path[:preset]" spec; relative paths from `root` (or cwd).
    A missing or unreadable file, or a preset the file refuses, is a one-line
    ConfigError naming `flag`."""
    from jaxmix.errors import ConfigError, first_line
    path, _, preset = spec.partition(":")
    if root is not None and not os.path.isabs(path):
        path = os.path.join(root, path)
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {spec}: no such file {path!r}; give a config file such "
                          f"as configs/mamba_lm.py[:PRESET]")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{flag} {spec}: {path!r} is not readable (permission denied); "
                          f"fix its permissions")
    try:
        module = load_module(path)
    except Exception as e:  # noqa: BLE001 - whatever the file's own code raises
        raise ConfigError(f"{flag} {spec}: {path} does not load ({type(e).__name__}: "
                          f"{first_line(e)}); fix the file") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{flag} {spec}: {path} has no get_config(preset) function; give "
                          f"a config file such as configs/mamba_lm.py")
    try:
        return module.get_config(preset) if preset else module.get_config()
    except (ValueError, KeyError) as e:  # an unknown preset, a model it cannot read
        raise ConfigError(f"{flag} {spec}: {first_line(e)}") from None


def sibling(config_file, name):
    """Another config file in the same folder as `config_file` (e.g. a shared base)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def set_field(config, path, value):
    """config[a][b][c] = value for path "a.b.c" (lists become tuples, as in configs)."""
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
